"""Sampling: the one denoising loop that everything else builds on.

A *velocity function* ``fn(x, t, labels) -> v`` wraps any model: ``x`` is a
batch of latents, ``t`` the scheduler's timestep per sample, ``labels`` the
class ids. ``sample`` runs a diffusers flow-matching scheduler over it with
classifier-free guidance. Each sample's starting noise comes from its own seed
(``seed + index``), so a sample does not depend on what else is in the batch.
"""

from __future__ import annotations

import copy
from typing import Callable

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def default_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified-flow Euler, t from 1 (noise) to 0, no resolution shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal latent of ``shape`` per seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def guided(fn: VelocityFn, guidance: float, null_label: int) -> VelocityFn:
    """Classifier-free guidance: v_null + g (v_cond - v_null), in one batched call."""
    if guidance == 1.0:
        return fn

    def guided_fn(x, t, labels):
        null = torch.full_like(labels, null_label)
        v = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        v_cond, v_null = v.chunk(2)
        return v_null + guidance * (v_cond - v_null)

    return guided_fn


@torch.no_grad()
def sample(
    fn: VelocityFn,
    labels: torch.Tensor,
    *,
    sample_shape: tuple[int, ...],
    seed: int = 0,
    steps: int = 50,
    guidance: float = 1.0,
    null_label: int | None = None,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    bf16: bool = False,
    batch_size: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Denoise one latent per label from seeds ``seed, seed + 1, ...``; returns float32.

    With ``batch_size`` the labels are denoised in chunks; sample i still starts
    from seed ``seed + i``, so chunking does not change what it becomes.
    """
    if guidance != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs null_label (the model's 'no class' id)")
    labels = torch.as_tensor(labels, dtype=torch.long)
    batch_size = batch_size or max(len(labels), 1)
    starts = range(0, len(labels), batch_size)
    chunks = [
        _sample_batch(fn, labels[s : s + batch_size], sample_shape, seed + s, steps, guidance,
                      null_label, scheduler, bf16)
        for s in tqdm(starts, desc="sampling", unit="batch", disable=not progress)
    ]
    return torch.cat(chunks)


def _sample_batch(fn, labels, sample_shape, seed, steps, guidance, null_label, scheduler, bf16):
    scheduler = copy.deepcopy(scheduler or default_scheduler())
    scheduler.set_timesteps(steps)
    fn = guided(fn, guidance, null_label)
    x = initial_noise(seed + torch.arange(len(labels)), sample_shape)
    for t in scheduler.timesteps:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            v = fn(x, t.expand(len(x)), labels)
        x = scheduler.step(v.float(), t, x).prev_sample
    return x


def transformer_velocity(model) -> VelocityFn:
    """The velocity function of a class-conditional diffusers transformer (e.g. DiT)."""

    def fn(x, t, labels):
        return model(x, timestep=t, class_labels=labels, return_dict=False)[0]

    return fn
