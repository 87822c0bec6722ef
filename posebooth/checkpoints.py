"""Training checkpoints outside the stage's DVC outputs, so an interrupted stage resumes when re-run.

DVC deletes a stage's outputs before it runs the stage again, so checkpoints live in
``$POSEBOOTH_CACHE/checkpoints/<stage>/<key>/``, where the key hashes the stage's params, the bytes of its
inputs and the workspace's path: a checkpoint is only ever resumed by the same training in the same workspace
(see ``checkpoint_dir``). A checkpoint holds the whole state (trainable weights, optimizer state, lr-scheduler
state, the fp16 gradient scaler's state, the EMA's shadow weights and step count, the training RNG, the step) as
safetensors and JSON, nothing pickled;
it is written atomically and removed once training completes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path

import torch

from posebooth import embedded, outputs

log = logging.getLogger(__name__)


def fingerprint(params: dict, inputs: list[str | Path]) -> str:
    """A key for ``params`` (plain data) and the contents of the files under ``inputs``."""
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for root in inputs:
        files = [Path(root)] if Path(root).is_file() else sorted(p for p in Path(root).rglob("*") if p.is_file())
        for f in files:
            h.update(str(f.relative_to(root) if f != Path(root) else f.name).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:20]


def per_workspace(key: str, root: str | Path = ".") -> str:
    """``key`` made private to the workspace ``root`` (the repository a stage runs in, its working folder
    under DVC), by hashing in its resolved path: a re-run in the same workspace finds the same key."""
    return hashlib.sha256(f"{key}\0{Path(root).resolve()}".encode()).hexdigest()[:20]


def checkpoint_dir(stage: str, key: str, root: str | Path = ".") -> Path:
    """``$POSEBOOTH_CACHE/checkpoints/<stage>/<key>/``, the key made per workspace (``root``)."""
    # Per workspace, not shared like the class-prior cache: a run rewrites its checkpoint (`atomic_dir` also
    # removes its siblings' temporary folders as stale) and deletes it when training completes, so two queued
    # experiments with equal training params (`dvc queue start -j 2`, each in its own `.dvc/tmp/exps/`
    # workspace) would train into one folder and the first to finish would delete the other's (issue 18).
    return embedded.cache_root().parent / "checkpoints" / stage / per_workspace(key, root)


def _split_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer ``state_dict`` as (tensors for safetensors, everything else for JSON)."""
    tensors, scalars = {}, {}
    for idx, entries in state["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"scalars": scalars, "param_groups": state["param_groups"]}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *rest["scalars"].items()]:
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": rest["param_groups"]}


def save(
    folder: Path,
    step: int,
    trainable: dict[str, torch.Tensor],
    optimizer,
    lr_scheduler,
    generator,
    history: list,
    images: Path | None = None,
    scaler=None,
    ema=None,
) -> None:
    """Write the whole training state after ``step`` optimizer steps (with the logged ``history`` of
    per-step values and the ``images`` logged so far, so the plots survive too), replacing any older one.
    ``scaler``: fp16's gradient scaler (``accelerator.scaler``; None without one), whose loss scale and growth
    tracker decide the next steps' updates, so a resumed fp16 run goes on exactly. ``ema``: the EMA of the
    ``trainable`` weights (``training.make_ema`` over them in this order; None without one)."""
    from safetensors.torch import save_file

    opt_tensors, opt_rest = _split_optimizer_state(optimizer.state_dict())
    with outputs.atomic_dir(folder) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(tmp / "trainable.safetensors"))
        save_file(opt_tensors or {"_empty": torch.zeros(0)}, str(tmp / "optimizer.safetensors"))
        save_file({"generator": generator.get_state()}, str(tmp / "rng.safetensors"))
        if ema is not None:  # its step count decides the next decays (training.make_ema): in state.json
            shadow = {k: v.detach().contiguous().cpu() for k, v in zip(trainable, ema.shadow_params, strict=True)}
            save_file(shadow, str(tmp / "ema.safetensors"))
        if images is not None and images.is_dir():
            shutil.copytree(images, tmp / "images")
        outputs.write_json(tmp / "state.json", {
            "step": step, "optimizer": opt_rest, "lr_scheduler": lr_scheduler.state_dict(), "history": history,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "ema_step": ema.optimization_step if ema is not None else None,
        })  # fmt: skip
    log.info("training state of step %d saved in %s", step, folder)
    outputs.failpoint("checkpoint-saved")


def load(
    folder: Path, trainable: dict[str, torch.Tensor], optimizer, lr_scheduler, generator, scaler=None, ema=None
) -> tuple[int, list]:
    """Restore a checkpoint into the live objects (and fp16's gradient ``scaler`` and the ``ema``, when there
    are); returns (optimizer steps already done, logged history)."""
    from safetensors.torch import load_file

    weights = load_file(str(folder / "trainable.safetensors"))
    if set(weights) != set(trainable):
        raise ValueError(f"{folder}: the checkpoint's weights do not match this training; delete the folder")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(weights[name])
    state = json.loads((folder / "state.json").read_text())
    opt_tensors = {k: v for k, v in load_file(str(folder / "optimizer.safetensors")).items() if k != "_empty"}
    optimizer.load_state_dict(_join_optimizer_state(opt_tensors, state["optimizer"]))
    lr_scheduler.load_state_dict(state["lr_scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    if ema is not None:
        if not (folder / "ema.safetensors").exists():
            raise ValueError(f"{folder}: the checkpoint holds no EMA weights but this training has one; delete it")
        shadow = load_file(str(folder / "ema.safetensors"))
        with torch.no_grad():
            for name, s in zip(trainable, ema.shadow_params, strict=True):
                s.copy_(shadow[name])
        ema.optimization_step = int(state["ema_step"])
    generator.set_state(load_file(str(folder / "rng.safetensors"))["generator"])
    return int(state["step"]), state["history"]


def history(folder: Path) -> list:
    """The per-step values logged up to a checkpoint."""
    return json.loads((folder / "state.json").read_text())["history"]


def remove(folder: Path) -> None:
    """Drop a finished training's checkpoint."""
    shutil.rmtree(folder, ignore_errors=True)
