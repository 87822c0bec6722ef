"""train_stage1_appearance in the current folder, then this process's trained weights written to
``weights_rank<RANK>.safetensors`` (only the main process writes the stage's outputs): run once with plain
``python`` and once under ``accelerate launch``, tests/test_two_processes.py compares them."""

from __future__ import annotations

import os
import sys

from safetensors.torch import save_file

from posebooth import methods, outputs


def main() -> None:
    """Run the stage with ``methods.setup`` watched, then save what the last phase trained, as this process holds it."""
    from stages import train_stage1_appearance

    trained, setup = [], methods.setup

    def watched(*args, **kwargs):
        trained.append(setup(*args, **kwargs))
        return trained[-1]

    methods.setup = watched
    sys.argv = ["stages/train_stage1_appearance.py"]
    try:
        train_stage1_appearance.main()
    finally:
        methods.setup = setup
    weights = {name: p.detach().float().contiguous() for name, p in sorted(trained[-1].named.items())}
    save_file(weights, f"weights_rank{os.environ.get('RANK', '0')}.safetensors")


if __name__ == "__main__":
    outputs.setup_logging()  # the stage's log, as run_stage sets it up
    main()
