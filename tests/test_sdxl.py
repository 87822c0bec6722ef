"""SDXL: the tiny SDXL-architecture embedded model, what training feeds it (two text encoders, the pooled
embedding, time ids from the recorded crops), and what stage 1 saves loading into stock SDXL pipelines."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionXLPipeline
from PIL import Image

from posebooth import data, methods, outputs, subject, training
from posebooth.diffusion import add_noise
from posebooth.models import (
    added_conditions,
    check_controlnet_fits,
    encode_ids,
    encode_text,
    is_xl,
    load_components,
    load_controlnet,
    sd_pipeline,
    tokenize,
)
from posebooth.prepare import prepare_folder, size_conditioning
from tests.test_methods import subject_latents, train_cfg

SIZE = 32
PROMPT = "a photo of sks robot"


@pytest.fixture(scope="module")
def tiny_xl(offline_env) -> str:
    from posebooth import embedded

    return embedded.resolve("embedded:tiny-sdxl")


@pytest.fixture(scope="module")
def xl_pipe(tiny_xl):
    return sd_pipeline(load_components("embedded:tiny-sdxl"), "ddim")


def test_the_embedded_sdxl_has_the_sdxl_architecture(tiny_xl):
    comp = load_components("embedded:tiny-sdxl")
    assert is_xl("embedded:tiny-sdxl") and not is_xl("embedded:tiny-sd15")
    assert comp.xl and len(comp.tokenizers) == 2
    assert type(comp.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
    assert comp.tokenizer_2.pad_token == "!"  # noqa: S105 (SDXL's second tokenizer pads with "!")
    assert len(comp.tokenizer) == 49408  # the real CLIP vocabulary
    width = comp.text_encoder.config.hidden_size + comp.text_encoder_2.config.hidden_size
    assert comp.unet.config.cross_attention_dim == width  # both encoders' hidden states, concatenated
    assert comp.unet.config.addition_embed_type == "text_time"
    assert comp.unet.config.projection_class_embeddings_input_dim == (
        6 * comp.unet.config.addition_time_embed_dim + comp.text_encoder_2.config.projection_dim
    )
    assert comp.vae.config.scaling_factor == 0.13025
    controlnet = load_controlnet("embedded:tiny-sdxl-openpose")
    check_controlnet_fits(controlnet, comp.unet, "x")  # fits
    with pytest.raises(ValueError, match=r"train_pose.controlnet: .* does not fit the SDXL base .*sdxl"):
        check_controlnet_fits(load_controlnet("embedded:tiny-sd15-openpose"), comp.unet, "train_pose.controlnet")


def test_prompts_are_encoded_as_the_sdxl_pipeline_encodes_them(tiny_xl):
    comp = load_components("embedded:tiny-sdxl")
    hidden, pooled = encode_text(comp, [PROMPT, "a photo of a robot"])
    pipe = sd_pipeline(comp, "ddim")
    embeds, _, pipe_pooled, _ = pipe.encode_prompt([PROMPT, "a photo of a robot"], do_classifier_free_guidance=False)
    assert hidden.shape == (2, 77, 96) and pooled.shape == (2, 32)
    assert torch.equal(hidden, embeds) and torch.equal(pooled, pipe_pooled)
    sd15 = load_components("embedded:tiny-sd15")
    assert encode_text(sd15, [PROMPT])[1] is None and added_conditions(None, None) == {}


@pytest.mark.parametrize(
    ("size", "crop", "original", "crop_top_left"),
    [
        ((300, 200), "centre", [200, 300], [0, 8]),  # landscape: 50 px cut on the left, x 32/200
        ((200, 300), "centre", [300, 200], [8, 0]),  # portrait: 50 px cut at the top
        ((300, 200), "pad", [200, 300], [0, 0]),  # padded: the square reaches outside, nothing cut
        ((64, 64), "centre", [64, 64], [0, 0]),
    ],
)
def test_time_ids_come_from_the_recorded_crops(xl_pipe, tmp_path, size, crop, original, crop_top_left):
    """prepare_images records each photo's original size and crop; training's time ids are what the SDXL
    pipeline's ``_get_add_time_ids`` makes of them."""
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(photos / "a.png")
    kept, _ = prepare_folder(photos, SIZE, 1, crop=crop)
    record = kept[0].record
    assert record["original_size"] == original and record["crop_top_left"] == crop_top_left
    outputs.write_json(tmp_path / "manifest.json", {"images": [record]})
    ids = data.time_ids(tmp_path, [record["name"]], SIZE)
    expected = xl_pipe._get_add_time_ids(
        tuple(original), tuple(crop_top_left), (SIZE, SIZE), torch.float32, text_encoder_projection_dim=32
    )
    assert torch.equal(ids, expected)
    assert data.generated_time_ids(2, SIZE).tolist() == [[SIZE, SIZE, 0, 0, SIZE, SIZE]] * 2


