"""Per-image captions (photo.txt beside photo.jpg, kohya's convention): read by prepare_images, recorded in the
manifest, put into stage 1's prompts by train.caption_template, dropped with train.caption_dropout."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import yaml
from PIL import Image

from posebooth import config, data
from posebooth.config import ConfigError
from posebooth.prepare import prepare_folder, write_prepared
from posebooth.prompts import (
    caption_dropout,
    caption_prompts,
    caption_rows,
    choose_variants,
    instance_prompts,
    prompt_variants,
    with_captions,
)
from tests.conftest import ROOT


def _photo(path, colour):
    Image.new("RGB", (64, 72), colour).save(path)


def test_captions_go_into_the_manifest_and_a_stray_caption_is_counted(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    _photo(src / "photo.jpg", (200, 20, 20))
    (src / "photo.txt").write_text("\ufeff  wearing a red hat, outdoors \n", encoding="utf-8")  # BOM, spaces
    _photo(src / "plain.png", (20, 200, 20))  # no caption file
    _photo(src / "blank.png", (20, 20, 200))
    (src / "blank.txt").write_text(" \n")  # empty caption = none
    (src / "stray.txt").write_text("a caption without its photo")
    kept, skipped = prepare_folder(src, 32, 16)
    assert {k.source.name: k.record["caption"] for k in kept} == {
        "photo.jpg": "wearing a red hat, outdoors", "plain.png": None, "blank.png": None}  # fmt: skip
    assert [(s.source.name, "no image of the same name" in s.reason) for s in skipped] == [("stray.txt", True)]
    write_prepared(tmp_path / "out", kept, skipped)
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert [r["caption"] for r in manifest["images"]] == [k.record["caption"] for k in kept]
    names = [r["name"] for r in manifest["images"]]
    assert data.instance_captions(tmp_path / "out", names[::-1]) == [k.record["caption"] for k in kept][::-1]


def test_a_caption_that_is_not_utf8_names_its_file(tmp_path):
    _photo(tmp_path / "photo.jpg", (200, 20, 20))
    (tmp_path / "photo.txt").write_bytes("a café in Paris".encode("latin-1"))
    with pytest.raises(ValueError, match=r"photo\.txt: the caption is not UTF-8"):
        prepare_folder(tmp_path, 32, 16)


def test_a_captioned_prompt_follows_the_template_with_identifier_and_class():
    prompts = instance_prompts(
        ["a photo of {identifier} {class_noun}", "a rendering of a {subject}"], "sks", "dog", True
    )
    out = caption_prompts(prompts, ["on a beach", "asleep"], "{prompt}, {caption}", "sks", "dog", True)
    assert out == ["a photo of sks dog, on a beach", "a rendering of a sks dog, on a beach",
                   "a photo of sks dog, asleep", "a rendering of a sks dog, asleep"]  # fmt: skip
    bare = caption_prompts(["a photo of sks"], ["asleep"], "{identifier} {class_noun}, {caption}", "sks", "dog", False)
    assert bare == ["sks, asleep"]  # without the class word, as the instance prompts
    assert caption_rows(["a", None, "b", None]).tolist() == [0, -1, 1, -1]


def test_each_sample_gets_its_own_images_caption_with_its_template():
    n_prompts, words = 2, ["smiling"]
    variants = prompt_variants(["p0", "p1"], words) + caption_prompts(["p0", "p1"], ["A", "B"], "{prompt}|{caption}",
                                                                        "sks", "dog", True)  # fmt: skip
    rows = caption_rows(["A", None, "B"])
    idx = torch.tensor([0, 1, 2, 2, 0])  # the samples' images
    chosen = torch.tensor([1, 2, 0, 3, 2])  # p0+word, p1, p0, p1+word, p1
    keep = torch.zeros(5, dtype=torch.bool)
    out = with_captions(chosen, rows[idx], keep, n_prompts, len(words))
    assert [variants[i] for i in out] == ["p0|A", "p1", "p0|B", "p1|B", "p1|A"]


def test_caption_dropout_zero_one_and_half_with_a_fixed_seed():
    rows = torch.zeros(4000, dtype=torch.long)  # every sample's image has a caption (row 0)
    chosen = torch.zeros(4000, dtype=torch.long)
    g = torch.Generator().manual_seed(0)

    def captioned(p):
        return (with_captions(chosen, rows, caption_dropout(4000, p, True, g), 1, 0) > 0).float().mean().item()

    assert captioned(0.0) == 1.0 and captioned(1.0) == 0.0
    assert 0.46 < captioned(0.5) < 0.54
    again = [caption_dropout(50, 0.5, True, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(*again) and 0 < int(again[0].sum()) < 50  # same sequence on a re-run


def test_without_captions_the_prompts_and_the_draws_are_todays():
    templates = instance_prompts(["a photo of a {subject}", "a rendering of a {subject}"], "sks", "dog", False)
    variants = prompt_variants(templates, ["outdoors"])
    captions = [None, None, None]
    assert variants + caption_prompts(templates, [], "{prompt}, {caption}", "sks", "dog", False) == variants
    g, today = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    chosen = choose_variants(8, 2, 1, 0.5, g)
    dropped = caption_dropout(8, 0.5, False, g)  # no caption: nothing drawn
    out = with_captions(chosen, caption_rows(captions)[torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])], dropped, 2, 1)
    assert torch.equal(out, choose_variants(8, 2, 1, 0.5, today))
    assert torch.equal(g.get_state(), today.get_state())  # the rest of the run draws what it always drew


@pytest.mark.parametrize(
    "template, message",
    [
        ("{caption}", r"needs \{caption\} and \{prompt\}"),
        ("{prompt}", r"needs \{caption\}"),
        ("{prompt}, {caption}, {style}", r"may only use .*'style'"),
        ("{prompt}, {caption", r"is not a format string"),
    ],
)
def test_caption_template_must_keep_the_subject(tmp_path, template, message):
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["train"]["caption_template"] = template
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    with pytest.raises(ConfigError, match=r"train\.caption_template: .*" + message):
        config.load(["common", "train"], tmp_path / "params.yaml")


def test_stage1_trains_each_photo_on_its_own_caption(tiny_sd, tmp_path, monkeypatch):
    """One step of train_stage1_appearance with a caption beside every photo and no dropout: each instance
    sample's prompt embedding is one of its own photo's captioned prompts."""
    import sys

    from posebooth import augment
    from posebooth.models import encode_text, load_components
    from stages import prepare_images
    from stages import train_stage1_appearance as stage
    from tests.test_prior_batch import B, Spy, labels, workspace

    params = workspace(tmp_path, monkeypatch, "embedded:tiny-sd15", {"caption_dropout": 0.0, "random_crops": 0})
    photos = sorted(p for p in (tmp_path / "data/subject").iterdir() if p.suffix.lower() in (".png", ".jpg"))
    for k, photo in enumerate(photos):
        photo.with_suffix(".txt").write_text(f"caption number {k}")
    monkeypatch.setattr(sys, "argv", ["prepare_images"])
    prepare_images.main()  # again, now with the captions
    monkeypatch.setattr(augment, "face_boxes", lambda pixels: [None] * len(pixels))
    spy = Spy(monkeypatch, stage)
    monkeypatch.setattr(sys, "argv", ["train_stage1_appearance"])
    stage.main()

    c, t = params["common"], params["train"]
    names = [r["name"] for r in json.loads((tmp_path / "data/prepared/manifest.json").read_text())["images"]]
    captions = data.instance_captions("data/prepared", names)
    assert all(x is not None for x in captions)
    templates = instance_prompts(t["prompt_templates"], c["identifier"], c["class_noun"], t["class_word_in_prompt"])
    per_photo = [caption_prompts(templates, [x], t["caption_template"], c["identifier"], c["class_noun"],
                                 t["class_word_in_prompt"]) for x in captions]  # fmt: skip
    comp = load_components("embedded:tiny-sd15")
    (unet_args, _), (loss_args, _, _) = spy.calls["unet"][0], spy.calls["loss"][0]
    for sample, label in enumerate(labels(loss_args[3][:B])):
        photo = int(label) - 1  # the spy labels photo i's latents i + 1
        own = encode_text(comp, per_photo[photo])[0]  # (T, 77, D)
        assert any(torch.allclose(unet_args[2][sample], row, atol=1e-6) for row in own), (photo, per_photo[photo])
