"""Schedules that ignore the latent: the baseline and hand-written schedules."""

from __future__ import annotations

from collections.abc import Sequence

from .base import PatchPolicy, Step


class BaselinePolicy(PatchPolicy):
    """Always the base patch size: the unmodified model."""

    name = "baseline"

    def choose(self, step: Step):
        return self.base_size, {}


class FixedPolicy(PatchPolicy):
    """A schedule given up front: one size per step, or ``size`` for the first ``fraction``
    of the steps and the base size after (coarse early, fine late).

    ``size`` defaults to the coarsest candidate.
    """

    name = "fixed"

    def __init__(self, schedule: Sequence[int] | None = None, *, fraction: float | None = None,
                 size: int | None = None):
        super().__init__()
        if (schedule is None) == (fraction is None):
            raise ValueError("give a fixed schedule either as schedule=[size per step] or as fraction=f "
                             "(coarse for the first f of the steps), not both or neither")
        if fraction is not None and not 0 <= fraction <= 1:
            raise ValueError(f"fraction of coarse steps must lie in [0, 1], got {fraction}")
        self.schedule = None if schedule is None else [int(p) for p in schedule]
        self.fraction = fraction
        self.size = size

    def reset(self, batch_size: int, base_size: int, candidates: Sequence[int]) -> None:
        super().reset(batch_size, base_size, candidates)
        used = set(self.schedule or []) | ({self.size} if self.size else set())
        wrong = sorted(used - set(self.candidates))
        if wrong:
            raise ValueError(f"fixed schedule uses sizes {wrong} that are not candidates; use only {self.candidates}")

    def choose(self, step: Step):
        if self.schedule is None:
            coarse = step.index < round(self.fraction * step.num_steps)
            return (self.size or self.candidates[-1]) if coarse else self.base_size, {}
        if len(self.schedule) != step.num_steps:
            raise ValueError(f"fixed schedule has {len(self.schedule)} sizes but the sampler runs "
                             f"{step.num_steps} steps; give exactly one size per step")
        return self.schedule[step.index], {}