def test_size_conditioning_of_a_face_crop():
    # 400x300 photo, a 300 px square from x=100 (moved towards a face): 100 px cut on the left, x 64/300
    assert size_conditioning((400, 300), (100, 0, 400, 300), 64) == {"original_size": [300, 400],
                                                                      "crop_top_left": [0, 21]}  # fmt: skip


def run_xl_steps(comp, tr: methods.Trainable, t, latents: torch.Tensor, steps: int) -> None:
    """``steps`` optimisation steps as stage 1 takes them on SDXL: the prompt through both (training) text
    encoders, the pooled embedding and the time ids into the UNet."""
    g = torch.Generator().manual_seed(0)
    models = [comp.unet, *comp.text_encoders]
    acc, models, opt, sched = training.prepare(models, tr.groups, t, "cpu", "fp32", steps)
    ids = [i.expand(2, -1) for i in tokenize(comp, [PROMPT])]
    time_ids = data.generated_time_ids(2, SIZE)
    for m in models:
        m.train()
    for _ in range(steps):
        x = latents[torch.randint(0, len(latents), (2,), generator=g)]
        noisy, noise, ts = add_noise(comp.noise_scheduler, x, g)
        hidden, pooled = encode_ids(comp, ids, models[1:])
        pred = models[0](noisy, ts, hidden, **added_conditions(pooled, time_ids)).sample
        training.loss_and_step(acc, comp.noise_scheduler, pred, x, noise, ts, False, t, tr.params, opt, sched)
        tr.after_step()
    for m in models:
        m.eval()


