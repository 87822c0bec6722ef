"""The world's measuring models: a CLIP and a DINO-style ViT trained on the procedural world, small enough to
commit, loaded exactly like the real ones (``posebooth.backbones.ClipEmbedder`` / ``DinoEmbedder``).

- CLIP (Radford et al. 2021): a ``transformers.CLIPModel`` trained contrastively (symmetric InfoNCE with a
  learnable logit scale) on rendered scenes and their captions, over the real 49,408-token CLIP vocabulary.
  It scores prompt following (CLIP-T) and classifies zero-shot which context and colour an image shows.
- DINO: a ``transformers.ViTModel`` whose CLS token (``last_hidden_state[:, 0]``) tells world INSTANCES
  apart across poses, contexts, placements and mirror, trained with a supervised-contrastive loss (Khosla et
  al. 2020) on several renders of each of several instances per batch, with one-attribute-away instances
  as hard negatives. ``scenes.SUBJECT`` and a fifth of the other instances are never trained on; on the
  latter a subject-verification threshold is calibrated at the equal-error rate (``verification.json``).

Both train on one CPU core in minutes, deterministically for a recipe (explicit generators, fixed threads).
Training images are augmented like generated ones look (blur, noise, small colour and framing changes).
Training-only heads speed the small ViTs up and are not saved: a silhouette head on the patch tokens (the
subject's mask is free in this world: the render minus its background) and, for DINO, attribute classifiers
on the CLS token.

    record = train_clip(CLIP_RECIPE, Path("world/clip"))
    record = train_dino(DINO_RECIPE, Path("world/dino"))
"""

from __future__ import annotations

import itertools
import json
import logging
import re
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter
from tqdm import tqdm

from posebooth.metrics import per_image_cosine
from posebooth.world import scenes
from posebooth.world.backgrounds import CONTEXTS
from posebooth.world.scenes import ATTRIBUTES, CLASSES, COLOURS, SUBJECT, Instance

log = logging.getLogger(__name__)

SIZE = 64  # pixels: the world's renders and both judges' input
MASK_LEVEL = 8  # mean absolute difference (of 255) above which a pixel belongs to the subject

# How generated images differ from renders: training views are drawn with these (see ``augment``).
AUGMENT = {
    "flip": 0.5,  # probability of a mirror image
    "min_crop": 0.85,  # square crops of at least this fraction of the side, anywhere, resized back
    "brightness": 0.1,  # factors in [1 - a, 1 + a]; no hue shift, so colour names stay true
    "contrast": 0.1,
    "saturation": 0.1,
    "blur": 0.6,  # probability of a Gaussian blur, sigma uniform in [0, max_sigma] pixels
    "max_sigma": 1.5,
    "noise": 0.03,  # Gaussian pixel noise, std uniform in [0, noise] on the [0, 1] scale
}

CLIP_RECIPE = {
    "seed": 20261211,
    "threads": 1,  # one core: bit-identical at a fixed thread count
    "scenes": 6000,  # training renders (every class and context; never the held-out SUBJECT)
    "steps": 1000,
    "batch": 128,
    "groups": 4,  # a batch is this many groups of scenes of one context each (see _clip_batch)
    "lr": 1e-3,
    "warmup": 100,
    # Caption words kept (scenes.caption): colour and place almost always, so zero-shot prompts can name them.
    "keep": {"colour": 0.9, "context": 0.95, "shape": 0.4, "marking": 0.4, "build": 0.3},
    "class_only": 0.05,
    "identifier": 0.25,  # share of captions with a random rare word before the noun, like DreamBooth's "sks"
    "mask_weight": 5.0,  # weight of the training-only silhouette loss on the patch tokens (see mask_loss)
    "augment": AUGMENT,
    "eval_scenes": 440,  # held-out renders from another seed (40 per context), for the zero-shot record
}

DINO_RECIPE = {
    "seed": 20261212,
    "threads": 1,
    "held_out": 0.2,  # share of instances (besides SUBJECT) never trained on: the calibration set
    "renders": 8,  # training renders per training instance
    "steps": 1000,
    "instances": 32,  # per batch, in groups of "family" of the same class and colour (the hard negatives)
    "family": 4,
    "views": 4,  # renders of each instance per batch (batch = instances x views images)
    "lr": 1e-3,
    "warmup": 100,
    "temperature": 0.1,
    "attribute_weight": 1.0,  # weight of the training-only attribute classifiers (see train_dino)
    "mask_weight": 5.0,  # weight of the training-only silhouette loss on the patch tokens (see mask_loss)
    "augment": AUGMENT,
    # Verification calibration on held-out instances: per instance, references made like the project's
    # subject photos, positive queries (other renders) and negatives of each kind, all queries blurred at random.
    "calibration": {"references": 6, "positives": 4, "one_attribute": 4, "same_class": 2, "other_class": 2},
}

