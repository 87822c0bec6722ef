"""Learning rates at every optimizer step of ``training.prepare``'s schedules, in one process or under
``accelerate launch`` (the main process prints them as JSON): tests/test_gpu_paths.py compares the two."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import yaml

from posebooth import config, training

TRAIN = yaml.safe_load((Path(__file__).resolve().parents[1] / "params.yaml").read_text())["train"]


def rates(schedule: str, accumulation: int, steps: int = 8, warmup: int = 3) -> list[float]:
    """The learning rate after each of ``steps`` optimizer steps of ``schedule`` (micro-steps: x ``accumulation``)."""
    t = config.build_section("train", TRAIN | {
        "lr_scheduler": schedule, "lr_warmup_steps": warmup, "steps": steps, "gradient_accumulation_steps": accumulation,
    })  # fmt: skip
    model = torch.nn.Linear(2, 1)
    accelerator, (model,), optimizer, lr_scheduler = training.prepare([model], model.parameters(), t, "cpu", "fp32")
    seen = []
    for _ in range(steps * accumulation):
        with accelerator.accumulate(model):
            accelerator.backward(model(torch.ones(1, 2)).sum())
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            if accelerator.sync_gradients:
                seen.append(lr_scheduler.get_last_lr()[0])
    return seen


if __name__ == "__main__":
    cases = [("constant_with_warmup", 1), ("linear", 1), ("cosine", 1), ("cosine", 2)]
    found = {f"{name} x{acc}": rates(name, acc) for name, acc in cases}
    if training.is_main_process():
        json.dump(found, sys.stdout)
