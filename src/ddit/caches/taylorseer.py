"""TaylorSeer (Liu et al. 2025): between full steps, extrapolate the blocks' work by a Taylor series."""

from __future__ import annotations

import math

import torch

from .base import Cache, Group
from .stack import StackRun


class TaylorSeer(Cache):
    """Full compute for a sample's first ``warmup`` steps at a patch size, then every ``interval`` steps;
    in between, the stack's residual (output - input) is predicted by a Taylor expansion of
    ``order`` in the step, with derivatives from divided differences of the full steps.

    The residual, not the output, is extrapolated: the input keeps moving with the
    latent, and is added back exactly. ``warmup`` defaults to ``order + 1``, the
    full steps that all derivatives need. Defaults are TaylorSeer's FLUX setting.
    """

    name = "taylorseer"
    interval: int = 4
    order: int = 2

    def __init__(self, interval: int | None = None, order: int | None = None, warmup: int | None = None):
        self.interval = type(self).interval if interval is None else interval
        self.order = type(self).order if order is None else order
        self.warmup = self.order + 1 if warmup is None else warmup
        if self.interval < 1 or self.order < 0 or self.warmup < 1:
            raise ValueError(f"TaylorSeer needs interval >= 1 (1 never skips), order >= 0 and warmup >= 1, got "
                             f"interval={self.interval}, order={self.order}, warmup={self.warmup}")
        super().__init__()

    def reuse(self, group: Group, run: StackRun, rows: dict[tuple, slice]) -> dict[tuple, bool]:
        return {s: self.states[s].get("computed", 0) >= self.warmup
                and group.step - self.states[s]["last"] < self.interval for s in rows}

    def predict(self, state: dict, group: Group, hidden: torch.Tensor) -> torch.Tensor:
        k = group.step - state["last"]
        return hidden.float() + sum(d * k**i / math.factorial(i) for i, d in enumerate(state["derivatives"]))

    def record(self, state: dict, group: Group, hidden: torch.Tensor, output: torch.Tensor) -> None:
        derivatives = [output.float() - hidden.float()]
        for previous in state.get("derivatives", [])[: self.order]:
            derivatives.append((derivatives[-1] - previous) / (group.step - state["last"]))
        state.update(derivatives=derivatives, last=group.step, computed=state.get("computed", 0) + 1)
