"""Feature extractors behind the metrics: CLIP, DINO and LPIPS, from a hub id, a folder or a stand-in.

``embedded:tiny-clip`` / ``embedded:tiny-dino`` and LPIPS ``random-alex`` are random networks that
run offline: numbers made with them test the code and measure nothing, and are marked as stand-ins.
``embedded:world-clip`` / ``embedded:world-dino`` are trained on the procedural world (posebooth/world):
their numbers measure the world's images, and are marked as such.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from posebooth import embedded, hub


def is_world(ref: str) -> bool:
    """True for the world's measuring models (``embedded:world-*``): trained, but on the procedural world."""
    return ref.startswith(embedded.PREFIX + "world")


def is_stand_in(ref: str) -> bool:
    """True for backbones whose numbers measure nothing (random embedded networks)."""
    return (embedded.is_embedded(ref) and not is_world(ref)) or ref.startswith("random-")


def source(ref: str) -> str:
    """Where a measuring model's numbers come from: "world" (the procedural world's models), "stand-in"
    (random weights: they measure nothing) or "real" (a model trained on photographs)."""
    return "world" if is_world(ref) else "stand-in" if is_stand_in(ref) else "real"


def _load_error(ref: str, err: Exception) -> OSError:
    return OSError(
        f"cannot load metric backbone {ref!r}: {err}. It comes from the Hugging Face Hub: {hub.how_to_get(ref)}"
    )


def _load(ref: str, model_loader, processor_loader, device: str):
    """``(model, processor)`` of ``ref`` in eval mode on ``device``; a hub id that is not on this machine
    fails at once when the Hub is unreachable, naming the model and how to get it."""
    if not embedded.is_embedded(ref):
        hub.require(ref, "config.json", "metric backbone")
    path = embedded.resolve(ref)
    try:
        return model_loader(path).eval().to(device), processor_loader(path)
    except OSError as err:
        raise _load_error(ref, err) from err


def _features(out) -> torch.Tensor:
    """transformers 5 returns an output object whose ``pooler_output`` is the projected embedding."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipEmbedder:
    """CLIP image and text embeddings (projected, as in CLIP-I and CLIP-T)."""

    def __init__(self, ref: str, device: str = "cpu"):
        from transformers import CLIPModel, CLIPProcessor

        self.model, self.processor = _load(
            ref, lambda p: CLIPModel.from_pretrained(p, use_safetensors=True), CLIPProcessor.from_pretrained, device
        )
        self.device = device

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        """(N, D) image embeddings."""
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return _features(self.model.get_image_features(pixel_values=pixels))

    @torch.no_grad()
    def texts(self, texts: list[str]) -> torch.Tensor:
        """(N, D) text embeddings."""
        tok = self.processor.tokenizer(texts, padding=True, truncation=True, return_tensors="pt").to(self.device)
        return _features(self.model.get_text_features(**tok))


class DinoEmbedder:
    """DINO ViT CLS-token embeddings: ``last_hidden_state[:, 0]`` (not ``pooler_output``). ``calibration``:
    the model folder's ``verification.json`` (the same-instance threshold of the mean cosine to the reference
    photos, calibrated on held-out instances; the world's DINO has one), or None."""

    def __init__(self, ref: str, device: str = "cpu"):
        from transformers import AutoImageProcessor, ViTModel

        self.model, self.processor = _load(
            ref,
            lambda p: ViTModel.from_pretrained(p, add_pooling_layer=False, use_safetensors=True),
            AutoImageProcessor.from_pretrained,
            device,
        )
        self.device = device
        calibration = Path(embedded.resolve(ref)) / "verification.json"
        self.calibration = json.loads(calibration.read_text()) if calibration.is_file() else None

    @torch.no_grad()
    def images(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"].to(self.device)
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


def lpips_distance(net: str, device: str = "cpu"):
    """An LPIPS distance (inputs in [-1, 1]); ``random-alex`` uses a random AlexNet and runs offline."""
    import warnings

    import lpips

    warnings.filterwarnings("ignore", message=".*(pretrained|weights).*deprecated.*", category=UserWarning)
    if net == "random-alex":
        torch.manual_seed(0)  # a fixed random backbone, so the stand-in number is reproducible
        model = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False)
    else:
        try:
            model = lpips.LPIPS(net=net, verbose=False)
        except (OSError, RuntimeError) as err:  # torchvision downloads the backbone on first use
            raise OSError(
                f"evaluate.lpips_net={net!r}: LPIPS needs torchvision's {net} weights (downloaded to "
                f"$TORCH_HOME/hub/checkpoints on first use) and could not get them: {err}"
            ) from err
    return model.eval().to(device)
