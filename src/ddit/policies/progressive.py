"""Spectral progressive resolution: the training-free alternative to DDiT (arXiv 2605.18736).

What a user would pick instead of training an adapter: the early steps run the unchanged
model on a half-resolution latent (a quarter of the tokens, like DDiT's patch 2p), then
the latent is upsampled in the DCT domain (its spectrum zero-padded) and denoising goes
on at full resolution. The switch is the noise level ``switch`` (sigma in (0, 1]): swept
like any other parameter, or set by the paper's rule from the clean latents' power
spectrum and a tolerance delta (``ProgressiveResolution.from_latents``, ``spectral_switch``).

It changes the latent's shape between steps, which a pipeline's own loop does not allow,
so it runs in ddit's sampler (the testbed, ``ddit-ablate``); ``ddit.enable`` refuses it.
The sampler starts from the low-frequency part of each sample's full-size noise, so a
sample and its baseline twin share their coarse noise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy.fft import dctn, idctn

from .base import PatchPolicy, Step


class ProgressiveResolution(PatchPolicy):
    """Half resolution while sigma > ``switch``, full resolution after; always the base patch size.

    At the switch the half-resolution latent is DCT-upsampled keeping its amplitude, with no fresh
    noise: its per-pixel variance is right, but its remaining noise sits in the low frequencies alone
    (on white noise the low band's coefficients carry 4x the variance the full-resolution model
    expects at that sigma, the high band none). The later variants that re-noise at the switch
    (REFERENCE §9) are not built; this is the method as the paper describes it."""

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

    @classmethod
    def from_latents(cls, latents: torch.Tensor, delta: float = 0.05) -> "ProgressiveResolution":
        """The paper's switch for these clean latents (``spectral_switch``), not a swept one."""
        return cls(switch=spectral_switch(latents, delta))

    def choose(self, step: Step):
        return self.base_size, {}

    def half(self, sigma: float) -> bool:
        """Whether the step at noise level ``sigma`` runs at half resolution."""
        return sigma > self.switch


def dct_resize(x: torch.Tensor, size: int | tuple[int, int], keep: str) -> torch.Tensor:
    """Resize the last two dims of ``x`` to ``size`` (a side, or (height, width)) by cropping or
    zero-padding its 2-D DCT.

    ``keep="energy"`` (orthonormal, no rescaling): white noise keeps unit variance, for the
    pure-noise start. ``keep="amplitude"``: an image keeps its values (a constant stays that
    constant) and the noise in it its per-pixel variance, for the switch.
    """
    height, width = (size, size) if isinstance(size, int) else size
    spectrum = dctn(x.detach().float().cpu().numpy(), type=2, axes=(-2, -1), norm="ortho")
    out = np.zeros((*spectrum.shape[:-2], height, width), dtype=spectrum.dtype)
    h, w = min(x.shape[-2], height), min(x.shape[-1], width)
    out[..., :h, :w] = spectrum[..., :h, :w]
    if keep == "amplitude":
        out *= math.sqrt(height * width / (x.shape[-2] * x.shape[-1]))
    elif keep != "energy":
        raise ValueError(f"keep is 'energy' or 'amplitude', not {keep!r}")
    return torch.from_numpy(idctn(out, type=2, axes=(-2, -1), norm="ortho")).to(x.device, x.dtype)


def power_law(latents: torch.Tensor) -> tuple[float, float]:
    """``(A, beta)`` of the fit ``P(w) = A w^-beta`` to the clean latents' radial power spectrum.

    ``latents`` is (N, C, H, W), in the scale the model sees (where the sampler's noise has
    unit variance), so that P is the signal's power per frequency relative to the noise's
    (orthonormal 2-D FFT; w in cycles per the image's shorter side). The power is averaged over samples,
    channels and rings of integer radius 1..min(H, W) // 2, and each ring counts once in
    the least-squares fit of log P on log w, so the many faint high frequencies do not
    outweigh the few strong low ones. A power law is what the paper fits: it smooths over
    spectral lines, such as a class of stripes at one frequency.
    """
    if latents.ndim != 4 or min(latents.shape[-2:]) < 4:
        raise ValueError(f"latents must be (N, C, H, W) with H, W >= 4, got shape {tuple(latents.shape)}")
    height, width = latents.shape[-2:]
    power = torch.fft.fft2(latents.detach().float().cpu(), norm="ortho").abs().square().mean((0, 1))
    side = min(height, width)  # frequencies in cycles per the shorter side, on both axes
    fy, fx = torch.fft.fftfreq(height) * side, torch.fft.fftfreq(width) * side
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()
    rings = [radius.round() == r for r in range(1, side // 2 + 1)]
    log_power = torch.stack([power[ring].mean() for ring in rings]).double().log()
    if not torch.isfinite(log_power).all():
        raise ValueError("latents have no power at some frequency: a power law cannot be fitted to them")
    log_radius = torch.stack([radius[ring].log().mean() for ring in rings]).double()  # a ring's own radii
    design = torch.stack([torch.ones_like(log_radius), log_radius], 1)
    log_a, slope = torch.linalg.lstsq(design, log_power[:, None]).solution.squeeze(1).tolist()
    return math.exp(log_a), -slope


def spectral_switch(latents: torch.Tensor, delta: float = 0.05) -> float:
    """The noise level at which to go from half to full resolution, by the paper's rule.

    The half-resolution grid holds frequencies up to its Nyquist w = min(H, W) // 4 cycles
    per shorter side; the switch is that frequency's activation time (arXiv 2605.18736, as sglang
    computes it): sigma = 1 / (1 + sqrt(delta / (P (1 + P - delta)))), with P = A w^-beta
    from ``power_law``. A larger tolerance ``delta`` switches later (more steps at half size).
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta is the tolerance of the spectral rule, in (0, 1), got {delta}")
    amplitude, beta = power_law(latents)
    nyquist = min(latents.shape[-2:]) // 4
    power = amplitude * nyquist ** -beta
    return 1 / (1 + math.sqrt(delta / (power * (1 + power - delta))))
