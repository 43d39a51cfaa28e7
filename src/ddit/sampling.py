"""Sampling: the one denoising loop that everything else builds on.

A *velocity function* ``fn(x, t, labels, patch_size) -> v`` wraps any model:
``x`` is a batch of latents, ``t`` the scheduler's timestep per sample,
``labels`` the class ids. Its ``patch_sizes`` attribute lists the sizes it runs
at, the base size first (a plain function runs at one size, 1); a cache also
needs its ``model``. ``transformer_velocity`` makes one from a diffusers
transformer or a ``MultiPatchTransformer``.

``sample`` runs a diffusers flow-matching scheduler over it with
classifier-free guidance. At each step a patch policy picks each sample's size
(before the model call); the batch runs in groups of one size each, the cond
and null branches of a sample together, and an optional feature cache skips
blocks per sample. Each sample's starting noise comes from its own seed
(``seed + index``), so a sample does not depend on what else is in the batch.
"""

from __future__ import annotations

import copy
import math
import time
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from .adapter import MultiPatchTransformer
from .caches import Cache, Group, StackRun, replace_stack
from .flops import count_flops
from .policies import PatchPolicy, Step

VelocityFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]

#: FLOPs of one sample's model call, per model and (patch size, cached, shape, CFG branches):
#: counted once per process, so that counting does not bill the timed sampling runs.
_FLOPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass
class Samples:
    """Final latents and, per sample and step, what it cost and what was decided.

    A trace record: ``step, sigma, patch_size, seconds`` (the group's model time
    / its size), ``flops`` (the sample's transformer FLOPs, both CFG branches), ``tokens`` (per branch, times the branches), ``cached`` (the cache
    skipped its blocks), ``signals`` (the policy's, candidate size -> value).
    """

    images: torch.Tensor  # (N, C, H, W) float32
    traces: list[list[dict]]


class TransformerVelocity:
    """The velocity of a class-conditional diffusers transformer (e.g. DiT) or a MultiPatchTransformer."""

    def __init__(self, model):
        self.model = model
        multi = isinstance(model, MultiPatchTransformer)
        self.patch_sizes: tuple[int, ...] = model.patch_sizes if multi else (model.config.patch_size,)

    def __call__(self, x, t, labels, patch_size):
        if isinstance(self.model, MultiPatchTransformer):
            return self.model(x, timestep=t, class_labels=labels, patch_size=patch_size, return_dict=False)[0]
        if patch_size != self.patch_sizes[0]:
            raise ValueError(f"{type(self.model).__name__} runs at its patch size {self.patch_sizes[0]} only, "
                             f"not {patch_size}: wrap it in a MultiPatchTransformer")
        return self.model(x, timestep=t, class_labels=labels, return_dict=False)[0]


def transformer_velocity(model) -> TransformerVelocity:
    """The velocity function of a class-conditional diffusers transformer, or a MultiPatchTransformer."""
    return TransformerVelocity(model)


