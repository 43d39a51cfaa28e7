"""Budget control: ask for a compute fraction instead of a threshold, and calibrate tau to meet it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from .base import Decision, largest_below
from .percentile import ThirdOrderPolicy


def calibrate_tau(traces: Sequence[Sequence[Decision]], target_fraction: float,
                  cost_per_size: Mapping[int, float] | None = None) -> float:
    """The smallest tau whose Eq. 5 schedule, replayed on recorded signals, costs at most
    ``target_fraction`` of running every step at the base size.

    ``traces`` are the traces of percentile policies (one per generation); steps without
    signals (warm-up) count at the base size. ``cost_per_size`` defaults to the token ratio
    (base / p)^2; pass measured step times instead for wall-clock budgets (cost must not grow
    with size). The schedule's effect on later latents is ignored, so record the traces on
    base-size runs (an uncalibrated ``BudgetPolicy`` does exactly that).
    """
    if not 0 < target_fraction < 1:
        raise ValueError(f"target compute fraction must lie in (0, 1) (1 is the baseline), got {target_fraction}")
    decisions = [d for trace in traces for d in trace]
    recorded = [d for d in decisions if d.signals]
    if not recorded or len(recorded[0].signals) < 2:
        raise ValueError("no signals to calibrate on: record traces with a percentile policy, past its "
                         "warm-up, with at least two candidate sizes")
    candidates = sorted(recorded[0].signals)
    cost = cost_per_size or {p: (candidates[0] / p) ** 2 for p in candidates}
    relative_cost = torch.tensor([cost[p] / cost[candidates[0]] for p in candidates])
    signals = torch.cat([torch.stack([d.signals[p] for p in candidates]) for d in recorded], dim=1)  # (K, rows)
    total_rows = sum(len(d.sizes) for d in decisions)
    warmup_rows = total_rows - signals.shape[1]
    sizes = torch.tensor(candidates)

    def fraction(tau: float) -> float:
        chosen = torch.searchsorted(sizes, largest_below(signals, candidates, tau))
        return (warmup_rows + relative_cost[chosen].sum().item()) / total_rows

    # The schedule only changes where tau crosses a recorded value: bisect just above them.
    taus = torch.nextafter(signals[1:].flatten().unique(), torch.tensor(float("inf")))
    if fraction(taus[-1].item()) > target_fraction:
        raise ValueError(f"target fraction {target_fraction} is out of reach on these traces: the coarsest "
                         f"schedule costs {fraction(taus[-1].item()):.3f}")
    lo, hi = 0, len(taus) - 1  # answer lies in taus[lo..hi]
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fraction(taus[mid].item()) <= target_fraction else (mid + 1, hi)
    return taus[lo].item()


class BudgetPolicy(ThirdOrderPolicy):
    """The paper's rule with tau chosen for a compute budget (``fraction`` of the base cost,
    or ``speedup`` = 1 / fraction in tokens).

    Until calibrated, tau = 0: nothing lies below it, so the policy runs the base schedule
    and records the signals calibration needs. Run it on calibration samples, collect each
    ``trace``, then ``calibrate(traces)`` (or pass ``traces=`` at construction).
    """

    name = "budget"

    def __init__(self, fraction: float | None = None, *, speedup: float | None = None,
                 traces: Sequence[Sequence[Decision]] | None = None, rho: float | None = None,
                 warmup: int | None = None, cost_per_size: Mapping[int, float] | None = None):
        super().__init__(rho=rho, warmup=warmup)
        if (fraction is None) == (speedup is None):
            raise ValueError("give the budget as fraction=f (of the base compute) or speedup=s, exactly one")
        if speedup is not None and not speedup > 1:
            raise ValueError(f"speedup must be > 1, got {speedup}")
        self.fraction = 1 / speedup if fraction is None else fraction
        if not 0 < self.fraction < 1:
            raise ValueError(f"compute fraction must lie in (0, 1) (1 is the baseline), got {self.fraction}")
        self.cost_per_size = cost_per_size
        self.tau = 0.0
        if traces is not None:
            self.calibrate(traces)

    def calibrate(self, traces: Sequence[Sequence[Decision]]) -> float:
        """Set tau from recorded traces (see ``calibrate_tau``) and return it."""
        self.tau = calibrate_tau(traces, self.fraction, self.cost_per_size)
        return self.tau
