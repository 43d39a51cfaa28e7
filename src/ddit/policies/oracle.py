"""An upper-bound reference: ask the model itself which patch sizes it can afford."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import Decision, PatchPolicy, Step, largest_below
from .budget import budget_fraction, smallest_threshold


class OraclePolicy(PatchPolicy):
    """Per sample, the largest size whose prediction stays within ``tolerance`` of the base
    prediction, ``||f_p - f_base|| / ||f_base||``.

    It runs the model once per candidate per step, so it is slower than the baseline:
    it measures what a cheap policy could reach, it does not speed anything up.
    The default tolerance, 0.25, sits inside the shipped testbed adapter's measured error
    (patch 4: 0.11-0.39 over t), so the oracle goes coarse where the adapter is closest;
    it is not tuned on image quality.
    """

    name = "oracle"
    tolerance: float = 0.25

    def __init__(self, tolerance: float | None = None):
        super().__init__()
        self.tolerance = type(self).tolerance if tolerance is None else tolerance
        if not self.tolerance > 0:
            raise ValueError(f"tolerance is a relative error and must be > 0, got {self.tolerance}")

    def choose(self, step: Step):
        if step.probe is None:
            raise ValueError("the oracle policy needs step.probe (the model's prediction at a given patch "
                             "size); it cannot run on latents alone: use it inside a sampler with a model")
        base = step.probe(self.base_size, step.latent).flatten(1).float()
        errors = torch.stack([torch.zeros_like(base[:, 0])] + [
            (step.probe(p, step.latent).flatten(1).float() - base).norm(dim=1) / base.norm(dim=1)
            for p in self.candidates[1:]
        ])
        return largest_below(errors, self.candidates, self.tolerance), dict(zip(self.candidates, errors))


class OracleBudgetPolicy(OraclePolicy):
    """The oracle at a compute budget (``fraction`` of the base cost, or ``speedup`` in tokens):
    its tolerance is fitted so that it costs what a cheap policy costs, and their schedules can
    be compared at equal cost, "available vs captured" (``ddit.ablate.adaptivity``).

    Until calibrated the tolerance is 0, so it runs the base schedule and records its errors;
    ``calibrate(traces)`` then picks the smallest tolerance whose replayed schedule meets the
    budget, as ``BudgetPolicy`` does for tau (the schedule's effect on later latents ignored).
    """

    name = "oracle_budget"

    def __init__(self, fraction: float | None = None, *, speedup: float | None = None,
                 traces: Sequence[Sequence[Decision]] | None = None,
                 cost_per_size: Mapping[int, float] | None = None):
        super().__init__()
        self.fraction = budget_fraction(fraction, speedup)
        self.cost_per_size = cost_per_size
        self.tolerance = 0.0
        if traces is not None:
            self.calibrate(traces)

    @property
    def tau(self) -> float:
        """The calibrated threshold, under the name every calibrating policy shares (the harness sets it)."""
        return self.tolerance

    @tau.setter
    def tau(self, value: float) -> None:
        self.tolerance = value

    def calibrate(self, traces: Sequence[Sequence[Decision]]) -> float:
        """Set the tolerance from recorded traces of this policy's errors, and return it."""
        recorded = [d for trace in traces for d in trace if d.signals]
        if not recorded or len(recorded[0].signals) < 2:
            raise ValueError("no errors to calibrate on: record traces with the uncalibrated oracle, with at "
                             "least two candidate sizes")
        candidates = sorted(recorded[0].signals)
        cost = self.cost_per_size or {p: (candidates[0] / p) ** 2 for p in candidates}
        errors = torch.cat([torch.stack([d.signals[p] for p in candidates]) for d in recorded], dim=1)
        relative = torch.tensor([cost[p] / cost[candidates[0]] for p in candidates], dtype=torch.float64)

        def fraction(tolerance: float) -> float:
            chosen = largest_below(errors, candidates, tolerance)
            return relative[[candidates.index(p) for p in chosen.tolist()]].mean().item()

        self.tolerance = smallest_threshold(errors[1:].flatten(), fraction, self.fraction)
        return self.tolerance
