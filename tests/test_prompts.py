"""Stage-1 training prompts: without the class word, random templates, descriptive words with probability p."""

from __future__ import annotations

import torch

from posebooth.prompts import TI_TEMPLATES, choose_variants, instance_prompts, prompt_variants


def test_instance_prompts_with_and_without_the_class_word():
    templates = ["a photo of {identifier} {class_noun}", "a rendering of a {subject}"]
    assert instance_prompts(templates, "sks", "robot", True) == ["a photo of sks robot", "a rendering of a sks robot"]
    assert instance_prompts(templates, "sks", "robot", False) == ["a photo of sks", "a rendering of a sks"]
    assert len(instance_prompts(TI_TEMPLATES, "sks", "dog", True)) == len(TI_TEMPLATES)


def test_variants_and_their_choice():
    variants = prompt_variants(["p0", "p1"], ["smiling", "outdoors"])
    assert variants == ["p0", "p0, smiling", "p0, outdoors", "p1", "p1, smiling", "p1, outdoors"]
    g = torch.Generator().manual_seed(0)
    never = choose_variants(2000, 2, 2, 0.0, g)
    assert set(never.tolist()) == {0, 3}  # plain prompts only
    always = choose_variants(2000, 2, 2, 1.0, g)
    assert set(always.tolist()) == {1, 2, 4, 5}
    some = choose_variants(4000, 2, 2, 0.1, g)
    with_word = sum(i not in (0, 3) for i in some.tolist()) / len(some)
    assert 0.07 < with_word < 0.13  # about p
    assert torch.equal(choose_variants(5, 2, 2, 0.5, torch.Generator().manual_seed(3)),
                       choose_variants(5, 2, 2, 0.5, torch.Generator().manual_seed(3)))  # fmt: skip
    assert set(choose_variants(100, 3, 0, 0.5, g).tolist()) == {0, 1, 2}  # no words: never an offset