# The architectures. The text tower is narrow because its token table is 49,408 x hidden: at 24 wide it is
# 2.4 MB in fp16, and both judges together stay under 3.8 MB.
CLIP_TEXT = dict(vocab_size=49408, hidden_size=24, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                 max_position_embeddings=77, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)  # fmt: skip
CLIP_VISION = dict(image_size=SIZE, patch_size=8, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                   num_attention_heads=4)  # fmt: skip
CLIP_PROJECTION = 64
DINO_VIT = dict(image_size=SIZE, patch_size=8, hidden_size=96, intermediate_size=192, num_hidden_layers=4,
                num_attention_heads=4)  # fmt: skip

# Words the random identifiers must not be: they carry the world's meaning.
_WORLD_WORDS = {*CLASSES, *COLOURS, "grey", "gray", *(w for c in CONTEXTS.values() for w in c.phrase.split())}
# Words after which a prompt's subject noun phrase has ended: a colour after them is not the subject's.
_RELATION_WORDS = {"on", "in", "with", "wearing", "floating", "next", "near", "behind", "under", "beside", "by",
                   "at", "inside", "among", "against", "holding", "and"}  # fmt: skip
_COLOUR_ALIASES = {"gray": "grey"}


# ----------------------------------------------------------------------------------------------- prompts


def quick_recipe(recipe: dict) -> dict:
    """``recipe`` (CLIP_RECIPE or DINO_RECIPE) cut down to a few steps on a few scenes: what the tests and
    ``posebooth world pretrain --quick`` run."""
    if "held_out" in recipe:  # DINO; 4 held-out instances keep the calibration to seconds
        calibration = {k: 1 for k in recipe["calibration"]} | {"references": 2}
        return recipe | {"held_out": 0.005, "renders": 2, "steps": 2, "instances": 4, "family": 2, "views": 2,
                         "warmup": 1, "calibration": calibration}  # fmt: skip
    return recipe | {"scenes": 24, "steps": 2, "batch": 8, "groups": 2, "warmup": 1, "eval_scenes": 11}


def context_prompts(class_noun: str) -> dict[str, str]:
    """Zero-shot prompts, one per world context: "a photo of a robot on the beach" ("a photo of a robot"
    for the studio, whose phrase is empty)."""
    return {name: " ".join(f"a photo of a {class_noun} {c.phrase}".split()) for name, c in CONTEXTS.items()}


def colour_prompts(class_noun: str) -> dict[str, str]:
    """Zero-shot prompts, one per world colour: "a photo of a red robot"."""
    return {colour: f"a photo of a {colour} {class_noun}" for colour in COLOURS}


def _words(prompt: str) -> list[str]:
    return re.findall(r"[a-z]+", prompt.lower())


def context_of(prompt: str) -> str | None:
    """The world context a free-text prompt names by its DreamBench phrase ("a sks robot on the beach" ->
    "beach"), the longest if several; None when it names none. The studio (empty phrase) is never named."""
    text = " " + " ".join(_words(prompt)) + " "
    found = [name for name, c in CONTEXTS.items() if c.phrase and f" {c.phrase} " in text]
    return max(found, key=lambda name: len(CONTEXTS[name].phrase)) if found else None


def colour_of(prompt: str) -> str | None:
    """The world colour a prompt gives its subject ("a red sks robot" -> "red"): the last colour word
    before the subject phrase ends (at "on", "in", "with", "wearing", ...), so the colour of a place or a
    thing ("on top of pink fabric", "wearing a red hat") does not count. None when there is none."""
    colour = None
    for word in _words(prompt):
        if word in _RELATION_WORDS:
            break
        word = _COLOUR_ALIASES.get(word, word)
        if word in COLOURS:
            colour = word
    return colour


@torch.no_grad()
def zero_shot(embedder, images: list[Image.Image], texts: list[str]) -> list[int]:
    """For each image, the index of the candidate text whose CLIP embedding is closest (cosine)."""
    if not images or not texts:
        raise ValueError(f"zero_shot needs images and candidate texts, got {len(images)} and {len(texts)}")
    image_emb = F.normalize(embedder.images(images).float(), dim=-1)  # (N, D)
    text_emb = F.normalize(embedder.texts(texts).float(), dim=-1)  # (T, D)
    return (image_emb @ text_emb.T).argmax(dim=1).tolist()


