"""A ddit plugin with one patch policy: ``sigma_threshold``."""

from __future__ import annotations

from collections.abc import Sequence

from ddit.plugins import hookimpl
from ddit.policies import PatchPolicy, Step


class SigmaThresholdPolicy(PatchPolicy):
    """Coarse patches while the noise level sigma is above ``threshold``, the base size after:
    the time-based switch of PPFlow and Lumina-Video. It reads no signal, so it costs nothing
    and gives the same schedule to every sample.

    ``size`` defaults to the coarsest candidate. ``threshold`` is in sigma units
    (1 = noise .. 0 = clean for flow matching).
    """

    name = "sigma_threshold"
    threshold: float = 0.7

    def __init__(self, threshold: float | None = None, size: int | None = None):
        super().__init__()
        self.threshold = type(self).threshold if threshold is None else threshold
        self.size = size
        if not self.threshold > 0:
            raise ValueError(f"threshold is a noise level and must be > 0, got {self.threshold}")

    def reset(self, batch_size: int, base_size: int, candidates: Sequence[int]) -> None:
        super().reset(batch_size, base_size, candidates)
        if self.size is not None and self.size not in self.candidates:
            raise ValueError(f"size {self.size} is not a candidate; use one of {self.candidates}")

    def choose(self, step: Step):
        coarse = self.size or self.candidates[-1]
        return (coarse if step.sigma > self.threshold else self.base_size), {}


@hookimpl
def ddit_policies():
    return [SigmaThresholdPolicy]
