"""Sampling: the one denoising loop that everything else builds on.

A *velocity function* ``fn(x, t, labels, patch_size) -> v`` wraps any model:
``x`` is a batch of latents, ``t`` the scheduler's timestep per sample,
``labels`` the class ids. Its ``patch_sizes`` attribute lists the sizes it runs
at, the base size first (a plain function runs at one size, 1); a cache also
needs its ``model``. ``transformer_velocity`` makes one from a diffusers
transformer or a ``MultiPatchTransformer``.

``sample`` runs a diffusers flow-matching scheduler over it with
classifier-free guidance, on the model's device. Each step is one call of
``ddit.runtime.PatchRuntime``, the core that ``ddit.enable``'s pipelines use too:
a patch policy picks each sample's size (before the model call); the batch runs
in groups of one size each, the cond and null branches of a sample together, and
an optional feature cache skips blocks per sample. Each sample's starting noise comes from its own seed
(``seed + index``), so a sample does not depend on what else is in the batch.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tqdm.auto import tqdm

from .adapter import MultiPatchTransformer
from .caches import Cache, SkipAll, replace_stack
from .flops import count_flops
from .policies import BaselinePolicy, PatchPolicy, ProgressiveResolution, dct_resize
from .runtime import Call, PatchRuntime

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
        x = x.to(self.model.dtype)  # latents stay float32 between steps; the model takes its own dtype
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
    A probing policy (the oracle) sees both CFG branches' raw predictions, as in pipelines. One policy
    object runs every chunk: its ``trace`` then holds the last chunk's only, so a caller that calibrates
    on it samples in one chunk (``batch_size=len(labels)``).
    """
    if guidance != 1.0 and null_label is None:
        raise ValueError("classifier-free guidance needs null_label (the model's 'no class' id)")
    if cache is not None and getattr(fn, "model", None) is None:
        raise ValueError("a feature cache needs the model's blocks: pass transformer_velocity(model) as fn")
    if cache is not None:
        cache.check(fn.model)
    labels = torch.as_tensor(labels, dtype=torch.long)
    batch_size = batch_size or max(len(labels), 1)
    model = getattr(fn, "model", None)
    lean = isinstance(model, MultiPatchTransformer) and not model.lean_base
    if lean:
        model.set_lean_base(True)
    run = partial(_sample_chunk, fn, sample_shape=sample_shape, steps=steps, guidance=guidance,
                  null_label=null_label, scheduler=scheduler, policy=policy, cache=cache, bf16=bf16,
                  flops=_FLOPS.setdefault(getattr(fn, "model", fn), {}))
    try:
        chunks = [run(labels[s : s + batch_size], seed + s) for s in
                  tqdm(range(0, len(labels), batch_size), desc="sampling", unit="batch", disable=not progress)]
    finally:
        if lean:
            model.set_lean_base(False)
    return Samples(torch.cat([c.images for c in chunks]), [t for c in chunks for t in c.traces])


