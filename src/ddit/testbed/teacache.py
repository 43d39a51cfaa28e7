"""The testbed's TeaCache fit: where it ships, how it is made, and the cache that uses it."""

from __future__ import annotations

from pathlib import Path

import torch

from ..caches import TeaCache, TeaCacheRecorder, fit_teacache, load_teacache_fit
from .base_model import generate
from .data import PROMPTS

#: The fit for the testbed's base model (``ddit calibrate teacache`` writes it).
TESTBED_FIT = Path(__file__).parent / "assets" / "teacache.json"


def testbed_teacache(**params) -> TeaCache:
    """TeaCache with the testbed's shipped fit (unless ``coefficients`` are given)."""
    params.setdefault("coefficients", load_teacache_fit(TESTBED_FIT))
    return TeaCache(**params)


def calibrate_teacache(model, *, per_class: int = 8, steps: int = 50, guidance: float = 2.0, seed: int = 0,
                       batch_size: int = 64, progress: bool = False) -> list[float]:
    """Fit TeaCache's polynomial for a testbed model (a DiT, or a MultiPatchTransformer: its base size).

    Samples ``per_class`` images of every testbed class at the base patch size and
    fits output change against input change over consecutive steps of each sample,
    where input is the first block's modulated input and output the block stack's
    output (what the cache reuses).
    """
    recorder = TeaCacheRecorder()
    generate(model, torch.arange(len(PROMPTS)).repeat(per_class), seed=seed, steps=steps, guidance=guidance,
             cache=recorder, batch_size=batch_size, progress=progress)
    return fit_teacache(recorder.pairs)
