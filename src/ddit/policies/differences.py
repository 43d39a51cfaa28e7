"""The latent-evolution signal of DDiT Eq. 2-4: finite differences over steps, std per patch, aggregation."""

from __future__ import annotations

import math

import torch


def finite_difference(latents: torch.Tensor, order: int) -> torch.Tensor:
    """The ``order``-th finite difference along dim 0 of latents stacked in denoising order.

    With ``dz_t = z_t - z_{t+1}`` (Eq. 2), the third difference of the last four latents is
    ``z_{t-1} - 3 z_t + 3 z_{t+1} - z_{t+2}`` (Eq. 4): exactly ``numpy.diff(n=order)``.
    A quadratic trajectory has a zero third difference; a cubic, a constant one.
    """
    if latents.shape[0] <= order:
        raise ValueError(f"an order-{order} difference needs {order + 1} latents, got {latents.shape[0]}")
    return torch.diff(latents, n=order, dim=0)


def patch_std(x: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Std inside each p x p patch, over its pixels and channels: (B, C, H, W) -> (B, patches).

    Video (B, C, F, H, W) is patched per frame, like Wan's (1, p, p) tokens; the frames'
    patches all join one population.
    """
    if x.dim() == 4:
        x = x.unsqueeze(2)
    b, c, f, h, w = x.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"latent height and width ({h}, {w}) must be divisible by the patch size {p}")
    x = x.reshape(b, c, f, h // p, p, w // p, p).permute(0, 2, 3, 5, 1, 4, 6)
    return x.reshape(b, f * (h // p) * (w // p), c * p * p).std(dim=-1, correction=0)


def percentile(values: torch.Tensor, rho: float) -> torch.Tensor:
    """The rho-th percentile along the last dim, by nearest rank (numpy's ``inverted_cdf``).

    ``kthvalue`` has no size limit, unlike ``torch.quantile`` (16M elements).
    """
    k = max(1, math.ceil(rho / 100 * values.shape[-1]))
    return values.kthvalue(k, dim=-1).values
