"""How far a trained DoRA's UI export depends on the loader's DoRA formula (README, "Adapters").

PEFT's DoRA sets each output row of M = W + (α/r)·up·down to its magnitude m. ComfyUI and Forge divide M's rows by
the base weight's row norm ‖W‖; LyCORIS (and ComfyUI's open pull request 15458) by ‖M‖. posebooth's export
targets the first, so in a loader of the second kind each row comes out scaled by ‖W‖/‖M‖. This prints the
per-row ratio ‖M‖/‖W‖ over every module of a trained DoRA (stage 1's folder, its base model read from its
provenance.json): how much the two formulas differ for that adapter.

    dvc exp run -S train.adapter=dora   # or any stage-1 folder trained with train.adapter: dora
    python benchmarks/dora_row_scale.py [models/stage1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch


def row_ratios(stage1: Path) -> torch.Tensor:
    """‖M_row‖ / ‖W_row‖ for every output row of every module of the DoRA saved in ``stage1``."""
    from posebooth import exports

    state, config = exports.read_adapter(stage1)
    if exports.saved_adapter_kind(stage1) != "dora":
        raise SystemExit(f"{stage1}: not a DoRA (train.adapter: dora)")
    base = exports.base_weights_from_provenance(stage1)
    ratios = []
    for (part, module), w in sorted(exports.adapter_modules(state).items()):
        alpha, rank = exports._alpha_and_rank(part, config[part])
        weight = base(part, module).double()
        merged = weight + exports.lora_delta(w["down"], w["up"], alpha / rank)
        ratios.append(merged.flatten(1).norm(dim=1) / weight.flatten(1).norm(dim=1))
    return torch.cat(ratios)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage1", nargs="?", default="models/stage1")
    r = row_ratios(Path(parser.parse_args().stage1))
    dev = (r - 1).abs()
    print(f"rows {r.numel()}  ‖M‖/‖W‖ mean {r.mean():.4f} min {r.min():.4f} max {r.max():.4f}  "
          f"|ratio - 1| mean {dev.mean():.4f} p99 {dev.quantile(0.99):.4f} max {dev.max():.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
