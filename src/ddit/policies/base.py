"""The patch-policy interface: what a sampler sees, and the trace a policy leaves behind."""

from __future__ import annotations

import abc
import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

#: ``probe(patch_size, latent) -> prediction``: the model's output for the current step at that size.
Probe = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Step:
    """One denoising step, as the sampler hands it to ``PatchPolicy.decide`` before the model call."""

    index: int  # 0-based
    num_steps: int
    sigma: float  # noise level: 1 = noise .. 0 = clean for flow matching
    timestep: float | torch.Tensor  # the scheduler's own value
    latent: torch.Tensor  # z before this step: (B, C, H, W) or video (B, C, F, H, W)
    probe: Probe | None = None  # None when driven without a model


@dataclass(frozen=True)
class Decision:
    """One step's choice and the per-sample signal behind it (kept on the CPU for reports)."""

    index: int
    sigma: float
    sizes: torch.Tensor  # (B,) patch sizes in latent pixels
    signals: dict[int, torch.Tensor] = field(default_factory=dict)  # candidate size -> (B,) value
    num_steps: int = 0  # of the whole schedule (img2img runs its last steps only); 0: unknown

    def rows(self) -> list[dict]:
        """One plain dict per sample: ``step, sigma, sample, patch_size, signal_<p>...``."""
        return [
            {"step": self.index, "sigma": self.sigma, "sample": b, "patch_size": size,
             **{f"signal_{p}": float(v[b]) for p, v in self.signals.items()}}
            for b, size in enumerate(self.sizes.tolist())
        ]


def trace_rows(trace: Sequence[Decision]) -> list[dict]:
    """A whole trace as rows (one per sample per step), ready for csv.DictWriter or pandas."""
    return [row for decision in trace for row in decision.rows()]


def check_candidates(base_size: int, candidates: Sequence[int]) -> tuple[int, ...]:
    """Candidates must start at the base size and grow through multiples of it (p, 2p, 4p, ...)."""
    candidates = tuple(map(operator.index, candidates))
    valid = (
        base_size > 0
        and candidates[:1] == (base_size,)
        and all(a < b for a, b in zip(candidates, candidates[1:]))
        and all(p % base_size == 0 for p in candidates)
    )
    if not valid:
        raise ValueError(
            f"candidate patch sizes {candidates} are invalid for base size {base_size}: they must be "
            f"ascending multiples of it, starting with it, e.g. ({base_size}, {2 * base_size}, {4 * base_size})"
        )
    return candidates


def largest_below(signals: torch.Tensor, candidates: Sequence[int], tau: float | torch.Tensor) -> torch.Tensor:
    """Eq. 5: per sample, the largest candidate whose signal is below tau, else the base size.

    ``signals`` is (K, B), one row per candidate in ascending order; ``tau`` is one threshold
    or (K,), one per candidate (0 = never chosen).
    """
    rows = torch.arange(len(candidates), device=signals.device)[:, None]
    tau = torch.as_tensor(tau, dtype=signals.dtype, device=signals.device).reshape(-1, 1)
    chosen = torch.where(signals < tau, rows, 0).amax(dim=0)
    return torch.tensor(candidates, device=signals.device)[chosen]


class PatchPolicy(abc.ABC):
    """Chooses each sample's patch size once per denoising step.

    A policy implements ``choose``; ``decide`` validates its answer and records it in
    ``trace``. Sizes come back as a CPU LongTensor: they drive Python control flow
    (which patch embedding to run), not arithmetic.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self.candidates: tuple[int, ...] = ()
        self.trace: list[Decision] = []

    def reset(self, batch_size: int, base_size: int, candidates: Sequence[int]) -> None:
        """Start a generation: forget all history."""
        self.candidates = check_candidates(base_size, candidates)
        self.base_size = base_size
        self.batch_size = batch_size
        self.trace = []

    @abc.abstractmethod
    def choose(self, step: Step) -> tuple[int | torch.Tensor, dict[int, torch.Tensor]]:
        """The patch size (one for the batch, or (B,)) and the signals (size -> (B,)) behind it."""

    def decide(self, step: Step) -> torch.LongTensor:
        """Patch sizes (B,) for this step; call it at every step, before the model call."""
        if not self.candidates:
            raise RuntimeError(f"call reset(batch_size, base_size, candidates) before decide() on {self.name!r}")
        if step.latent.shape[0] != self.batch_size:
            raise ValueError(f"latent batch {step.latent.shape[0]} != batch_size {self.batch_size} given to reset()")
        sizes, signals = self.choose(step)
        sizes = torch.as_tensor(sizes, dtype=torch.long).cpu().expand(self.batch_size).clone()
        if not set(sizes.tolist()) <= set(self.candidates):
            raise RuntimeError(f"policy {self.name!r} chose {sizes.tolist()}, not among {self.candidates}")
        signals = {p: v.detach().float().cpu() for p, v in signals.items()}
        self.trace.append(Decision(step.index, float(step.sigma), sizes, signals, step.num_steps))
        return sizes
