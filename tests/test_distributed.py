"""Training under `accelerate launch`: each process takes its slice of one global batch, only the main
process writes (the run through DVC with `common.train_launcher` is in tests/test_pipeline_e2e.py)."""

from __future__ import annotations

import torch

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


# Both training stages on two processes through DVC (`common.train_launcher`): the SDXL end-to-end run in
# tests/test_pipeline_e2e.py, with LoRAs on both text encoders and pose-paired class priors.