def _image(pipe, **kwargs) -> np.ndarray:
    return pipe(PROMPT, num_inference_steps=3, height=SIZE, width=SIZE, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images[0]  # fmt: skip


def _stock(folder) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(str(folder), add_watermarker=False, use_safetensors=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)  # as the trained side samples
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("case", ["lora_both_text_encoders", "textual_inversion"])
def test_what_stage1_saves_for_sdxl_loads_in_a_stock_sdxl_pipeline(tiny_xl, tmp_path, case):
    """A few SDXL training steps (both text encoders' LoRAs, or one learned row per encoder); the saved files
    load into ``StableDiffusionXLPipeline`` the stock way and give the trained model's images."""
    change = dict(method="lora", train_text_encoder=True) if case.startswith("lora") else dict(method=case)
    t = train_cfg(lr=1e-2, weight_decay=0.0, **change)
    comp = load_components("embedded:tiny-sdxl")
    tr = methods.setup(t.method, comp, t, "sks", "robot")
    assert tr.text_encoder_trains
    assert any(n.startswith("text_encoder_2.") for n in tr.named)  # the second encoder learns too
    if case.startswith("lora"):
        assert any(n.startswith("text_encoder.") for n in tr.named)
    before = {n: p.detach().clone() for n, p in tr.named.items()}
    run_xl_steps(comp, tr, t, subject_latents(comp), 3)
    moved = {n.split(".")[0] for n, p in tr.named.items() if not torch.equal(p.detach(), before[n])}
    assert moved == ({"unet", "text_encoder", "text_encoder_2"} if case.startswith("lora") else
                     {"text_encoder", "text_encoder_2"})  # fmt: skip
    trained = _image(sd_pipeline(comp, "ddim"))

    files = methods.save(t.method, comp, tmp_path, t, "sks")
    stock = _stock(tiny_xl)
    base = _image(stock)
    subject.load_into(stock, tmp_path)
    if case.startswith("lora"):
        assert stock.text_encoder_2.peft_config and stock.text_encoder.peft_config
    else:
        from safetensors import safe_open

        with safe_open(str(files[0]), "pt") as f:
            assert sorted(f.keys()) == ["clip_g", "clip_l"] and f.metadata() == {"token": "sks"}
            assert f.get_tensor("clip_l").shape == (1, 32) and f.get_tensor("clip_g").shape == (1, 64)
    loaded = _image(stock)
    assert np.abs(loaded - trained).max() < 1e-4
    assert np.abs(loaded - base).max() > 1e-3  # and it changed the images


def test_methods_sdxl_does_not_support_stop_before_training():
    with pytest.raises(ValueError, match=r"train.method: 'full' is not available for the SDXL base"):
        methods.check_supported("full", True, "embedded:tiny-sdxl")
    methods.check_supported("full", False, "embedded:tiny-sd15")
    methods.check_supported("textual_inversion", True, "embedded:tiny-sdxl")


def test_common_vae_replaces_the_models_vae(tiny_xl, tmp_path):
    """``common.vae``: a VAE-only folder (like madebyollin/sdxl-vae-fp16-fix, whose config says
    ``force_upcast: false``) is used in place of the model's own, in training and in the pipelines."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_xl, subfolder="vae", use_safetensors=True, force_upcast=False)
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)  # a visibly different decoder
    vae.save_pretrained(tmp_path / "vae", safe_serialization=True)
    own = load_components("embedded:tiny-sdxl")
    comp = load_components("embedded:tiny-sdxl", vae=str(tmp_path / "vae"))
    assert comp.vae.config.force_upcast is False and own.vae.config.force_upcast is True
    pipe = sd_pipeline(comp, "ddim")
    assert pipe.vae is comp.vae
    assert np.abs(_image(pipe) - _image(sd_pipeline(own, "ddim"))).max() > 0.1
    with pytest.raises(FileNotFoundError, match=r"VAE \(common.vae\) .* the folder has no config.json"):
        load_components("embedded:tiny-sdxl", vae=str(tmp_path))


def test_a_vae_made_for_another_model_is_refused(tiny_xl, tiny_sd):
    with pytest.raises(ValueError, match=r"common.vae: .* has scaling_factor 0.18215 but 'embedded:tiny-sdxl'"):
        load_components("embedded:tiny-sdxl", vae=f"{tiny_sd}/vae")


def test_sdxl_in_fp16_with_its_own_vae_encodes_and_generates(tiny_xl):
    """SDXL's own VAE (force_upcast) stays fp16 in the pipelines, which decode in fp32, and encodes the
    training images in fp32; the fp16 weights run on CPU too."""
    from posebooth.models import encode_images

    comp = load_components("embedded:tiny-sdxl", precision="fp16")
    assert comp.vae.dtype == torch.float16 and comp.vae.config.force_upcast
    latents = encode_images(comp.vae, torch.rand(2, 3, SIZE, SIZE) * 2 - 1)
    assert latents.dtype == torch.float32 and torch.isfinite(latents).all() and comp.vae.dtype == torch.float16
    reference = encode_images(load_components("embedded:tiny-sdxl").vae, torch.zeros(1, 3, SIZE, SIZE))
    assert torch.allclose(encode_images(comp.vae, torch.zeros(1, 3, SIZE, SIZE)), reference, atol=2e-2)
    image = _image(sd_pipeline(comp, "ddim"))
    assert image.shape == (SIZE, SIZE, 3) and np.isfinite(image).all()


def test_time_ids_of_zoomed_and_mirrored_views(tmp_path):
    """A 300x200 photo, centre crop (50 px cut on each side), 32 px: resized photo 48 px wide, crop left 8."""
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (300, 200), (90, 40, 20)).save(photos / "a.png")
    kept, _ = prepare_folder(photos, SIZE, 1, crop="centre")
    outputs.write_json(tmp_path / "manifest.json", {"images": [kept[0].record]})
    # the image; its 16 px window at x 0, y 8 (zoom 2); one 16 wide and 15 high (sides rounded on their own)
    windows = [[(0, 0, SIZE, SIZE), (0, 8, 16, 16), (0, 8, 16, 15)]]
    ids = data.view_time_ids(tmp_path, [kept[0].record["name"]], SIZE, windows)
    assert ids.shape == (1, 3, 2, 6)
    assert ids[0, 0, 0].tolist() == [200, 300, 0, 8, 32, 32]
    assert ids[0, 0, 1].tolist() == [200, 300, 0, 8, 32, 32]  # a centred crop mirrors onto itself
    assert ids[0, 1, 0].tolist() == [200, 300, 16, 16, 32, 32]  # (0 + 8) x 2, (8 + 0) x 2
    assert ids[0, 1, 1].tolist() == [200, 300, 16, 48, 32, 32]  # 96 px wide at zoom 2: 96 - 16 - 32
    assert ids[0, 2, 0].tolist() == [200, 300, 17, 16, 32, 32]  # down at zoom 32 / 15: 8 x 2.13 = 17.1
    assert torch.equal(ids[:, 0, 0], data.time_ids(tmp_path, [kept[0].record["name"]], SIZE))


def test_the_first_text_encoders_last_layer_gets_no_lora(tiny_xl):
    """SDXL reads the first encoder's penultimate hidden state only: a LoRA on its last layer would never
    learn (and DDP stops on parameters without gradients)."""
    comp = load_components("embedded:tiny-sdxl")
    tr = methods.setup("lora", comp, train_cfg(method="lora", train_text_encoder=True), "sks", "robot")
    last = comp.text_encoder.config.num_hidden_layers - 1
    te1 = {n for n in tr.named if n.startswith("text_encoder.")}
    assert te1 and not any(f"layers.{last}." in n for n in te1)
    assert any(f"layers.{last}." in n for n in tr.named if n.startswith("text_encoder_2."))
