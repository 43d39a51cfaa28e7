"""The testbed's multi-patch adapter: its distillation data and the shipped weights.

Distillation sees the same procedural images as the base model, with a tenth of
the labels replaced by the null label so that the unconditional branch used by
classifier-free guidance is distilled too.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..adapter import MultiPatchTransformer
from ..distill import LatentDataset
from .base_model import ASSETS, NULL_LABEL, SHIPPED_BASE, load_base_model
from .data import make_dataset

SHIPPED_ADAPTER = ASSETS / "adapter"


def distillation_data(num_images: int = 20000, seed: int = 0, null_fraction: float = 0.1) -> LatentDataset:
    images, labels = make_dataset(num_images, seed)
    drop = torch.rand(num_images, generator=torch.Generator().manual_seed(seed + 1)) < null_fraction
    made = f"testbed distillation_data({num_images}, seed={seed}, null_fraction={null_fraction})"
    return LatentDataset(images, class_labels=torch.where(drop, NULL_LABEL, labels), identity=made)


def load_multipatch_model(base: str | Path = SHIPPED_BASE,
                          adapter: str | Path = SHIPPED_ADAPTER) -> MultiPatchTransformer:
    """The base model wrapped with its trained adapter (by default both as shipped)."""
    if not Path(adapter).exists():
        raise FileNotFoundError(f"no multi-patch adapter at {adapter}; train one with "
                                f"`ddit distill --out runs/adapter` and pass its adapter folder")
    return MultiPatchTransformer.from_pretrained(load_base_model(base), adapter).eval()
