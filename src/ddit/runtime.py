"""The per-step core of dynamic patching, shared by ``ddit.enable``'s pipelines and ``ddit.sampling``.

A front end turns each model call into a ``Call``: the rows' latents, the timestep
and a function that runs some rows at some patch size. The runtime does the rest,
the same way for a stock pipeline and for ddit's own sampler (so the harness
measures what pipeline users run):

- it recognises denoising steps (by the step index the call or the scheduler gives,
  else by a change of timestep or a named CFG branch calling again) and generations (the step index or the timestep goes
  back, or the front end resets it), and asks the patch policy for every sample's
  size once per step;
- a sample's classifier-free-guidance branches share that decision, whether they
  are batched in one call (SD3, PixArt, DiT) or come as one call per branch (Flux
  true CFG, Wan: the pipeline's cache context names the branch; where no context
  names it, as in Chroma, a step's later calls are named by their order);
- a batch with several sizes runs in groups of one size, put back in row order;
- ddit's feature caches keep state per (branch, sample); diffusers' cache hooks get
  one cache context per (branch, size, group of samples), and all their state is
  reset when the grouping changes, so it never mixes token grids;
- it records, per step and sample, what ran (``records``), for summaries and traces.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.hooks import HookRegistry
from torch import nn

from .caches import Cache, Group, replace_stack
from .policies import PatchPolicy, Probe, Step

#: ``run(rows, patch_size)``: the model's output for ``rows`` (indices; ``None``: all) at ``patch_size`` (a tuple,
#: the latent's first, where the model has several outputs).
Outputs = torch.Tensor | tuple[torch.Tensor, ...]
RunRows = Callable[[torch.Tensor | None, int], Outputs]


@dataclass
class Call:
    """One model call, as a front end hands it to the runtime."""

    latent: torch.Tensor  # the rows' latents in canonical layout (rows, C, *dims)
    timestep: torch.Tensor | float
    run: RunRows
    branch: str | None = None  # the pipeline's name for a call that holds one CFG branch ("cond", "uncond")
    # (the runtime names a step's later calls that come without one: "call2", ...)
    branches: int | None = None  # CFG branches batched in the rows; None: identical halves mean two
    step_index: int | None = None
    num_steps: int | None = None
    sigma: float | None = None
    probe: Probe | None = None  # the policy's model probe; by default all rows at a size, per sample
    beside: Callable[[int], int] | None = None  # tokens beside the latent's at a size (an edit's references, audio)
    precise: torch.Tensor | None = None  # ``latent`` unrounded, for the policy (a bf16 pipeline's float32 twin)


@dataclass
class Generation:
    """What the runtime knows about the generation in progress."""

    samples: int
    branches: int  # CFG branches batched in the first call's rows (1 when the pipeline calls per branch)
    step: int = -1
    timestep: float = math.inf
    num_steps: int | None = None
    sigma: float = float("nan")
    sizes: torch.Tensor | None = None  # (samples,) this step's decision
    uniform: int | None = None  # the one size of this step, if every sample has it
    groups: frozenset = frozenset()  # this step's (size, samples) groups
    probed: bool = False  # whether this step's decision ran the model
    calls: int = 0  # calls in this step so far
    named: set = field(default_factory=set)  # the branch names this step's calls gave so far
    schedule: Any = None  # the scheduler's timesteps tensor when the generation started (a new call sets another)


class PatchRuntime:
    """Decides, groups, runs and records; one per generation loop (``ddit.enable`` makes one per pipeline, shared by
    Wan 2.2's two experts, between which ``use`` switches).

    ``candidates`` are the patch sizes the model runs at, the base size first; ``patch``
    maps a spatial size to the full patch (frames keep theirs in video). ``cache`` is a
    ddit feature cache over ``model``'s blocks; ``hooks`` a diffusers model whose cache
    hooks need a cache context per group. ``scheduler()`` (optional) returns the
    scheduler in use, for the step index, step count and noise level. ``timed`` measures
    each group's seconds (synchronising the device): the sampler turns it on.
    """

    def __init__(self, policy: PatchPolicy, candidates: Sequence[int], *, cache: Cache | None = None,
                 model: nn.Module | None = None, hooks: nn.Module | None = None,
                 scheduler: Callable[[], Any] | None = None, patch: Callable[[int], tuple[int, ...]] | None = None,
                 timed: bool = False):
        if cache is not None and model is None:
            raise ValueError("a feature cache needs the model whose blocks it skips")
        self.policy, self.candidates, self.cache, self.model = policy, tuple(candidates), cache, model
        self.hooks, self.scheduler, self.timed = hooks, scheduler, timed
        self.patch = patch or (lambda size: (size, size))
        self.records: list[dict] = []
        self.generation: Generation | None = None
        self._token_counts: dict[tuple, int] = {}
        self._timestep: tuple = (None, math.nan)  # the last timestep tensor and its value

    @property
    def base_size(self) -> int:
        return self.candidates[0]

    def reset(self) -> None:
        """End the generation: the next call starts a new one (records stay until then)."""
        self.generation = None
        if self.cache is not None:
            self.cache.reset()

    def use(self, model: nn.Module, hooks: nn.Module | None) -> None:
        """Run the next calls on ``model``, whose diffusers cache hooks (if any) are on ``hooks``. A pipeline with
        two experts (Wan 2.2) switches once per generation: the generation and the policy's history go on, the
        ddit cache starts over on the new blocks, and the new model's hooks start from fresh state."""
        if model is self.model and hooks is self.hooks:
            return
        self.model, self.hooks = model, hooks
        if self.cache is not None:
            self.cache.reset()
        if hooks is not None:
            HookRegistry.check_if_exists_or_initialize(hooks).reset_stateful_hooks(recurse=True)

    # -- one call
    def __call__(self, call: Call) -> Outputs:
        try:
            return self._call(call)
        except BaseException:
            self.reset()  # a call that died ends its generation: the pipeline's retry starts a new one
            raise

    def _call(self, call: Call) -> Outputs:
        g = self._advance(call)
        rows = len(call.latent)
        if g.uniform is not None:  # the usual case: one size for the whole call
            return self._run_group(g, call, None, g.uniform, tuple(range(g.samples)), rows // g.samples)
        owner = torch.arange(rows) % g.samples
        row_sizes = g.sizes[owner]
        out = None
        for size in g.sizes.unique().tolist():
            idx = (row_sizes == size).nonzero().flatten()
            samples = tuple(sorted(set(owner[idx].tolist())))
            result = self._run_group(g, call, idx.to(call.latent.device), size, samples, rows // g.samples)
            out = _put(out, result, idx, rows)
        return out

    def _advance(self, call: Call) -> Generation:
        """Start a generation or a step when the call says so; decide the sizes of a new step."""
        t = self._timestep_value(call.timestep)
        index = self._step_index(call)
        schedule = getattr(self.scheduler() if self.scheduler else None, "timesteps", None)
        g = self.generation
        if index is None:  # no step index anywhere: a new timestep is a new step, a higher one a new generation;
            # so is a branch that already ran at this timestep (diffusion forcing's integer timesteps can repeat)
            new_step = g is None or t != g.timestep or call.branch is not None and call.branch in g.named
            new_generation = g is None or t > g.timestep
        else:
            new_step = g is None or index != g.step
            new_generation = g is None or index < g.step or index == g.step and t != g.timestep
        # a pipeline call sets its scheduler's timesteps anew: a new tensor is a new generation
        new_generation = new_generation or schedule is not None and schedule is not g.schedule
        if new_generation:
            g = self._start(call)
            g.schedule = schedule
        if len(call.latent) % g.samples:
            raise ValueError(f"this call has {len(call.latent)} rows, but the generation has {g.samples} samples: "
                             "a pipeline that changes its batch in the middle of a generation cannot run dynamic "
                             "patches")
        if new_step or new_generation:
            g.step = g.step + 1 if index is None else index
            g.timestep = t
            g.num_steps, g.sigma = self._where(call, g.step, t)
            g.calls, g.named = 0, set()
            self._decide(g, call)
        g.calls += 1
        g.named.add(call.branch)
        if call.branch is None and g.calls > 1:  # a later call of the step that no cache context names (Chroma's
            call.branch = f"call{g.calls}"  # uncond, SD3's skip-layer guidance): its own cache state and context
        return g

    def _timestep_value(self, timestep) -> float:
        """The call's timestep as a number, read from the device once per timestep tensor: a step's CFG calls
        share one, and a read at the second would stall the device until the first call's work is done."""
        if timestep is not self._timestep[0]:
            self._timestep = (timestep, float(torch.as_tensor(timestep).flatten()[0]))
        return self._timestep[1]

    def _step_index(self, call: Call) -> int | None:
        """The index of the step in progress: the call's, else the scheduler's (None before its first step:
        its begin index), else unknown (DDIM keeps none)."""
        if call.step_index is not None:
            return call.step_index
        scheduler = self.scheduler() if self.scheduler else None
        if scheduler is None or not hasattr(scheduler, "step_index"):
            return None
        index, g = scheduler.step_index, self.generation
        if index is None and g is not None and g.step >= 0 and g.schedule is getattr(scheduler, "timesteps", None):
            return None  # not stepped since this generation began: SkyReels-V2's diffusion forcing steps copies
        return (getattr(scheduler, "begin_index", None) or 0) if index is None else index

    def _start(self, call: Call) -> Generation:
        scheduler = self.scheduler() if self.scheduler else None
        if getattr(scheduler, "order", 1) > 1:
            raise ValueError(f"{type(scheduler).__name__} calls the transformer twice per step (a second-order "
                             "solver), and ddit's policies and caches read one call per step: use a first-order "
                             "scheduler (FlowMatchEulerDiscreteScheduler, DPMSolverMultistepScheduler, UniPC...)")
        latent = call.latent
        half = len(latent) // 2
        halves_alike = len(latent) % 2 == 0 and half and torch.equal(latent[:half], latent[half:])
        if call.branches is not None:  # batched CFG rows hold one latent twice: where they do not, the
            branches = 1 if call.branches == 2 and not halves_alike else call.branches  # guidance read was stale
        elif call.branch is not None:
            branches = 1
        else:
            branches = 2 if halves_alike else 1
        if len(latent) % branches:
            raise ValueError(f"{len(latent)} rows do not split into {branches} CFG branches")
        self.reset()
        self.records = []
        self.generation = Generation(samples=len(latent) // branches, branches=branches)
        self.policy.reset(self.generation.samples, self.base_size, self.candidates)
        return self.generation

    def _where(self, call: Call, step: int, t: float) -> tuple[int | None, float]:
        """The step count and noise level: from the call, else the scheduler, else t on a 0-1000 scale."""
        scheduler = self.scheduler() if self.scheduler else None
        num_steps = call.num_steps
        if num_steps is None and getattr(scheduler, "timesteps", None) is not None:
            num_steps = len(scheduler.timesteps)
        sigma = call.sigma
        sigmas = getattr(scheduler, "sigmas", None)
        if sigma is None and sigmas is not None and step < len(sigmas):
            sigma = float(sigmas[step])
        return num_steps, float(t / 1000 if sigma is None else sigma)

    def _decide(self, g: Generation, call: Call) -> None:
        """This step's sizes; diffusers' hook state is dropped when the grouping changes, or when the
        policy probed the model (a probe's state must not be what a group call reuses)."""
        g.probed = False
        g.sizes = self.policy.decide(Step(g.step, g.num_steps or 0, g.sigma, call.timestep,
                                          (call.latent if call.precise is None else call.precise)[: g.samples],
                                          self._probe(call, g)))
        sizes = g.sizes.tolist()
        g.uniform = sizes[0] if len(set(sizes)) == 1 else None
        groups = frozenset((p, tuple(i for i, q in enumerate(sizes) if q == p)) for p in set(sizes))
        if self.hooks is not None and (groups != g.groups or g.probed):
            HookRegistry.check_if_exists_or_initialize(self.hooks).reset_stateful_hooks(recurse=True)
        g.groups = groups

    def _probe(self, call: Call, g: Generation) -> Probe:
        """The policy's probe: the model at a size on this call's rows, one flattened row per sample
        (its CFG branches side by side), outside every cache's state."""

        def probe(size: int, latent: torch.Tensor) -> torch.Tensor:
            g.probed = True
            with self._context("probe", size, (g.step,)):
                if call.probe is not None:
                    return call.probe(size, latent)
                out = call.run(None, size)
                out = out[0] if isinstance(out, tuple) else out  # the latent's prediction (not LTX-2's audio)
                return out.reshape(-1, g.samples, *out.shape[1:]).transpose(0, 1).reshape(g.samples, -1)

        return probe

    # -- one group of one size
    def _run_group(self, g: Generation, call: Call, idx, size: int, samples: tuple[int, ...],
                   branches: int) -> Outputs:
        keys = tuple((call.branch, s) for s in samples)
        stack = None
        if self.cache is not None:
            stack = self.cache.standing_in(Group(g.step, g.num_steps or 0, keys, size))
        device = call.latent.device
        blocks = replace_stack(self.model, stack) if stack else nullcontext()
        with self._context(call.branch, size, samples, g), blocks:
            start = synchronized_clock(device) if self.timed else 0.0
            result = call.run(idx, size)
            seconds = (synchronized_clock(device) - start) / len(samples) if self.timed else None
        dims = tuple(call.latent.shape[2:])
        tokens, base_tokens = ((self._tokens(dims, p) + (call.beside(p) if call.beside else 0)) * branches
                               for p in (size, self.base_size))
        signals = self.policy.trace[-1].signals if self.policy.trace else {}
        reused = self.cache.reused if self.cache is not None else {}
        for s in samples:
            self.records.append(dict(step=g.step, sigma=g.sigma, sample=s, branch=call.branch, patch_size=size,
                                     tokens=tokens, base_tokens=base_tokens, cached=reused.get((call.branch, s)),
                                     seconds=seconds, signals={p: float(v[s]) for p, v in signals.items()}))
        return result

    def _context(self, branch, size, samples, g: Generation | None = None):
        """The diffusers cache context of one group: named by (branch, size, samples)."""
        if self.hooks is None:
            return nullcontext()
        name = f"ddit/{branch}/{size}/{','.join(map(str, samples))}"
        if g is None:
            return self.hooks.cache_context(name)
        return self.hooks.cache_context(name, step_index=g.step, num_inference_steps=g.num_steps,
                                        timestep=g.timestep, sigma=g.sigma)

    def _tokens(self, dims: tuple[int, ...], size: int) -> int:
        """Tokens of one latent of spatial ``dims`` at a patch ``size`` (leading dims: one patch each)."""
        key = (dims, size)
        if key not in self._token_counts:
            patch = self.patch(size)
            lead = (1,) * (len(dims) - len(patch))
            self._token_counts[key] = math.prod(d // p for d, p in zip(dims, (*lead, *patch)))
        return self._token_counts[key]


def _put(out, result, idx: torch.Tensor, rows: int):
    """A group's ``result`` into rows ``idx`` of the call's ``out`` (None: made here, for ``rows`` rows); tuples
    output by output, where the model returns several (LTX-2's video and audio)."""
    if isinstance(result, tuple):
        return tuple(_put(o, r, idx, rows) for o, r in zip(out or (None,) * len(result), result))
    if out is None:
        out = result.new_empty((rows, *result.shape[1:]))
    out[idx.to(out.device)] = result
    return out


def synchronized_clock(device: torch.device) -> float:
    """Wall time after the device has finished its queued work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
