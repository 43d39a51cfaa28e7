"""Quality of a testbed model: adherence and FD, measured by the evaluator (FD, the headline,
sees residual noise and lost detail as well as wrong content), and spectral FD
(``spectrum.py``), a distance between power spectra that needs no trained network.

Labels are balanced over the classes; real reference images come from data
seeds that neither the base model nor the evaluator trained on. The FD between
two disjoint real sets of the same size (``fd_real_floor``) shows how much of
a model's FD is sampling noise of the metric itself.
"""

from __future__ import annotations

import torch

from .base_model import generate
from .data import PROMPTS, make_dataset
from .evaluator import Evaluator, classify, frechet_distance
from .spectrum import spectral_fd

REAL_SEEDS = (7001, 7002)  # held out from every training run


def balanced_labels(num: int) -> torch.Tensor:
    return torch.arange(num) % len(PROMPTS)


def adherence(evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Share of images classified as their conditioning class, overall and per prompt."""
    hit = (classify(evaluator, images) == labels).float()
    return {
        "adherence": hit.mean().item(),
        "adherence_per_class": {p: hit[labels == c].mean().item() for c, p in enumerate(PROMPTS)
                                if (labels == c).any()},
    }


def evaluate_images(evaluator: Evaluator, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Adherence, FD and spectral FD of generated images against real ones of the same size."""
    real_a, _ = make_dataset(len(images), REAL_SEEDS[0])
    real_b, _ = make_dataset(len(images), REAL_SEEDS[1])
    return {
        **adherence(evaluator, images, labels),
        "fd": frechet_distance(evaluator, real_a, images),
        "fd_real_floor": frechet_distance(evaluator, real_a, real_b),
        "sfd": spectral_fd(real_a, images),
        "sfd_real_floor": spectral_fd(real_a, real_b),
    }


def evaluate_model(model, evaluator: Evaluator, *, num: int = 512, steps: int = 50, guidance: float = 2.0,
                   seed: int = 0, progress: bool = False) -> dict:
    labels = balanced_labels(num)
    images = generate(model, labels, seed=seed, steps=steps, guidance=guidance, progress=progress).images
    return {"num": num, "steps": steps, "guidance": guidance, "seed": seed,
            **evaluate_images(evaluator, images, labels)}
