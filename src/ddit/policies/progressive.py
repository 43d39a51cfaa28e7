"""Spectral progressive resolution: the training-free alternative to DDiT (arXiv 2605.18736).

What a user would pick instead of training an adapter: the early steps run the unchanged
model on a half-resolution latent (a quarter of the tokens, like DDiT's patch 2p), then
the latent is upsampled in the DCT domain (its spectrum zero-padded) and denoising goes
on at full resolution. The paper picks the switch from the latents' power spectrum with
a tolerance; here the switch is the noise level ``switch`` (sigma in (0, 1]), swept like
any other parameter.

It changes the latent's shape between steps, which a pipeline's own loop does not allow,
so it runs in ddit's sampler (the testbed, ``ddit-ablate``); ``ddit.enable`` refuses it.
The sampler starts from the low-frequency part of each sample's full-size noise, so a
sample and its baseline twin share their coarse noise.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.fft import dctn, idctn

from .base import PatchPolicy, Step


class ProgressiveResolution(PatchPolicy):
    """Half resolution while sigma > ``switch``, full resolution after; always the base patch size."""

    name = "progressive"
    #: Chosen by the rule of docs/policies.md (largest FLOP speed-up with FD <= 1.1x the baseline's) over
    #: switch 0.4 / 0.6 / 0.8 / 0.9 on tuning seeds 0-31 (32 images per row: docs/policies.md).
    switch: float = 0.4

    def __init__(self, switch: float | None = None):
        super().__init__()
        self.switch = type(self).switch if switch is None else float(switch)
        if not 0 < self.switch <= 1:
            raise ValueError(f"switch is the noise level sigma at which to go to full resolution, in (0, 1], "
                             f"got {self.switch}")

    def choose(self, step: Step):
        return self.base_size, {}

    def half(self, sigma: float) -> bool:
        """Whether the step at noise level ``sigma`` runs at half resolution."""
        return sigma > self.switch


def dct_resize(x: torch.Tensor, size: int, keep: str) -> torch.Tensor:
    """Resize the last two (square) dims of ``x`` to ``size`` by cropping or zero-padding its 2-D DCT.

    ``keep="energy"`` (orthonormal, no rescaling): white noise keeps unit variance, for the
    pure-noise start. ``keep="amplitude"``: an image keeps its values (a constant stays that
    constant) and the noise in it its per-pixel variance, for the switch.
    """
    n = x.shape[-1]
    spectrum = dctn(x.detach().float().cpu().numpy(), type=2, axes=(-2, -1), norm="ortho")
    out = np.zeros((*spectrum.shape[:-2], size, size), dtype=spectrum.dtype)
    m = min(n, size)
    out[..., :m, :m] = spectrum[..., :m, :m]
    if keep == "amplitude":
        out *= size / n
    elif keep != "energy":
        raise ValueError(f"keep is 'energy' or 'amplitude', not {keep!r}")
    return torch.from_numpy(idctn(out, type=2, axes=(-2, -1), norm="ortho")).to(x.device, x.dtype)
