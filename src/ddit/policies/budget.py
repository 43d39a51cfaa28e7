"""Budget control: ask for a compute fraction instead of a threshold, and calibrate tau to meet it."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping, Sequence

import torch

from .base import Decision
from .percentile import ThirdOrderPolicy


def calibrate_tau(traces: Sequence[Sequence[Decision]], target_fraction: float,
                  cost_per_size: Mapping[int, float] | None = None, rule: ThirdOrderPolicy | None = None) -> float:
    """The smallest tau whose schedule, replayed on recorded signals, costs at most
    ``target_fraction`` of running every step at the base size.

    ``traces`` are the traces of percentile policies (one per generation); steps without
    signals (warm-up) run at the base size. ``rule`` is the policy whose schedule is replayed
    (its ``schedule``: Eq. 5 and its restart rule; default ``ThirdOrderPolicy()``), its tau
    replaced by each candidate. ``cost_per_size`` defaults to the token ratio (base / p)^2;
    pass measured step times instead for wall-clock budgets. The schedule's effect on later
    latents is ignored, so record the traces on base-size runs (an uncalibrated
    ``BudgetPolicy`` does exactly that).
    """
    if not 0 < target_fraction < 1:
        raise ValueError(f"target compute fraction must lie in (0, 1) (1 is the baseline), got {target_fraction}")
    recorded = [d for trace in traces for d in trace if d.signals]
    if not recorded or len(recorded[0].signals) < 2:
        raise ValueError("no signals to calibrate on: record traces with a percentile policy, past its "
                         "warm-up, with at least two candidate sizes")
    candidates = sorted(recorded[0].signals)
    cost = cost_per_size or {p: (candidates[0] / p) ** 2 for p in candidates}
    rule = copy.copy(rule or ThirdOrderPolicy())

    def fraction(tau: float) -> float:
        rule.tau, spent, steps = tau, 0.0, 0
        for trace in traces:
            rule.reset(len(trace[0].sizes), candidates[0], candidates)
            for d in trace:
                sizes = rule.schedule(torch.stack([d.signals[p] for p in candidates]) if d.signals else None,
                                      rule.protected(d.index, d.num_steps or 0))  # unknown: as at run time
                spent += sum(cost[p] / cost[candidates[0]] for p in sizes.tolist())
                steps += len(sizes)
        return spent / steps

    values = torch.cat([torch.stack([d.signals[p] for p in candidates[1:]]).flatten() for d in recorded])
    return smallest_threshold(values, fraction, target_fraction)


def smallest_threshold(values: torch.Tensor, fraction: Callable[[float], float], target: float) -> float:
    """The smallest threshold at which ``fraction(threshold)`` (the replayed schedule's cost, which
    falls as the threshold rises) is at most ``target``. A schedule only changes where the threshold
    crosses a recorded signal, so only the values just above each of ``values`` are tried."""
    taus = torch.nextafter(values.unique(), torch.tensor(float("inf"))).tolist()
    if fraction(taus[-1]) > target:
        raise ValueError(f"target fraction {target} is out of reach on these traces: the coarsest "
                         f"schedule costs {fraction(taus[-1]):.3f}")
    lo, hi = 0, len(taus) - 1  # bisect as if cost fell with the threshold, which holds but for restarts
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fraction(taus[mid]) <= target else (mid + 1, hi)
    while fraction(taus[lo]) > target:  # where a restart broke monotonicity
        lo += 1
    return taus[lo]


def budget_fraction(fraction: float | None, speedup: float | None) -> float:
    """The compute fraction of a budget given as ``fraction`` of the base cost or as ``speedup``, exactly one."""
    if (fraction is None) == (speedup is None):
        raise ValueError("give the budget as fraction=f (of the base compute) or speedup=s, exactly one")
    if speedup is not None and not speedup > 1:
        raise ValueError(f"speedup must be > 1, got {speedup}")
    fraction = 1 / speedup if fraction is None else fraction
    if not 0 < fraction < 1:
        raise ValueError(f"compute fraction must lie in (0, 1) (1 is the baseline), got {fraction}")
    return fraction


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
                 warmup: int | None = None, cost_per_size: Mapping[int, float] | None = None,
                 restart: bool = True, fine_tail: float | None = None):
        super().__init__(rho=rho, warmup=warmup, restart=restart, fine_tail=fine_tail)
        self.fraction = budget_fraction(fraction, speedup)
        self.cost_per_size = cost_per_size
        self.tau = 0.0
        if traces is not None:
            self.calibrate(traces)

    def calibrate(self, traces: Sequence[Sequence[Decision]]) -> float:
        """Set tau from recorded traces (see ``calibrate_tau``, replaying this policy's rule) and return it."""
        self.tau = calibrate_tau(traces, self.fraction, self.cost_per_size, rule=self)
        return self.tau
