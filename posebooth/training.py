"""Pieces both training stages share: batch sampling, the optimizer, step logging with dvclive and trackers."""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch

from posebooth import outputs

log = logging.getLogger(__name__)


def sample_indices(n: int, batch_size: int, generator: torch.Generator) -> torch.Tensor:
    """``batch_size`` random indices into ``n`` items (with replacement, so tiny sets still fill a batch)."""
    return torch.randint(0, n, (batch_size,), generator=generator)


def is_main_process() -> bool:
    """Whether this is the process that writes (rank 0 under ``accelerate launch``; the only one otherwise)."""
    return int(os.environ.get("RANK", "0")) == 0


class Shard:
    """This process's part of each global batch when a stage runs under ``accelerate launch``.

    Every process draws the random numbers of the whole global batch (``world`` x the per-process batch)
    from the same seeded generator and keeps its own slice: the generators of all processes stay in step,
    so the main process's checkpoint restores every one of them, and a single process draws exactly what
    the loop always drew.
    """

    def __init__(self, accelerator=None):
        self.rank = accelerator.process_index if accelerator else 0
        self.world = accelerator.num_processes if accelerator else 1

    @property
    def rank_world(self) -> tuple[int, int]:
        return self.rank, self.world

    def take(self, drawn: torch.Tensor, b: int) -> torch.Tensor:
        """This process's ``b`` of the ``world * b`` values ``drawn``."""
        return drawn[self.rank * b : (self.rank + 1) * b]

    def indices(self, n: int, b: int, generator: torch.Generator) -> torch.Tensor:
        return self.take(sample_indices(n, b * self.world, generator), b)

    def rand(self, b: int, generator: torch.Generator) -> torch.Tensor:
        return self.take(torch.rand(b * self.world, generator=generator), b)


def on_main_process(accelerator, write) -> None:
    """Call ``write()`` on the main process only (under ``accelerate launch`` only it writes checkpoints and
    outputs), then hold every process until it is done, so that none reads or moves on too early."""
    if accelerator.is_main_process:
        write()
    accelerator.wait_for_everyone()


class NullLog:
    """What processes other than the main one log under ``accelerate launch``: nothing."""

    history: list = []
    images_dir = None

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def autocast(device: str, precision: str):
    """Mixed precision for the forward pass: frozen weights run in ``precision``, trained ones stay fp32."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    return torch.autocast(device_type=device, dtype=dtype or torch.float32, enabled=dtype is not None)


def make_accelerator(
    device: str, precision: str, gradient_accumulation_steps: int, log_with: list[str] = (), project_dir=None
):
    """An ``accelerate.Accelerator``: mixed precision (with a gradient scaler for fp16), gradient
    accumulation, and multi-GPU / multi-node training when the stage runs under ``accelerate launch``.
    ``log_with``: accelerate's trackers (``common.trackers``), started by ``StepLog.track`` under ``project_dir``."""
    from accelerate import Accelerator

    check_trackers(log_with)
    return Accelerator(
        mixed_precision={"fp32": "no", "fp16": "fp16", "bf16": "bf16"}[precision],
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=device == "cpu",
        log_with=list(log_with) or None,
        project_dir=str(project_dir) if project_dir else None,
    )


# common.trackers: the trackers accelerate runs beside dvclive, and the package each needs (accelerate itself
# only warns and skips a tracker whose package is missing: here that is an error)
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_trackers(trackers) -> None:
    """Raise ``ValueError`` naming the key for an unknown tracker, or naming the package to install."""
    import importlib.util

    for name in trackers:
        if name not in TRACKER_PACKAGES:
            raise ValueError(f"common.trackers: unknown tracker {name!r}; choose from {list(TRACKER_PACKAGES)}")
        if importlib.util.find_spec(TRACKER_PACKAGES[name]) is None:
            raise ValueError(
                f"common.trackers: {name} needs the {TRACKER_PACKAGES[name]} package "
                f"(pip install {TRACKER_PACKAGES[name]}), or remove {name!r} from common.trackers"
            )


def tracker_dir(stage: str) -> Path:
    """``$POSEBOOTH_CACHE/trackers/<stage>/<start time>/``: a new folder for this run's TensorBoard events and
    W&B run, outside the stage's DVC outputs (DVC deletes those before a re-run; tracker runs differ from run
    to run, so they are no output), and kept across runs: ``tensorboard --logdir $POSEBOOTH_CACHE/trackers``."""
    from posebooth import embedded

    return embedded.cache_root().parent / "trackers" / stage / time.strftime("%Y%m%d-%H%M%S")