def default_scheduler() -> FlowMatchEulerDiscreteScheduler:
    """Rectified-flow Euler, t from 1 (noise) to 0, no resolution shift."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)


def initial_noise(seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """One standard-normal latent of ``shape`` per seed."""
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]
    )


def guided(fn: VelocityFn, guidance: float, null_label: int) -> VelocityFn:
    """Classifier-free guidance: v_null + g (v_cond - v_null), in one batched call at one patch size."""
    if guidance == 1.0:
        return fn

    def guided_fn(x, t, labels, patch_size):
        null = torch.full_like(labels, null_label)
        v = fn(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]), patch_size)
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
    policy: PatchPolicy | None = None,
    cache: Cache | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    bf16: bool = False,
) -> Samples:
    """Denoise one latent per label from seeds ``seed, seed + 1, ...``; images in float32, with traces.

    With ``batch_size`` the labels are denoised in chunks; sample i still starts
    from seed ``seed + i``, so chunking does not change what it becomes. At each
    step ``policy`` picks every sample's patch size (without one: the base
    size), and ``cache`` may skip a sample's blocks; both keep their state per
    sample. FLOPs are counted for one sample once per (model, patch size, cached)
    and reused, outside the timed model calls; the oracle's probes are not counted.
    """
    if guidance != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs null_label (the model's 'no class' id)")
    if cache is not None and getattr(fn, "model", None) is None:
        raise ValueError("a feature cache needs the model's blocks: pass transformer_velocity(model) as fn")
    labels = torch.as_tensor(labels, dtype=torch.long)
    batch_size = batch_size or max(len(labels), 1)
    run = partial(_sample_chunk, fn, sample_shape=sample_shape, steps=steps, guidance=guidance,
                  null_label=null_label, scheduler=scheduler, policy=policy, cache=cache, bf16=bf16,
                  flops=_FLOPS.setdefault(getattr(fn, "model", fn), {}))
    chunks = [run(labels[s : s + batch_size], seed + s)
              for s in tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress)]
    return Samples(torch.cat([c.images for c in chunks]), [t for c in chunks for t in c.traces])


def _sample_chunk(fn, labels, seed, *, sample_shape, steps, guidance, null_label, scheduler, policy, cache, bf16,
                  flops) -> Samples:
    scheduler = copy.deepcopy(scheduler or default_scheduler())
    scheduler.set_timesteps(steps)
    velocity = guided(fn, guidance, null_label)
    autocast = partial(torch.autocast, "cpu", dtype=torch.bfloat16, enabled=bf16)
    candidates = getattr(fn, "patch_sizes", (1,))
    branches = 1 if guidance == 1.0 else 2
    n = len(labels)
    x = initial_noise(seed + torch.arange(n), sample_shape)
    if policy is not None:
        policy.reset(n, candidates[0], candidates)
    if cache is not None:
        cache.reset()
    traces: list[list[dict]] = [[] for _ in range(n)]

    for i, t in enumerate(scheduler.timesteps):
        sigma = float(scheduler.sigmas[i])

        def probe(size, latent, t=t):
            with autocast():
                return velocity(latent, t.expand(len(latent)), labels, size).float()

        if policy is None:
            sizes, signals = torch.full((n,), candidates[0]), {}
        else:
            sizes = policy.decide(Step(i, steps, sigma, t, x, probe))
            signals = policy.trace[-1].signals
        v = torch.empty_like(x)
        for size in sizes.unique().tolist():
            idx = (sizes == size).nonzero().flatten()
            group = Group(i, steps, tuple(idx.tolist()), size)
            args = (x[idx], t.expand(len(idx)), labels[idx], size)
            start = time.perf_counter()
            with autocast(), _blocks(fn, cache and partial(cache, group)):
                v[idx] = velocity(*args).float()
            seconds = (time.perf_counter() - start) / len(idx)
            for s in group.samples:
                cached = cache is not None and cache.reused[s]
                key = (size, cached, sample_shape, branches)
                if key not in flops:  # per sample: no op mixes samples, so a batch costs the sum
                    with autocast(), _blocks(fn, cached and _skipped):
                        flops[key] = count_flops(velocity, *(a[:1] for a in args[:3]), size)
                traces[s].append(dict(step=i, sigma=sigma, patch_size=size, seconds=seconds,
                                      flops=flops[key], tokens=branches * _tokens(sample_shape, size),
                                      cached=cached, signals={p: float(value[s]) for p, value in signals.items()}))
        x = scheduler.step(v, t, x).prev_sample
    return Samples(x, traces)


def _blocks(fn, stack):
    """Inside, ``fn``'s model runs its block stack as ``stack`` (a falsy ``stack``: as it is)."""
    return replace_stack(fn.model, stack) if stack else nullcontext()


def _skipped(run: StackRun) -> torch.Tensor:
    """A block stack that does nothing: what a cached step costs besides the blocks (for counting)."""
    return run.hidden


def _tokens(sample_shape: tuple[int, ...], size: int) -> int:
    """Tokens of one latent (C, [F,] H, W) at a spatial patch ``size``."""
    return math.prod(sample_shape[1:-2]) * (sample_shape[-2] // size) * (sample_shape[-1] // size)
