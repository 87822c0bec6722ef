"""FID and KID through torch-fidelity, with Inception weights loaded safely and subset sizes that fit.

torch-fidelity's own ``feature_extractor_weights_path`` option reads the file with
``torch.load(weights_only=False)``, which can run code hidden in a pickle. posebooth loads the InceptionV3
weights itself (``weights_only=True``, or a ``.safetensors`` file) and registers the extractor under its
own name. KID's default subset size (1000) fails on the few images a personalisation run makes: it is
set to the size of the smaller set, and the numbers say how many images they rest on.

``embedded:tiny-inception`` is a small random network registered the same way: it tests the code path
offline and measures nothing (``stand_in``).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
SAFE_INCEPTION = "posebooth-inception-v3-safe"
TINY = "embedded:tiny-inception"


class _Images(torch.utils.data.Dataset):
    """PIL images as the uint8 (3, H, W) tensors torch-fidelity's extractors read."""

    def __init__(self, images):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.images[i].convert("RGB"), dtype=np.uint8).copy()).permute(2, 0, 1)


def _tiny_extractor_class():
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase

    class TinyExtractor(FeatureExtractorBase):
        """A fixed random conv net (seeded) with 64 features: the offline stand-in for InceptionV3."""

        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)
            g = torch.Generator().manual_seed(0)
            self.conv1 = torch.nn.Conv2d(3, 16, 3, stride=2)
            self.conv2 = torch.nn.Conv2d(16, 64, 3, stride=2)
            with torch.no_grad():
                for p in self.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.2)
            self.requires_grad_(False)
            self.eval()

        @staticmethod
        def get_provided_features_list():
            return ("64",)

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return "64"

        @staticmethod
        def can_be_compiled():
            return False

        @staticmethod
        def get_dummy_input_for_compile():
            return None

        def forward(self, x):
            x = torch.nn.functional.interpolate(x.float() / 255.0, size=(64, 64), mode="bilinear", align_corners=False)
            x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
            return (x.mean(dim=(2, 3)).double(),)

    return TinyExtractor


def _safe_inception_class(weights: str):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    state = load_inception_state(weights)

    class SafeInceptionV3(FeatureExtractorInceptionV3):
        """torch-fidelity's InceptionV3 with weights posebooth loaded safely."""

        def __init__(self, name, features_list, **kwargs):
            # The parent builds the layers, then loads weights with torch.load(weights_only=False) from the
            # path it is given: hand it the already-loaded (safe) state dict instead.
            with _loaded_state(state):
                super().__init__(name, features_list, feature_extractor_weights_path="<posebooth: loaded safely>")

    return SafeInceptionV3


@contextlib.contextmanager
def _loaded_state(state: dict):
    original = torch.load
    torch.load = lambda *args, **kwargs: state  # only within the parent's constructor
    try:
        yield
    finally:
        torch.load = original


def load_inception_state(weights: str) -> dict:
    """InceptionV3 weights from a local ``.safetensors``/``.pth`` file, or (``""``) torch-fidelity's
    release file through torch hub's cache; ``.pth`` files are read with ``weights_only=True``."""
    from posebooth import hub

    path = hub.release_file(
        weights,
        INCEPTION_URL,
        "evaluate.inception_weights",
        "InceptionV3 weights for FID/KID (or set evaluate.fid_model: none)",
    )
    return hub.load_weights(path)


def register(model: str, inception_weights: str = "") -> str:
    """Register the extractor for ``model`` (``inception-v3`` or ``embedded:tiny-inception``) with
    torch-fidelity; returns its registered name."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

    name = {"inception-v3": SAFE_INCEPTION, TINY: "posebooth-tiny-inception"}.get(model)
    if name is None:
        raise ValueError(f"evaluate.fid_model: {model!r}; choose inception-v3, {TINY} or none")
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        cls = _tiny_extractor_class() if model == TINY else _safe_inception_class(inception_weights)
        register_feature_extractor(name, cls)
    return name


def features(images: list, extractor: str) -> torch.Tensor:
    """The extractor's FID/KID features (N, D) of PIL images, computed once."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    from torch_fidelity.utils import create_feature_extractor, get_featuresdict_from_dataset

    layer = FEATURE_EXTRACTORS_REGISTRY[extractor].get_default_feature_layer_for_metric("fid")
    fe = create_feature_extractor(extractor, [layer], cuda=False, verbose=False)
    out = get_featuresdict_from_dataset(
        _Images(images), fe, batch_size=16, cuda=False, save_cpu_ram=True, verbose=False
    )
    return out[layer].double()


def _fid(f1: torch.Tensor, f2: torch.Tensor) -> float:
    from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric

    stats_1, stats_2 = fid_features_to_statistics(f1), fid_features_to_statistics(f2)
    return float(fid_statistics_to_metric(stats_1, stats_2, verbose=False)["frechet_inception_distance"])


def _kid(f1: torch.Tensor, f2: torch.Tensor, subset: int, seed: int) -> tuple[float, float]:
    from torch_fidelity.metric_kid import kid_features_to_metric

    out = kid_features_to_metric(f1, f2, kid_subsets=100, kid_subset_size=subset, rng_seed=seed, verbose=False)
    return out["kernel_inception_distance_mean"], out["kernel_inception_distance_std"]


def fid_kid(generated: list, references: list, extractor: str, seed: int = 0, resamples: int = 100) -> dict:
    """FID and KID between two image sets from features computed once, KID's subset size the size of the
    smaller set, each with a 95 % bootstrap interval over the generated images (``resamples`` draws with
    replacement); ``n_generated`` and ``n_references`` say what they rest on."""
    if len(generated) < 2 or len(references) < 2:
        raise ValueError(f"FID/KID need at least 2 images per set, got {len(generated)} and {len(references)}")
    f_gen, f_ref = features(generated, extractor), features(references, extractor)
    subset = min(len(generated), len(references))
    fid = _fid(f_gen, f_ref)
    kid, kid_std = _kid(f_gen, f_ref, subset, seed)
    rng = np.random.default_rng(seed)
    fids, kids = [], []
    for _ in range(resamples):
        draw = f_gen[torch.from_numpy(rng.integers(0, len(f_gen), len(f_gen)))]
        fids.append(_fid(draw, f_ref))
        kids.append(_kid(draw, f_ref, subset, seed)[0])
    (fid_lo, fid_hi), (kid_lo, kid_hi) = np.quantile(fids, [0.025, 0.975]), np.quantile(kids, [0.025, 0.975])
    return {
        "fid": round(fid, 4), "fid_ci_low": round(float(fid_lo), 4), "fid_ci_high": round(float(fid_hi), 4),
        "kid": round(kid, 6), "kid_std": round(kid_std, 6), "kid_ci_low": round(float(kid_lo), 6),
        "kid_ci_high": round(float(kid_hi), 6), "kid_subset_size": subset,
        "n_generated": len(generated), "n_references": len(references),
    }  # fmt: skip
