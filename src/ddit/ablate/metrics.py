"""Per-sample measurements of a row against its baseline twins, and per-step profiles of its traces.

Sample i of every row has the seed and label of sample i of the baseline, so image
similarity (SSIM, PSNR: Table 1's "how close to the base model") and the distance of
evaluator features are taken pair by pair; a row's figure is their mean.
"""

from __future__ import annotations

import math

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..testbed.data import PROMPTS
from ..testbed.evaluator import Evaluator, frechet_distance
from ..testbed.spectrum import spectral_fd


def _unit(images: torch.Tensor) -> torch.Tensor:
    return (images.clamp(-1, 1) + 1) / 2


@torch.no_grad()
def per_sample(evaluator: Evaluator, images: torch.Tensor, baseline: torch.Tensor, records: list[dict],
               base_size: int) -> dict[str, torch.Tensor]:
    """(N,) values per sample: similarity to its baseline twin, cost, how coarse its schedule was
    and how often a cache skipped its blocks."""
    a, b = _unit(images), _unit(baseline)
    sizes = torch.tensor([r["trace"]["patch_size"] for r in records], dtype=torch.float32)  # (N, steps)
    cached = torch.tensor([r["trace"]["cached"] for r in records], dtype=torch.float32)
    return {
        "sec_per_image": torch.tensor([r["sec"] for r in records], dtype=torch.float64),
        "flops_per_image": torch.tensor([r["flops"] for r in records], dtype=torch.float64),
        "ssim_vs_baseline": structural_similarity_index_measure(a, b, data_range=1.0, reduction="none"),
        "psnr_vs_baseline": peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)),
        "feature_dist_vs_baseline": (evaluator.features(images) - evaluator.features(baseline)).norm(dim=1),
        "mean_patch_size": sizes.mean(dim=1),
        "coarse_step_fraction": (sizes > base_size).float().mean(dim=1),
        "cached_step_fraction": cached.mean(dim=1),
    }


def fd(evaluator: Evaluator, reals: torch.Tensor, images: torch.Tensor) -> float | None:
    """Fréchet distance to real images; None below two samples, where it is undefined."""
    return frechet_distance(evaluator, reals, images) if min(len(reals), len(images)) >= 2 else None


def sfd(reals: torch.Tensor, images: torch.Tensor) -> float | None:
    """Spectral Fréchet distance to real images; None below two samples."""
    return spectral_fd(reals, images) if min(len(reals), len(images)) >= 2 else None


def step_profile(records: list[dict], field: str, size: str | None = None) -> dict[str, list[float]]:
    """Per class, the mean over samples of a trace field at each step (``signals`` needs ``size``);
    steps without a value (a policy's warm-up) are NaN."""
    profile = {}
    for c, prompt in enumerate(PROMPTS):
        rows = [r["trace"][field] for r in records if r["label"] == c]
        rows = [row.get(size, []) for row in rows] if size is not None else rows
        if rows and all(rows):
            values = torch.tensor([[math.nan if v is None else v for v in row] for row in rows], dtype=torch.float64)
            profile[prompt] = values.nanmean(dim=0).tolist()
    return profile
