"""Training prompts for stage 1: the instance prompt, random templates, appended descriptive words, captions.

Prompt regularisation from the seed projects: training on ``a photo of [V]`` without the class word
generalises better to new prompts, and random templates (textual inversion's list) with a descriptive
word appended with probability p make the subject less tied to one phrasing. The text encoder is frozen,
so every variant is encoded once and each sample picks an index.
"""

from __future__ import annotations

import re

import torch

# Textual inversion's object templates (diffusers' textual_inversion.py), with the subject as {subject}.
TI_TEMPLATES = [
    "a photo of a {subject}", "a rendering of a {subject}", "a cropped photo of the {subject}",
    "the photo of a {subject}", "a photo of a clean {subject}", "a photo of a dirty {subject}",
    "a dark photo of the {subject}", "a photo of my {subject}", "a photo of the cool {subject}",
    "a close-up photo of a {subject}", "a bright photo of the {subject}", "a cropped photo of a {subject}",
    "a photo of the {subject}", "a good photo of the {subject}", "a photo of one {subject}",
    "a rendition of the {subject}", "a photo of the clean {subject}", "a rendition of a {subject}",
    "a photo of a nice {subject}", "a good photo of a {subject}", "a photo of the nice {subject}",
    "a photo of the small {subject}", "a photo of the weird {subject}", "a photo of the large {subject}",
    "a photo of a cool {subject}", "a photo of a small {subject}",
]  # fmt: skip


def instance_prompts(templates: list[str], identifier: str, class_noun: str, with_class_word: bool) -> list[str]:
    """Fill the templates; ``{subject}`` is ``[V] class`` (or ``[V]`` alone without the class word)."""
    subject = f"{identifier} {class_noun}" if with_class_word else identifier
    noun = class_noun if with_class_word else ""
    filled = [t.format(identifier=identifier, class_noun=noun, subject=subject) for t in templates]
    return [re.sub(r"\s+", " ", p).strip() for p in filled]


def prompt_variants(prompts: list[str], words: list[str]) -> list[str]:
    """Every prompt as is, then with each descriptive word appended: ``len(prompts) * (1 + len(words))``."""
    return [variant for p in prompts for variant in [p, *(f"{p}, {w}" for w in words)]]


def choose_variants(n: int, n_prompts: int, n_words: int, word_prob: float, generator: torch.Generator) -> torch.Tensor:
    """Indices into ``prompt_variants`` for ``n`` samples: a random prompt, a random word with ``word_prob``."""
    prompt = torch.randint(0, n_prompts, (n,), generator=generator)
    add = torch.rand(n, generator=generator) < word_prob
    word = torch.randint(0, max(n_words, 1), (n,), generator=generator)
    return prompt * (1 + n_words) + torch.where(add & (n_words > 0), 1 + word, torch.zeros_like(word))


# Per-image captions (kohya's convention: photo.txt beside photo.jpg). A captioned image trains on
# ``caption_template`` filled with the instance prompt drawn as above (without its descriptive word: the
# caption describes the photo) and the caption; with ``caption_dropout`` on the bare instance prompt.
CAPTION_FIELDS = ("prompt", "identifier", "class_noun", "caption")


def caption_prompts(
    prompts: list[str], captions: list[str], template: str, identifier: str, class_noun: str, with_class_word: bool
) -> list[str]:
    """``template`` filled for every caption and every instance prompt: caption r, prompt j at ``r * len(prompts)
    + j``. ``{prompt}`` is the instance prompt, ``{class_noun}`` empty without the class word (as there)."""
    noun = class_noun if with_class_word else ""
    filled = [
        template.format(prompt=p, identifier=identifier, class_noun=noun, caption=c) for c in captions for p in prompts
    ]
    return [re.sub(r"\s+([,.;])", r"\1", re.sub(r"\s+", " ", p)).strip() for p in filled]  # "sks , x": "sks, x"


def caption_rows(captions: list[str | None]) -> torch.Tensor:
    """(N,) each image's row in ``caption_prompts`` (its caption's place among the images that have one), -1
    for an image without a caption."""
    rows, row = [], 0
    for c in captions:
        rows.append(row if c is not None else -1)
        row += c is not None
    return torch.tensor(rows, dtype=torch.long)


def caption_dropout(n: int, dropout: float, any_caption: bool, generator: torch.Generator) -> torch.Tensor:
    """(n,) bool: which samples train on the bare instance prompt instead of their captioned one. Nothing is
    drawn when no image has a caption, so that a run without captions is the run it always was."""
    if not any_caption:
        return torch.ones(n, dtype=torch.bool)
    return torch.rand(n, generator=generator) < dropout


def with_captions(
    chosen: torch.Tensor, rows: torch.Tensor, dropped: torch.Tensor, n_prompts: int, n_words: int
) -> torch.Tensor:
    """Indices into ``prompt_variants(...) + caption_prompts(...)``: each sample's ``chosen`` variant (B,), or,
    when its image has a caption (``rows`` (B,) >= 0) not ``dropped`` (B,), that caption with the same prompt."""
    n_variants = n_prompts * (1 + n_words)
    prompt = chosen // (1 + n_words)  # the variant's instance prompt, without its descriptive word
    captioned = n_variants + rows.clamp(min=0) * n_prompts + prompt
    return torch.where((rows >= 0) & ~dropped, captioned, chosen)