# ---------------------------------------------------------------------------------------- augmentation


def gaussian_blur(images: torch.Tensor, sigma: torch.Tensor, radius: int) -> torch.Tensor:
    """Each image (B, C, H, W) blurred with its own sigma (B,) in pixels (0: unchanged), a separable
    kernel of ``2 * radius + 1`` taps, reflected at the edges."""
    b, c, h, w = images.shape
    x = torch.arange(-radius, radius + 1, dtype=images.dtype)  # (K,)
    kernel = torch.exp(-(x[None] ** 2) / (2 * sigma.clamp(min=1e-3)[:, None] ** 2))  # (B, K)
    kernel = (kernel / kernel.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, K)
    flat = F.pad(images.reshape(1, b * c, h, w), (radius,) * 4, mode="reflect")
    flat = F.conv2d(flat, kernel[:, None, None, :], groups=b * c)  # along x
    flat = F.conv2d(flat, kernel[:, None, :, None], groups=b * c)  # along y
    return flat.reshape(b, c, h, w)


def augment(
    pixels: torch.Tensor, aug: dict, generator: torch.Generator, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Training views of uint8 renders (B, 3, S, S): a random crop and mirror, brightness, contrast and
    saturation jitter, Gaussian blur and pixel noise (``AUGMENT``), float in [0, 1]; and the subject
    ``masks`` (B, S, S) in {0, 1}, if given, cropped and mirrored alike (float in [0, 1])."""
    x = pixels.float() / 255  # (B, 3, S, S) in [0, 1]
    b = len(x)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(b, generator=generator)

    scale = uniform(aug["min_crop"], 1.0)  # crop side over the image side
    shift_x, shift_y = (1 - scale) * uniform(-1, 1), (1 - scale) * uniform(-1, 1)
    flip = torch.where(torch.rand(b, generator=generator) < aug["flip"], -1.0, 1.0)
    theta = torch.zeros(b, 2, 3)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = scale * flip, shift_x, scale, shift_y
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks.float()[:, None], grid, mode="bilinear", padding_mode="border", align_corners=False)
        masks = masks[:, 0]
    x = x * uniform(1 - aug["brightness"], 1 + aug["brightness"])[:, None, None, None]
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    x = mean + (x - mean) * uniform(1 - aug["contrast"], 1 + aug["contrast"])[:, None, None, None]
    grey = x.mean(dim=1, keepdim=True)
    x = grey + (x - grey) * uniform(1 - aug["saturation"], 1 + aug["saturation"])[:, None, None, None]
    sigma = uniform(0, aug["max_sigma"]) * (torch.rand(b, generator=generator) < aug["blur"])
    x = gaussian_blur(x, sigma, radius=int(np.ceil(2.5 * aug["max_sigma"])))
    x = x + uniform(0, aug["noise"])[:, None, None, None] * torch.randn(x.shape, generator=generator)
    return x.clamp(0, 1), masks


def blur_image(image: Image.Image, sigma: float) -> Image.Image:
    """``image`` blurred with a Gaussian of ``sigma`` pixels (PIL's radius is the standard deviation)."""
    return image.filter(ImageFilter.GaussianBlur(sigma)) if sigma > 0 else image


def _normalise(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """[0, 1] pixels (B, 3, S, S) normalised as the saved image processor does."""
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def _render(scene_list: list[scenes.Scene]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (N, 3, S, S) renders of the scenes and bool (N, S, S) subject masks: where the render differs
    from the same scene without its subject (``scenes.background``; both carry the same pixel noise)."""
    out = np.zeros((len(scene_list), SIZE, SIZE, 3), np.uint8)
    masks = np.zeros((len(scene_list), SIZE, SIZE), bool)
    for i, scene in enumerate(tqdm(scene_list, desc="judges: render", unit="scene", leave=False)):
        out[i] = np.asarray(scenes.render(scene, SIZE)[0])
        empty = np.asarray(scenes.background(scene, SIZE))
        masks[i] = np.abs(out[i].astype(np.int16) - empty).mean(axis=2) > MASK_LEVEL
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(masks)


def patch_targets(masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Subject masks (B, S, S) cut into the ViT's patches in its token order (row by row): (B, N, patch²)."""
    b, size = len(masks), masks.shape[-1]
    grid = size // patch
    return masks.reshape(b, grid, patch, grid, patch).permute(0, 1, 3, 2, 4).reshape(b, grid * grid, patch * patch)


def mask_loss(head: torch.nn.Module, patch_tokens: torch.Tensor, masks: torch.Tensor, patch: int) -> torch.Tensor:
    """Binary cross-entropy of the subject's silhouette predicted from each patch token (B, N, D) by ``head``
    (D -> patch²): a dense, training-only signal that teaches a small ViT shapes many times faster than an
    image-level loss alone (on vases' three shapes: 0.9 accuracy after 500 steps, against 0.4 without)."""
    return F.binary_cross_entropy_with_logits(head(patch_tokens), patch_targets(masks, patch))


def _cosine_schedule(optimizer, warmup: int, steps: int):
    """Linear warm-up then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + np.cos(np.pi * (step - warmup) / max(1, steps - warmup)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _weights_bytes(out: Path) -> int:
    return sum(p.stat().st_size for p in out.glob("*.safetensors"))


# ------------------------------------------------------------------------------------------------ CLIP


def clip_tokenizer(folder: Path):
    """The real CLIP tokenizer (``posebooth.embedded.clip_tokenizer_files``), its files written to ``folder``."""
    from transformers import CLIPTokenizer

    from posebooth.embedded import clip_tokenizer_files

    clip_tokenizer_files(folder)
    return CLIPTokenizer(vocab=str(folder / "vocab.json"), merges=str(folder / "merges.txt"), model_max_length=77)


def identifier_words(tokenizer) -> list[str]:
    """Rare whole-word tokens (id >= 20,000, like ``sks``) that name nothing in the world: stand-ins for the
    DreamBooth identifier, so the text tower learns to read past an unknown word before the noun."""
    from posebooth.identifier import COMMON_WORD_MAX_ID

    words = []
    for token, i in tokenizer.get_vocab().items():
        word = token.removesuffix("</w>")
        if COMMON_WORD_MAX_ID <= i < 49406 and token.endswith("</w>") and word.isascii() and word.isalpha():
            if 2 <= len(word) <= 6 and word not in _WORLD_WORDS:
                words.append(word)
    return sorted(words)


def _captions(batch_scenes: list[scenes.Scene], recipe: dict, words: list[str], rng: np.random.Generator) -> list[str]:
    """A fresh caption per scene; a share get a random identifier word before the class noun."""
    out = []
    for scene in batch_scenes:
        text = scenes.caption(scene, rng, recipe["keep"], recipe["class_only"])
        if rng.random() < recipe["identifier"]:
            noun = scene.subject.kind
            text = text.replace(f" {noun}", f" {words[int(rng.integers(len(words)))]} {noun}", 1)
        out.append(text)
    return out


def clip_loss(logits_per_image: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """Symmetric InfoNCE (CLIP, Radford et al. 2021) on (B, B) logits; images whose captions are the same
    text are all positives of that text (soft targets), so "a photo of a robot" is no false negative."""
    ids = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([ids[c] for c in captions])
    target = (label[:, None] == label[None, :]).float()  # (B, B), symmetric
    target = target / target.sum(dim=1, keepdim=True)
    image_loss = -(target * F.log_softmax(logits_per_image, dim=1)).sum(dim=1).mean()
    text_loss = -(target * F.log_softmax(logits_per_image.T, dim=1)).sum(dim=1).mean()
    return (image_loss + text_loss) / 2


def _clip_batch(cells: list[list[int]], recipe: dict, generator: torch.Generator) -> torch.Tensor:
    """(B,) scene indices in ``recipe["groups"]`` groups, each from one random context (``cells``: scene indices
    per context): within a group the place does not tell captions apart, so colour and class words must."""
    groups = min(recipe["groups"], len(cells), recipe["batch"])
    chosen = torch.randperm(len(cells), generator=generator)[:groups].tolist()
    sizes = [recipe["batch"] // groups + (g < recipe["batch"] % groups) for g in range(groups)]
    picks = []
    for cell, size in zip(chosen, sizes, strict=True):
        pool = torch.tensor(cells[cell])
        picks.append(pool[torch.randint(0, len(pool), (size,), generator=generator)])
    return torch.cat(picks)


def train_clip(recipe: dict, out: Path) -> dict:
    """Train the world's CLIP from ``recipe`` and save it into ``out`` (a ``CLIPModel`` in fp16 safetensors and
    a ``CLIPProcessor``: 64 px image processor and the real tokenizer), loadable by
    ``posebooth.backbones.ClipEmbedder(str(out))``. Returns the record also written to ``out/record.json``:
    recipe, seconds, final loss, and zero-shot context, colour and class accuracy on held-out renders from
    another seed, clean and blurred (sigma 1 px)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    out = Path(out)
    torch.set_num_threads(recipe["threads"])
    start, cpu_start = time.perf_counter(), time.process_time()  # wall and CPU seconds (the CPU may be shared)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = clip_tokenizer(Path(tmp))
    words = identifier_words(tokenizer)
    image_processor = CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE})
    rng = np.random.default_rng(recipe["seed"])
    train_scenes = [scenes.sample_scene(rng) for _ in range(recipe["scenes"])]
    pixels, masks = _render(train_scenes)  # (N, 3, S, S) uint8, (N, S, S) bool
    cells: dict[str, list[int]] = {}
    for i, scene in enumerate(train_scenes):
        cells.setdefault(scene.context, []).append(i)
    seconds = {"render": time.perf_counter() - start}

    torch.manual_seed(recipe["seed"])  # the initial weights
    config = CLIPConfig(text_config=CLIP_TEXT, vision_config=CLIP_VISION, projection_dim=CLIP_PROJECTION)
    model = CLIPModel(config).train()
    patch = CLIP_VISION["patch_size"]
    mask_head = torch.nn.Linear(CLIP_VISION["hidden_size"], patch * patch)  # training only (see mask_loss)
    params = [*model.parameters(), *mask_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.0)  # no decay: unused tokens stay
    lr_schedule = _cosine_schedule(optimizer, recipe["warmup"], recipe["steps"])
    generator = torch.Generator().manual_seed(recipe["seed"] + 1)
    caption_rng = np.random.default_rng([recipe["seed"], 1])
    losses = []
    for _ in tqdm(range(recipe["steps"]), desc="judges: CLIP", unit="step"):
        idx = _clip_batch(list(cells.values()), recipe, generator)  # (B,)
        views, view_masks = augment(pixels[idx], recipe["augment"], generator, masks[idx])  # (B, 3, S, S), (B, S, S)
        pixel_values = _normalise(views, image_processor.image_mean, image_processor.image_std)
        captions = _captions([train_scenes[i] for i in idx.tolist()], recipe, words, caption_rng)
        tok = tokenizer(captions, padding=True, truncation=True, return_tensors="pt")
        output = model(input_ids=tok.input_ids, attention_mask=tok.attention_mask, pixel_values=pixel_values)
        patch_tokens = output.vision_model_output.last_hidden_state[:, 1:]  # (B, N, D)
        loss = clip_loss(output.logits_per_image, captions)
        loss = loss + recipe["mask_weight"] * mask_loss(mask_head, patch_tokens, view_masks, patch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        with torch.no_grad():  # CLIP clips the temperature at 100
            model.logit_scale.clamp_(0, np.log(100))
        losses.append(loss.item())
    seconds["train"] = time.perf_counter() - start - sum(seconds.values())

    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.float16).save_pretrained(out, safe_serialization=True)
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    zero_shot_record = evaluate_clip(out, recipe["seed"] + 1000, recipe["eval_scenes"])
    seconds["evaluate"] = time.perf_counter() - start - sum(seconds.values())
    record = {"recipe": recipe, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "cpu_seconds": round(time.process_time() - cpu_start, 1),
              "loss_last_100": float(np.mean(losses[-100:])), "logit_scale": float(model.logit_scale.detach().exp()),
              "weights_bytes": _weights_bytes(out), "zero_shot": zero_shot_record}  # fmt: skip
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def evaluate_clip(folder: Path, seed: int, n: int) -> dict:
    """Zero-shot context, colour and class accuracy of the CLIP in ``folder`` on ``n`` renders from ``seed``
    (contexts in equal shares, every class, never SUBJECT), clean and blurred with sigma 1 px."""
    from posebooth.backbones import ClipEmbedder

    embedder = ClipEmbedder(str(folder))
    rng = np.random.default_rng(seed)
    names = list(CONTEXTS)
    eval_scenes = [scenes.sample_scene(rng, contexts=[names[i % len(names)]]) for i in range(n)]
    clean = [scenes.render(scene, SIZE)[0] for scene in eval_scenes]
    record = {}
    for label, images in (("clean", clean), ("blur_1px", [blur_image(im, 1.0) for im in clean])):
        hits = {"context": [], "colour": [], "class": []}
        for kind in CLASSES:
            mine = [i for i, scene in enumerate(eval_scenes) if scene.subject.kind == kind]
            if not mine:
                continue
            batch = [images[i] for i in mine]
            context = zero_shot(embedder, batch, list(context_prompts(kind).values()))
            colour = zero_shot(embedder, batch, list(colour_prompts(kind).values()))
            hits["context"] += [names[c] == eval_scenes[i].context for c, i in zip(context, mine, strict=True)]
            hits["colour"] += [COLOURS[c] == eval_scenes[i].subject.colour for c, i in zip(colour, mine, strict=True)]
        kind = zero_shot(embedder, images, [f"a photo of a {k}" for k in CLASSES])
        hits["class"] = [CLASSES[k] == scene.subject.kind for k, scene in zip(kind, eval_scenes, strict=True)]
        record[label] = {f"{key}_accuracy": round(float(np.mean(v)), 4) for key, v in hits.items()}
        record[label]["n"] = len(images)
    return record


# ------------------------------------------------------------------------------------------------ DINO


def all_instances() -> list[Instance]:
    """Every instance of the world (every class, colour, shape, marking and build), in a fixed order."""
    return [Instance(kind, colour, *rest) for kind in CLASSES for colour in COLOURS
            for rest in itertools.product(*ATTRIBUTES[kind])]  # fmt: skip


def split_instances(seed: int, held_out: float) -> tuple[list[Instance], list[Instance]]:
    """(training, held-out) instances: SUBJECT is in neither; ``held_out`` of the others, drawn by ``seed``,
    are never trained on (the verification calibration's)."""
    others = [inst for inst in all_instances() if inst != SUBJECT]
    order = np.random.default_rng(seed).permutation(len(others))
    n_held = round(held_out * len(others))
    return [others[i] for i in sorted(order[n_held:])], [others[i] for i in sorted(order[:n_held])]


def attribute_differences(a: Instance, b: Instance) -> int:
    """How many attributes two instances differ in (a class difference counts as 5)."""
    if a.kind != b.kind:
        return 5
    first, second = (a.colour, a.shape, a.marking, a.build), (b.colour, b.shape, b.marking, b.build)
    return sum(x != y for x, y in zip(first, second, strict=True))


ATTRIBUTE_FIELDS = ("kind", "colour", "shape", "marking", "build")


def attribute_labels(instances: list[Instance]) -> torch.Tensor:
    """(N, 5) class indices of each instance's kind, colour, shape, marking and build; shape, marking and build
    are numbered per class (a robot's round head and a vase's round body are different values)."""
    values = {
        field: sorted({(inst.kind, getattr(inst, field)) for inst in all_instances()}) for field in ATTRIBUTE_FIELDS
    }
    return torch.tensor([[values[f].index((inst.kind, getattr(inst, f))) for f in ATTRIBUTE_FIELDS]
                         for inst in instances])  # fmt: skip


def supcon_loss(embeddings: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, L_out) on L2-normalised embeddings (N, D) with
    ``labels`` (N,): every other view with the same label is a positive, all other views the denominator."""
    z = F.normalize(embeddings, dim=-1)
    logits = z @ z.T / temperature  # (N, N)
    self_mask = torch.eye(len(z), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (labels[:, None] == labels[None, :]) & ~self_mask
    if not positive.any(dim=1).all():
        raise ValueError("supcon_loss needs at least two views of every label in the batch")
    return -(log_prob.masked_fill(~positive, 0).sum(dim=1) / positive.sum(dim=1)).mean()


def _shuffled(items: list[int], generator: torch.Generator) -> list[int]:
    return [items[i] for i in torch.randperm(len(items), generator=generator).tolist()]


def _dino_batch(
    near: list[list[int]], family: list[list[int]], recipe: dict, generator: torch.Generator
) -> torch.Tensor:
    """Instance indices for one batch, in groups of ``recipe["family"]`` of the same class and colour: a random
    instance, then its neighbours one shape, marking or build away, then others of its class and colour. Colour
    alone cannot tell a group apart: these are the hard negatives ("is this THE subject or a similar one")."""
    chosen: list[int] = []
    while len(chosen) < recipe["instances"]:
        anchor = int(torch.randint(0, len(near), (1,), generator=generator))
        if anchor in chosen:
            continue
        chosen.append(anchor)
        others = [j for j in family[anchor] if j not in near[anchor]]
        members = [j for j in _shuffled(near[anchor], generator) + _shuffled(others, generator) if j not in chosen]
        chosen += members[: min(recipe["family"] - 1, recipe["instances"] - len(chosen))]
    return torch.tensor(chosen)


def train_dino(recipe: dict, out: Path) -> dict:
    """Train the world's DINO from ``recipe`` and save it into ``out`` (a ``ViTModel`` without pooler in fp16
    safetensors and a 64 px ``ViTImageProcessor``, mean and std 0.5), loadable by
    ``posebooth.backbones.DinoEmbedder(str(out))``; then calibrate subject verification on held-out
    instances (``out/verification.json``). Returns the record also written to ``out/record.json``."""
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    out = Path(out)
    torch.set_num_threads(recipe["threads"])
    start, cpu_start = time.perf_counter(), time.process_time()  # wall and CPU seconds (the CPU may be shared)
    train, held = split_instances(recipe["seed"], recipe["held_out"])
    index = {inst: i for i, inst in enumerate(train)}
    family = [[index[b] for b in train if b.kind == a.kind and b.colour == a.colour and b != a] for a in train]
    near = [[j for j in family[i] if attribute_differences(a, train[j]) == 1] for i, a in enumerate(train)]
    rng = np.random.default_rng(recipe["seed"])
    pool = [scenes.sample_scene(rng, instance=inst) for inst in train for _ in range(recipe["renders"])]
    pixels, masks = _render(pool)
    pixels = pixels.reshape(len(train), recipe["renders"], 3, SIZE, SIZE)  # (I, R, 3, S, S) uint8
    masks = masks.reshape(len(train), recipe["renders"], SIZE, SIZE)  # (I, R, S, S) bool
    seconds = {"render": time.perf_counter() - start}

    labels = attribute_labels(train)  # (I, 5)
    torch.manual_seed(recipe["seed"])
    model = ViTModel(ViTConfig(**DINO_VIT), add_pooling_layer=False).train()
    # Linear attribute classifiers on the CLS token, used in training only: a dense signal that makes the CLS
    # encode head shape, marking and build early, which the contrastive loss alone learns slowly after colour.
    n_values = (attribute_labels(all_instances()).max(dim=0).values + 1).tolist()
    heads = torch.nn.ModuleList(torch.nn.Linear(DINO_VIT["hidden_size"], n) for n in n_values)
    patch = DINO_VIT["patch_size"]
    mask_head = torch.nn.Linear(DINO_VIT["hidden_size"], patch * patch)  # training only (see mask_loss)
    params = [*model.parameters(), *heads.parameters(), *mask_head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=recipe["lr"], weight_decay=0.05)
    lr_schedule = _cosine_schedule(optimizer, recipe["warmup"], recipe["steps"])
    generator = torch.Generator().manual_seed(recipe["seed"] + 1)
    losses = []
    for _ in tqdm(range(recipe["steps"]), desc="judges: DINO", unit="step"):
        chosen = _dino_batch(near, family, recipe, generator)  # (P,)
        views = torch.stack([torch.randperm(recipe["renders"], generator=generator)[: recipe["views"]]
                             for _ in chosen])  # fmt: skip  # (P, V)
        batch = pixels[chosen[:, None], views].flatten(0, 1)  # (P*V, 3, S, S) uint8
        batch_masks = masks[chosen[:, None], views].flatten(0, 1)  # (P*V, S, S) bool
        x, x_masks = augment(batch, recipe["augment"], generator, batch_masks)
        hidden = model(pixel_values=_normalise(x, [0.5] * 3, [0.5] * 3)).last_hidden_state  # (P*V, 1 + N, D)
        cls = hidden[:, 0]  # (P*V, D)
        instance = chosen.repeat_interleave(recipe["views"])  # (P*V,)
        loss = supcon_loss(cls, instance, recipe["temperature"])
        loss = loss + recipe["mask_weight"] * mask_loss(mask_head, hidden[:, 1:], x_masks, patch)
        for head, target in zip(heads, labels[instance].T, strict=True):
            loss = loss + recipe["attribute_weight"] * F.cross_entropy(head(cls), target) / len(heads)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_schedule.step()
        losses.append(loss.item())
    seconds["train"] = time.perf_counter() - start - sum(seconds.values())

    out.mkdir(parents=True, exist_ok=True)
    model.eval().to(torch.float16).save_pretrained(out, safe_serialization=True)
    processor = ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor.save_pretrained(out)
    verification = calibrate_verification(out, held, recipe["seed"] + 1000, recipe["calibration"], recipe["augment"])
    (out / "verification.json").write_text(json.dumps(verification, indent=2) + "\n")
    seconds["calibrate"] = time.perf_counter() - start - sum(seconds.values())
    record = {"recipe": recipe, "seconds": {k: round(v, 1) for k, v in seconds.items()},
              "cpu_seconds": round(time.process_time() - cpu_start, 1),
              "loss_last_100": float(np.mean(losses[-100:])), "instances_trained": len(train),
              "instances_held_out": len(held), "weights_bytes": _weights_bytes(out),
              "verification": verification}  # fmt: skip
    (out / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# -------------------------------------------------------------------------------------- verification


def eer_threshold(positive: Sequence[float], negative: Sequence[float]) -> dict:
    """The equal-error-rate point of verification scores (accept when score >= threshold): the threshold
    midway between two neighbouring scores where the false-accept rate (negatives accepted) and the
    false-reject rate (positives rejected) are closest, the lower total error breaking ties.
    Returns {"threshold", "eer" (their mean there), "far_at_threshold", "frr_at_threshold"}."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"eer_threshold needs positive and negative scores, got {len(pos)} and {len(neg)}")
    values = np.unique(np.concatenate([pos, neg]))
    candidates = np.concatenate([[values[0] - 1e-6], (values[:-1] + values[1:]) / 2, [values[-1] + 1e-6]])
    far = (neg[None, :] >= candidates[:, None]).mean(axis=1)
    frr = (pos[None, :] < candidates[:, None]).mean(axis=1)
    best = np.lexsort((far + frr, np.abs(far - frr)))[0]  # the last key sorts first
    return {"threshold": float(candidates[best]), "eer": float((far[best] + frr[best]) / 2),
            "far_at_threshold": float(far[best]), "frr_at_threshold": float(frr[best])}  # fmt: skip


