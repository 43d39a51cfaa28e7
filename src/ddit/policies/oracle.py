"""An upper-bound reference: ask the model itself which patch sizes it can afford."""

from __future__ import annotations

import torch

from .base import PatchPolicy, Step, largest_below


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
