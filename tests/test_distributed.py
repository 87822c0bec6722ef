"""Training under `accelerate launch`: each process takes its slice of one global batch, only the main
process writes, and the whole thing runs through DVC with `common.train_launcher`."""

from __future__ import annotations

import subprocess

import pytest
import torch
import yaml

from posebooth import training
from posebooth.diffusion import add_noise


class _Acc:
    def __init__(self, rank, world):
        self.process_index, self.num_processes = rank, world


def test_processes_draw_one_global_batch_and_stay_in_step():
    """Two processes' slices together are what one process draws for the doubled batch, and every
    process's generator ends in the same state (so one checkpoint restores them all)."""
    single = training.Shard()
    g = torch.Generator().manual_seed(5)
    whole = single.indices(10, 6, g), single.rand(6, g)
    parts, states = [], []
    for rank in range(2):
        shard = training.Shard(_Acc(rank, 2))
        g = torch.Generator().manual_seed(5)
        parts.append((shard.indices(10, 3, g), shard.rand(3, g)))
        states.append(g.get_state())
    assert torch.equal(torch.cat([parts[0][0], parts[1][0]]), whole[0])
    assert torch.equal(torch.cat([parts[0][1], parts[1][1]]), whole[1])
    assert torch.equal(states[0], states[1])


def test_noise_of_one_process_is_what_it_always_was_and_ranks_differ():
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(num_train_timesteps=1000)
    latents = torch.zeros(2, 4, 8, 8)
    g = torch.Generator().manual_seed(3)
    expected_noise = torch.randn(latents.shape, generator=g)
    expected_t = torch.randint(0, 1000, (2,), generator=g)
    _, noise, t = add_noise(scheduler, latents, torch.Generator().manual_seed(3))
    assert torch.equal(noise, expected_noise) and torch.equal(t, expected_t)
    _, n0, _ = add_noise(scheduler, latents, torch.Generator().manual_seed(3), rank_world=(0, 2))
    _, n1, _ = add_noise(scheduler, latents, torch.Generator().manual_seed(3), rank_world=(1, 2))
    assert torch.equal(n0, expected_noise) and not torch.equal(n0, n1)


@pytest.mark.slow
@pytest.mark.parametrize("base", ["sd15", "sdxl"])
def test_both_training_stages_on_two_processes_through_dvc(tmp_path, tiny_sd, base):
    """`common.train_launcher: accelerate launch --multi_gpu --num_processes 2` (two CPU processes with
    gloo here; GPUs, nodes, DeepSpeed or FSDP on a real machine come from `accelerate config`). On SDXL with
    LoRAs on both text encoders too: DDP stops on any trainable parameter that gets no gradient."""
    from posebooth import embedded
    from tests.workspace import git_init, workspace

    ws, env = workspace(tmp_path, "M", str(embedded.cache_root()))
    params = yaml.safe_load((ws / "params.yaml").read_text())
    params["common"]["train_launcher"] = "accelerate launch --multi_gpu --num_processes 2 --num_machines 1"
    if base == "sdxl":
        params["common"]["model"] = "embedded:tiny-sdxl"
        params["generate_class_priors"]["controlnet"] = params["train_pose"]["controlnet"] = (
            "embedded:tiny-sdxl-openpose"
        )
        params["train"]["train_text_encoder"] = True
    (ws / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_init(ws, env)
    proc = subprocess.run(["dvc", "repro", "train_stage2_pose"], cwd=ws, env=env, capture_output=True, text=True,
                          timeout=1800)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "lora on 2 processes (accelerate launch)" in out and "2 processes (accelerate launch): 1 pair(s)" in out
    assert (ws / "models/stage1/pytorch_lora_weights.safetensors").exists()
    assert (ws / "models/stage2/controlnet/diffusion_pytorch_model.safetensors").exists()
    history = (ws / "plots/train_stage1_appearance/loss.tsv").read_text().splitlines()
    assert len(history) == 1 + params["train"]["steps"]  # logged once (by the main process), not twice
