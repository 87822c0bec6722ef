"""The world's measuring models: tiny training runs save folders that load like real CLIP and DINO (fp16
on disk), deterministically; prompt parsing, zero-shot choice, losses and the verification threshold on
hand-made inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from posebooth.backbones import ClipEmbedder, DinoEmbedder
from posebooth.world import CONTEXTS, SUBJECT, Instance, judges, render, sample_scene


def _tiny_clip(seed: int = 1) -> dict:
    return judges.quick_recipe(judges.CLIP_RECIPE) | {"seed": seed}


def _tiny_dino() -> dict:
    return judges.quick_recipe(judges.DINO_RECIPE)


def _tensors(folder) -> dict[str, torch.Tensor]:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not a dict)


@pytest.fixture(scope="module")
def clip_folder(tmp_path_factory, offline_env):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("clip")
    record = judges.train_clip(_tiny_clip(), out)
    return out, record


@pytest.fixture(scope="module")
def dino_folder(tmp_path_factory, offline_env):
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("dino")
    record = judges.train_dino(_tiny_dino(), out)
    return out, record


def _images(n: int, seed: int = 5):
    rng = np.random.default_rng(seed)
    return [render(sample_scene(rng), 64)[0] for _ in range(n)]


def test_clip_run_saves_fp16_weights_that_load_as_clip(clip_folder):
    out, record = clip_folder
    tensors = _tensors(out)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    assert tensors["text_model.embeddings.token_embedding.weight"].shape == (49408, judges.CLIP_TEXT["hidden_size"])
    embedder = ClipEmbedder(str(out))
    assert embedder.images(_images(3)).shape == (3, judges.CLIP_PROJECTION)
    assert embedder.texts(["a sks robot on the beach", "a dog"]).shape == (2, judges.CLIP_PROJECTION)
    assert record["weights_bytes"] == (out / "model.safetensors").stat().st_size
    for label in ("clean", "blur_1px"):
        assert record["zero_shot"][label]["n"] == 11
        assert 0 <= record["zero_shot"][label]["context_accuracy"] <= 1
    assert json.loads((out / "record.json").read_text())["zero_shot"] == record["zero_shot"]


def test_training_pixels_are_normalised_like_the_saved_processors(clip_folder, dino_folder):
    images = _images(2)
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float() / 255
    for processor, mean, std in (
        (ClipEmbedder(str(clip_folder[0])).processor.image_processor, None, None),
        (DinoEmbedder(str(dino_folder[0])).processor, [0.5] * 3, [0.5] * 3),
    ):
        expected = processor(images=images, return_tensors="pt")["pixel_values"]
        ours = judges._normalise(x, mean or processor.image_mean, std or processor.image_std)
        assert torch.allclose(ours, expected, atol=1e-5)


def test_same_seed_gives_identical_clip_weights_and_another_seed_does_not(clip_folder, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    judges.train_clip(_tiny_clip(), again)
    judges.train_clip(_tiny_clip(seed=2), other)
    first, second, third = _tensors(clip_folder[0]), _tensors(again), _tensors(other)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], third[k]) for k in first)


def test_dino_run_saves_fp16_vit_and_a_calibrated_threshold(dino_folder, tmp_path):
    out, record = dino_folder
    assert {t.dtype for t in _tensors(out).values()} == {torch.float16}
    assert not any(key.startswith("pooler") for key in _tensors(out))
    embedder = DinoEmbedder(str(out))
    assert embedder.images(_images(3)).shape == (3, judges.DINO_VIT["hidden_size"])
    verification = judges.load_verification(out)
    assert verification == record["verification"]
    n_held = record["instances_held_out"]
    assert verification["n_positive"] == n_held and verification["n_negative"] == 3 * n_held
    assert {"threshold", "eer", "far_at_threshold", "frr_at_threshold", "score", "calibrated_on"} <= set(verification)
    assert judges.load_verification(tmp_path) is None


def test_held_out_instances_and_subject_are_never_trained_on():
    train, held = judges.split_instances(seed=3, held_out=0.2)
    everyone = judges.all_instances()
    assert Instance("robot", "red", "round", "none", "normal") in everyone
    assert len(set(everyone)) == len(everyone) == 11 * (3 * 4 * 3 + 3 * 3 * 3 + 3 * 4)
    assert SUBJECT not in train and SUBJECT not in held and not set(train) & set(held)
    assert len(train) + len(held) == len(everyone) - 1 and len(held) == round(0.2 * (len(everyone) - 1))
    assert judges.split_instances(seed=3, held_out=0.2) == (train, held)


def test_dino_batches_come_in_groups_of_one_class_and_colour_with_near_neighbours():
    train, _ = judges.split_instances(seed=0, held_out=0.2)
    family = [[j for j, b in enumerate(train) if (b.kind, b.colour) == (a.kind, a.colour) and b != a] for a in train]
    near = [[j for j in family[i] if judges.attribute_differences(a, train[j]) == 1] for i, a in enumerate(train)]
    generator = torch.Generator().manual_seed(0)
    chosen = judges._dino_batch(near, family, {"instances": 12, "family": 4}, generator).tolist()
    assert len(set(chosen)) == 12
    for start in range(0, 12, 4):
        group = [train[i] for i in chosen[start : start + 4]]
        assert len({(inst.kind, inst.colour) for inst in group}) == 1
        assert judges.attribute_differences(group[0], group[1]) == 1  # the nearest come first


def test_attribute_labels_number_values_per_class():
    labels = judges.attribute_labels(judges.all_instances())
    # every attribute is numbered per class: 11 colours x 3 classes, 3 + 3 + 3 shapes, 4 + 3 + 4 markings, 3 + 3 + 1 builds
    assert (labels.max(dim=0).values + 1).tolist() == [3, 11 * 3, 3 + 3 + 3, 4 + 3 + 4, 3 + 3 + 1]
    robot, vase = Instance("robot", "red", "round", "star", "tall"), Instance("vase", "red", "round", "dots", "normal")
    a, b = judges.attribute_labels([robot, vase])
    assert a[1] != b[1] and a[2] != b[2]  # a red robot is not a red vase; a round head is not a round vase
    assert (
        judges.attribute_labels([robot, Instance("robot", "red", "square", "none", "normal")])[:, 1].unique().numel()
        == 1
    )


def test_context_of_names_only_world_phrases():
    assert judges.context_of("a sks robot on the beach") == "beach"
    assert judges.context_of("A sks robot floating on top of water.") == "water"
    assert judges.context_of("a sks robot with a blue house in the background") == "house"
    assert judges.context_of("a sks robot on a cobblestone street") is None
    assert judges.context_of("a sks robot on top of a white rug") is None
    assert judges.context_of("a photo of a sks robot") is None  # the studio is never named
    for name, prompt in judges.context_prompts("dog").items():
        assert judges.context_of(prompt) == (None if name == "studio" else name)
    assert len(judges.context_prompts("robot")) == len(CONTEXTS)


def test_colour_of_reads_the_subjects_colour_only():
    assert judges.colour_of("a red sks robot") == "red"
    assert judges.colour_of("a purple sks robot on the beach") == "purple"
    assert judges.colour_of("a sks robot on top of pink fabric") is None
    assert judges.colour_of("a sks robot with a blue house in the background") is None
    assert judges.colour_of("a sks robot wearing a red hat") is None
    assert judges.colour_of("a shiny sks robot") is None
    assert judges.colour_of("a gray sks dog") == "grey"
    for colour, prompt in judges.colour_prompts("vase").items():
        assert judges.colour_of(prompt) == colour


class _HandEmbedder:
    """Fixed embeddings: image i is ``images[i]``, text t is ``texts[t]`` (each a vector)."""

    def images(self, images):
        return torch.tensor(images, dtype=torch.float32)

    def texts(self, texts):
        return torch.tensor(texts, dtype=torch.float32)


def test_zero_shot_picks_the_closest_text_by_cosine_not_dot_product():
    images = [[1.0, 0.1], [0.0, 1.0]]
    texts = [[10.0, 10.0], [1.0, 0.0], [0.0, 0.5]]  # text 0 has the largest dot product with both images
    assert judges.zero_shot(_HandEmbedder(), images, texts) == [1, 2]


def test_eer_threshold_on_hand_made_scores():
    point = judges.eer_threshold([0.9, 0.8, 0.7], [0.1, 0.2, 0.75])
    assert 0.7 < point["threshold"] <= 0.75
    assert point["eer"] == pytest.approx(1 / 3)
    assert point["far_at_threshold"] == pytest.approx(1 / 3) and point["frr_at_threshold"] == pytest.approx(1 / 3)
    separated = judges.eer_threshold([0.9, 0.8], [0.3, 0.5])
    assert separated["eer"] == 0 and 0.5 < separated["threshold"] <= 0.8
    with pytest.raises(ValueError, match="positive and negative"):
        judges.eer_threshold([], [0.1])


def test_verify_accepts_scores_at_or_above_the_threshold():
    scores = torch.tensor([0.2, 0.6, 0.9, 0.59])
    assert judges.verify(scores, 0.6).tolist() == [False, True, True, False]


def test_clip_loss_counts_identical_captions_as_positives():
    diagonal = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    even = torch.zeros(2, 2)
    assert judges.clip_loss(diagonal, ["a red robot", "a blue dog"]) < 0.01
    # with the same caption twice, either image is right: spreading over both beats the diagonal
    assert judges.clip_loss(even, ["a robot", "a robot"]) < judges.clip_loss(diagonal, ["a robot", "a robot"])


def test_supcon_loss_is_low_when_views_of_an_instance_agree():
    labels = torch.tensor([0, 0, 1, 1])
    together = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    apart = together[[0, 2, 1, 3]]
    assert judges.supcon_loss(together, labels, 0.1) < 0.01 < judges.supcon_loss(apart, labels, 0.1)
    with pytest.raises(ValueError, match="two views"):
        judges.supcon_loss(together, torch.tensor([0, 1, 2, 2]), 0.1)


def test_gaussian_blur_keeps_sigma_zero_images_and_spreads_a_point_by_sigma():
    images = torch.zeros(2, 1, 15, 15)
    images[:, :, 7, 7] = 1.0
    out = judges.gaussian_blur(images, torch.tensor([0.0, 1.0]), radius=4)
    assert torch.allclose(out[0], images[0])
    assert out[1].sum() == pytest.approx(1.0, abs=1e-5)
    x = torch.arange(-4, 5, dtype=torch.float32)
    g = torch.exp(-(x**2) / 2)
    assert out[1, 0, 7, 7 - 4 : 7 + 5] / out[1, 0, 7, 7] == pytest.approx((g / g[4]).tolist(), abs=1e-5)


def test_augment_is_seeded_and_in_range():
    pixels, _ = judges._render([sample_scene(np.random.default_rng(i)) for i in range(4)])
    a, no_masks = judges.augment(pixels, judges.AUGMENT, torch.Generator().manual_seed(0))
    b, _ = judges.augment(pixels, judges.AUGMENT, torch.Generator().manual_seed(0))
    assert no_masks is None and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert not torch.equal(a, judges.augment(pixels, judges.AUGMENT, torch.Generator().manual_seed(1))[0])
    plain = {key: 0.0 for key in judges.AUGMENT} | {"min_crop": 1.0}
    same, _ = judges.augment(pixels, plain, torch.Generator().manual_seed(0))
    assert torch.allclose(same, pixels.float() / 255, atol=1e-5)  # no augmentation: the render itself


def test_masks_follow_their_image_through_crops_and_mirrors():
    pixels, masks = judges._render([sample_scene(np.random.default_rng(i)) for i in range(4)])
    assert 0.02 < masks.float().mean() < 0.5  # the subject, not the frame
    painted = (masks[:, None].expand(-1, 3, -1, -1) * 255).to(torch.uint8)  # images that are their mask
    geometry = {key: 0.0 for key in judges.AUGMENT} | {"flip": 0.5, "min_crop": 0.6}
    x, moved = judges.augment(painted, geometry, torch.Generator().manual_seed(0), masks)
    assert torch.allclose(x[:, 0], moved, atol=1e-5) and not torch.allclose(moved, masks.float())


def test_patch_targets_follow_the_vit_token_order():
    masks = torch.zeros(1, 64, 64)
    masks[0, 10, 20] = 1  # row 10, column 20: patch (1, 2) of the 8 x 8 grid, pixel (2, 4) inside it
    targets = judges.patch_targets(masks, 8)
    assert targets.shape == (1, 64, 64)
    assert targets.nonzero().tolist() == [[0, 1 * 8 + 2, 2 * 8 + 4]]


def test_identifier_words_name_nothing_in_the_world(clip_folder):
    tokenizer = ClipEmbedder(str(clip_folder[0])).processor.tokenizer
    words = judges.identifier_words(tokenizer)
    assert "sks" in words and len(words) > 1000
    assert not {"red", "robot", "beach", "snow"} & set(words)
    assert all(len(tokenizer.tokenize(word)) == 1 for word in words[:200])
