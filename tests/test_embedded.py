"""The embedded tiny model: real tokenizer, SD 1.5 architecture, deterministic, loaded via from_pretrained."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from posebooth import embedded, hub
from posebooth.models import load_components, load_controlnet


def test_real_clip_tokenizer(tiny_sd):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd, subfolder="tokenizer")
    assert len(tok) == 49408
    assert tok.model_max_length == 77
    assert tok.tokenize("sks") == ["sks</w>"]  # the DreamBooth identifier is one token
    assert len(tok.tokenize("pkblz")) > 1  # the seed project's identifier splits
    ids = tok("a photo of sks robot").input_ids
    assert ids[0] == 49406 and ids[-1] == 49407  # <|startoftext|> ... <|endoftext|>


def test_architecture(tiny_sd):
    comp = load_components("embedded:tiny-sd15")
    assert type(comp.unet).__name__ == "UNet2DConditionModel"
    assert comp.unet.config.cross_attention_dim == comp.text_encoder.config.hidden_size
    assert len(comp.vae.config.block_out_channels) == 4  # 3 downsamplings: 8x like SD's VAE
    x = torch.zeros(1, 3, 64, 64)
    assert comp.vae.encode(x).latent_dist.mode().shape == (1, 4, 8, 8)
    controlnet = load_controlnet("embedded:tiny-sd15-openpose")
    down, mid = controlnet(
        torch.zeros(1, 4, 8, 8), torch.tensor([10]), encoder_hidden_states=torch.zeros(1, 77, 32),
        controlnet_cond=torch.zeros(1, 3, 64, 64), return_dict=False,
    )  # fmt: skip
    assert mid.shape[0] == 1 and len(down) > 0
    assert all(not p.requires_grad for p in comp.unet.parameters())  # loaded frozen


def test_build_is_deterministic(tmp_path, tiny_sd):
    embedded.build_tiny_sd15(tmp_path / "again")

    def digest(folder: Path) -> dict[str, str]:
        return {
            str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*.safetensors"))
        }

    assert digest(tmp_path / "again") == digest(Path(tiny_sd))
    assert len(digest(Path(tiny_sd))) == 4  # text encoder, VAE, UNet, ControlNet


def test_cache_is_keyed_by_builder_hash(tiny_sd):
    assert Path(tiny_sd).name.endswith(embedded.builder_hash())
    assert Path(embedded.resolve("embedded:tiny-sd15-openpose")) == Path(tiny_sd) / "controlnet"


def test_refs(tiny_sd):
    assert (
        embedded.resolve("stable-diffusion-v1-5/stable-diffusion-v1-5") == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    )
    with pytest.raises(ValueError, match="unknown embedded model 'embedded:huge'"):
        embedded.resolve("embedded:huge")


@pytest.mark.parametrize("offline_flag", ["1", ""])
def test_hub_id_offline_fails_fast_and_clearly(offline_env, monkeypatch, offline_flag, refused_connections):
    """With HF_HUB_OFFLINE, or with a Hub that does not answer, the error comes at once and says what to do."""
    monkeypatch.setenv("HF_HUB_OFFLINE", offline_flag)
    hub.reachable.cache_clear()
    # Every connection is refused: a Hub that does not answer (also on a machine that has the network).
    with pytest.raises(OSError, match=r"base model 'nobody/no-such-model' is not on this machine.*hf download"):
        load_components("nobody/no-such-model")
    # At once: one probe without the flag, none with it; no download (huggingface_hub alone retries for ~25 s).
    assert len(refused_connections) == (0 if offline_flag else 1)
    with pytest.raises(OSError, match=r"ControlNet 'nobody/cn' is not on this machine"):
        load_controlnet("nobody/cn")
    hub.reachable.cache_clear()


def test_local_folder_without_model(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"base model .* the folder has no unet/config.json"):
        load_components(str(tmp_path))