def _sample_chunk(fn, labels, seed, *, sample_shape, steps, guidance, null_label, scheduler, policy, cache, bf16,
                  flops) -> Samples:
    scheduler = copy.deepcopy(scheduler or default_scheduler())
    scheduler.set_timesteps(steps)
    model = getattr(fn, "model", None)
    device = model.device if model is not None else torch.device("cpu")
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
    candidates = getattr(fn, "patch_sizes", (1,))
    branches = 1 if guidance == 1.0 else 2
    n = len(labels)
    labels = labels.to(device)
    x = initial_noise(seed + torch.arange(n), sample_shape).to(device)
    runtime = PatchRuntime(policy or BaselinePolicy(), candidates, cache=cache, model=model, timed=True)
    rows_in = torch.cat([labels, torch.full_like(labels, null_label)]) if branches == 2 else labels
    progressive = isinstance(policy, ProgressiveResolution)
    full, shapes = sample_shape[-1], []
    if progressive and policy.half(float(scheduler.sigmas[0])):
        x = dct_resize(x, full // 2, keep="energy")  # the low frequencies of each sample's own noise

    for i, t in enumerate(scheduler.timesteps):
        if progressive and x.shape[-1] != full and not policy.half(float(scheduler.sigmas[i])):
            x = dct_resize(x, full, keep="amplitude")
        shapes.append(tuple(x.shape[1:]))
        x_in = torch.cat([x] * branches)
        t_in = t.to(device).expand(len(x_in))

        def run(idx, size, x_in=x_in, t_in=t_in):
            args = (x_in, t_in, rows_in) if idx is None else (x_in[idx], t_in[idx], rows_in[idx])
            with autocast():
                return fn(*args, size).float()

        v = runtime(Call(x_in, t, run, branches=branches, step_index=i, num_steps=steps,
                         sigma=float(scheduler.sigmas[i])))
        if branches == 2:
            v_cond, v_null = v.chunk(2)
            v = v_null + guidance * (v_cond - v_null)
        x = scheduler.step(v, t, x).prev_sample
    if x.shape[-1] != full:  # switched at sigma 0: nothing ran at full resolution
        x = dct_resize(x, full, keep="amplitude")
    return Samples(x.float().cpu(), _traces(runtime.records, n, fn, autocast, shapes, branches, flops))


def _traces(records, n, fn, autocast, shapes, branches, flops) -> list[list[dict]]:
    """The runtime's records as per-sample traces, with FLOPs counted once per (size, cached) and
    shape (``shapes``: each step's latent shape, which progressive resolution changes)."""
    traces: list[list[dict]] = [[] for _ in range(n)]
    for r in records:
        cached = bool(r["cached"])
        count = _flops(fn, autocast, flops, r["patch_size"], cached, shapes[r["step"]], branches)
        traces[r["sample"]].append(dict(step=r["step"], sigma=r["sigma"], patch_size=r["patch_size"],
                                        seconds=r["seconds"], flops=count, tokens=r["tokens"], cached=cached,
                                        signals=r["signals"]))
    return traces


def count_flops_ahead(fn: VelocityFn, sample_shape: tuple[int, ...], guidance: float = 1.0,
                      bf16: bool = False) -> None:
    """Counts now the FLOPs that ``sample``'s traces read for ``fn`` at ``sample_shape`` (every patch size, with
    and without a cache's skip), so that no timed run counts them (the ablation harness times whole runs)."""
    model = getattr(fn, "model", None)
    device = model.device if model is not None else torch.device("cpu")
    autocast = partial(torch.autocast, device.type, dtype=torch.bfloat16, enabled=bf16)
    flops = _FLOPS.setdefault(model if model is not None else fn, {})
    for size in getattr(fn, "patch_sizes", (1,)):
        for cached in (False, True) if model is not None else (False,):
            _flops(fn, autocast, flops, size, cached, tuple(sample_shape), 1 if guidance == 1.0 else 2)


def _flops(fn, autocast, flops: dict, size: int, cached: bool, sample_shape: tuple[int, ...], branches: int) -> int:
    """One sample's FLOPs at a step, counted once per (size, cached, shape, branches): no op mixes samples, so a
    batch costs the sum."""
    key = (size, cached, sample_shape, branches)
    if key not in flops:
        device = fn.model.device if getattr(fn, "model", None) is not None else torch.device("cpu")
        one = (torch.zeros(1, *sample_shape, device=device), torch.ones(1, device=device) * 500,
               torch.zeros(1, dtype=torch.long, device=device))
        with torch.no_grad(), autocast(), _blocks(fn, cached and SkipAll()):
            flops[key] = count_flops(guided(fn, 1.0 if branches == 1 else 2.0, 0), *one, size)
    return flops[key]


def _blocks(fn, stack):
    """Inside, ``fn``'s model runs its block stack as ``stack`` (a falsy ``stack``: as it is)."""
    return replace_stack(fn.model, stack) if stack else nullcontext()