def verify(scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """(N,) bool: which verification scores pass (score >= threshold)."""
    return scores >= threshold


def subject_scores(embedder, images: list[Image.Image], references: list[Image.Image]) -> torch.Tensor:
    """(N,) verification scores: each image's mean cosine of its DINO CLS embedding to the references'
    (``posebooth.metrics.per_image_cosine``)."""
    return per_image_cosine(embedder.images(images), embedder.images(references))


def load_verification(folder: str | Path) -> dict | None:
    """The calibrated verification record of a world DINO folder; None when it has none (a real DINO)."""
    path = Path(folder) / "verification.json"
    return json.loads(path.read_text()) if path.exists() else None


def calibrate_verification(folder: Path, held: list[Instance], seed: int, cal: dict, aug: dict) -> dict:
    """The EER threshold of subject verification with the DINO in ``folder``, on held-out instances.

    Per held-out instance: ``references`` renders made like the project's subject photos
    (``scenes.subject_photos``); positive queries, other renders of it; negative queries, renders of
    instances one attribute away, of other instances of its class and of other classes (never SUBJECT).
    Every query is blurred with sigma uniform in [0, max_sigma] px, like generated images."""
    from posebooth.backbones import DinoEmbedder

    embedder = DinoEmbedder(str(folder))
    rng = np.random.default_rng(seed)
    everyone = [inst for inst in all_instances() if inst != SUBJECT]
    kinds = ("one_attribute", "same_class", "other_class")
    scores: dict[str, list[float]] = {"positive": [], **{k: [] for k in kinds}}
    for inst in tqdm(held, desc="judges: calibrate", unit="instance", leave=False):
        shots = scenes.subject_photos(int(rng.integers(2**31 - 1)), cal["references"], SIZE, instance=inst)
        references = embedder.images([image for _, image, _ in shots])  # (R, D)
        groups = {
            "positive": [inst] * cal["positives"],
            "one_attribute": [b for b in everyone if attribute_differences(inst, b) == 1],
            "same_class": [b for b in everyone if b.kind == inst.kind and attribute_differences(inst, b) > 1],
            "other_class": [b for b in everyone if b.kind != inst.kind],
        }
        for kind, candidates in groups.items():
            if kind != "positive":
                candidates = [candidates[j] for j in rng.permutation(len(candidates))[: cal[kind]]]
            queries = []
            for query in candidates:
                image = scenes.render(scenes.sample_scene(rng, instance=query), SIZE)[0]
                queries.append(blur_image(image, float(rng.uniform(0, aug["max_sigma"]))))
            scores[kind] += per_image_cosine(embedder.images(queries), references).tolist()
    negative = [s for k in kinds for s in scores[k]]
    point = eer_threshold(scores["positive"], negative)
    far_by_kind = {k: float(np.mean(np.asarray(scores[k]) >= point["threshold"])) for k in kinds}
    return {
        **point,
        "n_positive": len(scores["positive"]),
        "n_negative": len(negative),
        "n_negative_by_kind": {k: len(scores[k]) for k in kinds},
        "far_by_kind": far_by_kind,
        "score": "mean cosine of the CLS embedding to the reference photos",
        "calibrated_on": (
            f"{len(held)} world instances never trained on, {cal['references']} subject-photo-style references "
            f"each; queries blurred with sigma uniform in [0, {aug['max_sigma']}] px; negatives one attribute "
            "away, same class, other class"
        ),
    }
