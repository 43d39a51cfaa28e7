"""The testbed's base model: a small diffusers ``DiTTransformer2DModel``.

It is the same class as facebook/DiT-XL-2, only smaller, so every code path
that works here works on the real checkpoint. Two quirks of the diffusers class
are fixed here (REFERENCE.md section 7): each block embeds labels with its own
hard-coded 10% dropout, which would drop labels inconsistently across blocks,
so dropout is switched off and done outside the model; and the class lacks the
DiT paper's adaLN-zero initialisation, which makes training slower.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import DiTTransformer2DModel
from torch import nn

from ..caches import Cache
from ..policies import PatchPolicy
from ..sampling import Samples, sample, transformer_velocity
from ..weights import load_diffusers_model
from .data import CHANNELS, IMAGE_SIZE, PROMPTS

#: Where the trained models ship inside the package.
ASSETS = Path(__file__).parent / "assets"
SHIPPED_BASE = ASSETS / "base"

#: Config of the shipped model: 6 layers, width 128, patch 2 (2.1M parameters).
BASE_CONFIG: dict = dict(
    num_attention_heads=4,
    attention_head_dim=32,
    in_channels=CHANNELS,
    out_channels=CHANNELS,
    num_layers=6,
    sample_size=IMAGE_SIZE,
    patch_size=2,
    num_embeds_ada_norm=len(PROMPTS),
    norm_num_groups=1,
)

#: Label id meaning "no class", used for classifier-free guidance.
NULL_LABEL = len(PROMPTS)


def disable_label_dropout(model: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """Turn off the per-block label dropout that diffusers hard-codes to 0.1."""
    for block in model.transformer_blocks:
        block.norm1.emb.class_embedder.dropout_prob = 0.0
    return model


def build_base_model(**overrides) -> DiTTransformer2DModel:
    """A freshly initialised base model with adaLN-zero init (DiT paper, section 3.2)."""
    model = DiTTransformer2DModel(**{**BASE_CONFIG, **overrides})
    for block in model.transformer_blocks:
        nn.init.zeros_(block.norm1.linear.weight)
        nn.init.zeros_(block.norm1.linear.bias)
    for layer in (model.proj_out_1, model.proj_out_2):
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    return disable_label_dropout(model)


def load_base_model(folder: str | Path = SHIPPED_BASE) -> DiTTransformer2DModel:
    """The trained base model (by default the one shipped with ddit), ready to sample."""
    return disable_label_dropout(load_diffusers_model(DiTTransformer2DModel, folder)).eval()


def generate(model, labels: torch.Tensor, *, seed: int = 0, steps: int = 50, guidance: float = 2.0,
             policy: PatchPolicy | None = None, cache: Cache | None = None, batch_size: int = 64,
             progress: bool = False) -> Samples:
    """Class-conditional images in [-1, 1] from a testbed model (a DiT or a MultiPatchTransformer wrapping one),
    with their per-step traces; ``policy`` picks patch sizes per sample and step (the base size without one)."""
    return sample(transformer_velocity(model), labels, sample_shape=(CHANNELS, IMAGE_SIZE, IMAGE_SIZE),
                  seed=seed, steps=steps, guidance=guidance, null_label=NULL_LABEL, policy=policy, cache=cache,
                  batch_size=batch_size, progress=progress)