def make_optimizer(params, lr: float, weight_decay: float, kind: str = "adamw", min_8bit_size: int = 4096):
    """AdamW as in diffusers' DreamBooth and ControlNet scripts, bitsandbytes' 8-bit AdamW, Prodigy or Adafactor.

    ``params`` may be parameters or param groups (dicts with their own ``lr``). bitsandbytes keeps fp32
    state for tensors with fewer than ``min_8bit_size`` elements. Prodigy (Mishchenko and Defazio 2023,
    prodigyopt) estimates the step size itself: ``lr`` multiplies its estimate, 1.0 by convention. Adafactor
    (Shazeer and Stern 2018, transformers' implementation) runs with the configured ``lr``: no relative step,
    no parameter scaling, no warmup init, as diffusers' and kohya's users run it.
    """
    params = list(params)
    if not params or any(isinstance(g, dict) and not list(g["params"]) for g in params):
        raise ValueError("nothing to train: no parameter (or an empty parameter group) requires a gradient")
    if kind == "adamw":  # foreach: one kernel per op over all tensors, not a Python loop per tensor (CPU too)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, foreach=True)
    if kind == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError as err:
            raise ValueError("optimizer: adamw_8bit needs bitsandbytes (pip install bitsandbytes)") from err
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=min_8bit_size)
    if kind == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError as err:
            raise ValueError("optimizer: prodigy needs prodigyopt (pip install prodigyopt)") from err
        lrs = [g.get("lr", lr) if isinstance(g, dict) else lr for g in params]
        if any(not 0.1 <= x <= 10.0 for x in lrs):  # a likely AdamW rate (1e-4) makes Prodigy take tiny steps
            log.warning(
                "optimizer: prodigy with lr %s; Prodigy finds the step size itself and lr scales it: "
                "use lr 1.0 (the convention) unless you mean to scale it",
                lrs,
            )
        return Prodigy(params, lr=lr, weight_decay=weight_decay)
    if kind == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, weight_decay=weight_decay, relative_step=False, scale_parameter=False, warmup_init=False
        )
    raise ValueError(f"optimizer: unknown optimizer {kind!r}; choose adamw, adamw_8bit, prodigy or adafactor")


def make_lr_scheduler(optimizer, name: str, warmup_steps: int, total_steps: int):
    """diffusers' learning-rate schedules (constant, constant_with_warmup, linear, cosine) over optimizer steps."""
    from diffusers.optimization import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)


def make_ema(params, decay: float):
    """diffusers' ``EMAModel`` over ``params`` (a list, stepped and copied back in this order), or None when
    ``decay`` (``ema_decay``) is 0.

    diffusers' schedule without ``use_ema_warmup``, as its train_text_to_image.py runs it: the first optimizer
    step copies the weights, step n (from 2) mixes with decay min(decay, n / (n + 9)). ``decay`` is thus a cap,
    reached after about 9 / (1 - decay) steps (9,000 for 0.999): a short DreamBooth run is not pulled back
    towards its first steps (a LoRA's first steps are nearly zero). The shadow weights live beside the weights,
    on their device."""
    if decay == 0:
        return None
    from diffusers.training_utils import EMAModel

    return EMAModel(list(params), decay=decay, use_ema_warmup=False, foreach=True)


def _without_gpu_figures_unless_nvml_loads() -> None:
    """dvclive (3.49) reads GPU figures whenever ``pynvml`` imports (it does wherever torch's CUDA wheels are
    installed), and one failing NVML call drops every figure of that sample, CPU and memory too: on a machine
    without an NVIDIA driver ``monitor_system`` logs nothing. Tell it there is no GPU when NVML cannot start."""
    from dvclive import monitor_system

    if not monitor_system.GPU_AVAILABLE:
        return
    import pynvml

    try:
        pynvml.nvmlInit()
        pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        monitor_system.GPU_AVAILABLE = False


class StepLog:
    """dvclive logging inside a DVC stage, written live into the stage's plots folder.

    ``plots_dir`` is dvclive's own folder (``save_dvc_exp=False``, no dvc.yaml of its own: the plots are declared
    in the project's dvc.yaml), so curves and images can be read, and watched in VS Code or DVC Studio, while the
    stage trains: ``plots/metrics/<name>.tsv`` gains a row per step, ``plots/images/<name>/<step>.png`` an image
    per validation. A crash leaves a partial curve (DVC deletes the folder before the stage runs again); the
    models stay atomic. On ``close`` the summary, without the ``system/`` figures of ``monitor_system`` (they
    change from run to run), becomes ``metrics_path``.
    """

    def __init__(
        self,
        metrics_path: str | Path,
        plots_dir: str | Path,
        history: list[dict] | None = None,
        images: Path | None = None,
        monitor_system: bool = False,
    ):
        """``history``: the values of steps already trained (from a checkpoint), logged again first;
        ``images``: a folder of images logged before (from a checkpoint), kept; ``monitor_system``: dvclive's
        CPU, memory, disk and GPU figures (``plots/metrics/system/``), plotted against time."""
        from dvclive import Live

        self.metrics_path, self.plots_dir = Path(metrics_path), Path(plots_dir)
        outputs.remove_stale(self.plots_dir, "live")  # the temporary folders of earlier versions
        if self.plots_dir.exists():  # this run rewrites it completely
            shutil.rmtree(self.plots_dir)
        self.live = Live(str(self.plots_dir), dvcyaml=False, save_dvc_exp=False, report=None)
        self.history: list[dict] = []
        self.accelerator = None  # the accelerator whose trackers (common.trackers) this log feeds, once tracking
        self.images_dir = self.plots_dir / "plots" / "images"
        if images is not None and images.is_dir():
            shutil.copytree(images, self.images_dir, dirs_exist_ok=True)
        for values in history or []:
            self.log(**values)
        if monitor_system:  # after the history: its rows carry timestamps, not steps
            _without_gpu_figures_unless_nvml_loads()
            self.live.monitor_system()

    def track(self, accelerator, stage: str, config: dict) -> None:
        """Start the trackers of ``accelerator`` (made with ``log_with``, ``project_dir``: see ``prepare``), if
        any, once: later steps and images go to them too, through this accelerator (stage 1 makes one per
        phase; the trackers of the first one serve every phase). The run's folder (``tracker_dir``) holds
        TensorBoard's events (``posebooth/``) and W&B's run (``wandb/``); W&B runs offline unless ``WANDB_MODE``
        says otherwise (``wandb sync`` uploads an offline run later). Steps logged before (``history`` from a
        checkpoint) are not sent again."""
        if self.accelerator is not None or not accelerator.log_with:
            return
        run_dir = Path(accelerator.logging_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        mode = os.environ.get("WANDB_MODE", "offline")
        wandb = {"dir": str(run_dir), "name": f"{stage}-{run_dir.name}", "group": stage, "mode": mode}
        accelerator.init_trackers("posebooth", config=flat_config(config), init_kwargs={"wandb": wandb})
        self.accelerator = accelerator
        log.info("trackers %s write to %s", [t.name for t in accelerator.trackers], run_dir)

    def image(self, name: str, step: int, image) -> None:
        """Log an image as ``<name>/<step>.png``: the layout that ``dvc plots`` and the VS Code extension show
        as one image per ``name`` with a step slider (the extension's ``MULTI_IMAGE_PATH_REG`` matches
        ``<folder>/<digits>.<ext>`` only); and to the trackers, at optimizer step ``step``."""
        self.live.log_image(f"{name}/{step}.png", image)
        for tracker in self.accelerator.trackers if self.accelerator else []:
            if tracker.name == "tensorboard":
                import numpy as np

                tracker.writer.add_image(name, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.run.log({name: wandb.Image(image)}, step=step)

    def log(self, **values: float) -> None:
        """Log one step's values (plotted) and advance the step; the trackers get them at step
        ``len(history)``, the optimizer steps done (as validation images are numbered)."""
        values = {k: float(v) for k, v in values.items()}
        for k, v in values.items():
            self.live.log_metric(k, v)
        self.live.next_step()
        self.history.append(values)
        if self.accelerator is not None:
            self.accelerator.log(values, step=len(self.history))

    def summary(self, **values) -> None:
        """Values for the metrics file only (not plotted): numbers or None, like every metric."""
        outputs.check_metrics(values, self.metrics_path)
        for k, v in values.items():
            self.live.summary[k] = v

    def close(self) -> None:
        self.live.end()
        if self.accelerator is not None:
            self.accelerator.end_training()
        live_summary = self.plots_dir / "metrics.json"
        summary = json.loads(live_summary.read_text())
        summary.pop("system", None)
        outputs.write_metrics(self.metrics_path, summary)
        live_summary.unlink()

    def abort(self) -> None:
        """Stop logging after an error; what was logged stays (a partial curve)."""
        self.live.end()
        if self.accelerator is not None:
            self.accelerator.end_training()


def flat_config(config: dict, prefix: str = "") -> dict:
    """A nested config as the flat ``{"train.lr": 1e-4}`` of numbers, strings and booleans that trackers
    take as hyperparameters (TensorBoard's ``add_hparams`` refuses lists and None: they become strings)."""
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat |= flat_config(value, f"{prefix}{key}.")
        else:
            flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


def prepare(
    models: list,
    params: list,
    t,
    device: str,
    precision: str,
    steps: int | None = None,
    trackers: list[str] = (),
    tracker_root=None,
):
    """Optimizer, lr schedule and accelerator for training ``params`` (parameters, or param groups with
    their own ``lr``) of ``models`` with the knobs in ``t`` (a ``config.Optimisation``) over ``steps``
    optimizer steps (``t.steps`` by default). ``trackers`` (``common.trackers``) log under ``tracker_root``
    once ``StepLog.track`` starts them. Returns ``(accelerator, models, optimizer, lr_scheduler)``, prepared."""
    accelerator = make_accelerator(device, precision, t.gradient_accumulation_steps, trackers, tracker_root)
    if t.gradient_checkpointing:
        for model in models:
            if hasattr(model, "enable_gradient_checkpointing"):  # diffusers
                model.enable_gradient_checkpointing()
            else:  # transformers
                model.gradient_checkpointing_enable()
    optimizer = make_optimizer(params, t.lr, t.weight_decay, t.optimizer)
    # accelerate's scheduler wrapper steps the schedule once per process at each optimizer step (it assumes
    # the batch grows with the processes), so the schedule is built N times longer, as diffusers' scripts do:
    # step k of N processes then reads the single-process schedule's value at step k.
    n = accelerator.num_processes
    lr_scheduler = make_lr_scheduler(optimizer, t.lr_scheduler, t.lr_warmup_steps * n, (steps or t.steps) * n)
    *models, optimizer, lr_scheduler = accelerator.prepare(*models, optimizer, lr_scheduler)
    return accelerator, models, optimizer, lr_scheduler


def backward_and_step(accelerator, loss, params: list, optimizer, lr_scheduler, max_grad_norm: float):
    """Backward pass; on the last micro-batch of an accumulation, clip, step and reset. Returns the
    gradient norm before clipping when the optimizer stepped, else ``None``."""
    accelerator.backward(loss)  # divides by the accumulation steps
    grad_norm = accelerator.clip_grad_norm_(params, max_grad_norm) if accelerator.sync_gradients else None
    optimizer.step()  # accelerate skips these until the accumulation is complete
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def loss_and_step(
    accelerator,
    noise_scheduler,
    model_pred,
    latents,
    noise,
    timesteps,
    with_prior: bool,
    t,
    params,
    optimizer,
    lr_scheduler,
    loss_map: torch.Tensor | None = None,
):
    """The DreamBooth loss of one micro-batch (min-SNR-weighted if ``t.snr_gamma``, and weighted per
    element by ``loss_map`` (B, 1, h, w) if given, e.g. more inside face boxes), backward, and the
    optimizer step when the accumulation is complete. Returns ``(losses (3,), grad_norm or None)`` where
    losses are (total, instance, prior)."""
    from posebooth.diffusion import diffusion_target, min_snr_weights, prior_preservation_loss

    target = diffusion_target(noise_scheduler, latents, noise, timesteps)
    weights = min_snr_weights(noise_scheduler, timesteps, t.snr_gamma) if t.snr_gamma > 0 else None
    if loss_map is not None:
        loss_map = loss_map.to(target.device)
        weights = loss_map if weights is None else loss_map * weights.view(-1, 1, 1, 1)
    losses = prior_preservation_loss(model_pred, target, t.prior_loss_weight, with_prior, weights)
    grad_norm = backward_and_step(accelerator, losses[0], params, optimizer, lr_scheduler, t.max_grad_norm)
    return torch.tensor([x.item() for x in losses]), grad_norm


def reduce_losses(accelerator, totals: torch.Tensor) -> torch.Tensor:
    """The mean over processes of this process's per-step ``totals`` (3,), on the CPU for logging.

    The tensor goes to ``accelerator.device`` first: NCCL (several GPUs) reduces CUDA tensors only."""
    return accelerator.reduce(totals.to(accelerator.device), "mean").cpu()


def end_of_step(
    steplog: StepLog, step: int, totals: torch.Tensor, grad_norm, lr_scheduler, t, save_checkpoint, steps: int = 0
) -> None:
    """Log one optimizer step's mean losses, gradient norm and learning rate; checkpoint every
    ``t.checkpoint_every`` steps (not after the last of ``steps``, default ``t.steps``: the stage's
    outputs follow at once)."""
    total, instance, prior = (totals / t.gradient_accumulation_steps).tolist()
    if not math.isfinite(total):
        raise ValueError(f"training diverged at step {step}: loss {total}; lower the learning rate ({t.lr})")
    steplog.log(loss=total, instance_loss=instance, prior_loss=prior, grad_norm=grad_norm.item(),
                lr=lr_scheduler.get_last_lr()[0])  # fmt: skip
    if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < (steps or t.steps):
        save_checkpoint(step + 1)
