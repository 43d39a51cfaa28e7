"""TeaCache (Liu et al. 2024): skip the blocks while the inputs have barely moved.

The change of the first block's timestep-modulated input between steps (relative
L1) is rescaled by a degree-4 polynomial into an estimate of the change of the
output, and accumulated; while the sum stays below ``delta`` the blocks are
skipped and the last computed residual is reused. The polynomial is fitted per
model: record (input change, output change) pairs with ``TeaCacheRecorder`` on the
model's own generations, then ``fit_teacache`` (the testbed does this in
``ddit.testbed.teacache``, and ships its fit).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers.models.normalization import AdaLayerNormZero

from ..backbones import spec_for
from ..backbones.base import BackboneSpec
from .base import Cache, Group
from .stack import StackRun, blocks_of

#: What TeaCache says when it does not know a block's modulated input.
UNKNOWN_BLOCK = "TeaCache does not know the modulated input of {}; subclass TeaCache and override indicator()"


def rel_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a - b| / mean |b|."""
    return float((a - b).abs().mean() / b.abs().mean())


#: Fits published with TeaCache, by the name ``coefficients=`` takes (highest degree first), each with the delta
#: it defaults to: TeaCache4FLUX's 1.8x setting (0.4; it also gives 0.25, 0.6 and 0.8), which the DDiT paper pairs
#: with DDiT; TeaCache4LTX-Video's, fitted on LTX-Video 0.9.1 in diffusers' LTXPipeline on the first block's input
#: modulated per token as ddit's LTX spec computes it, at its 2.1x setting (0.05; 1.6x at 0.03). TeaCache measures
#: a change over the whole call (LTX batches both CFG branches), ddit per sample and branch.
PUBLISHED_FITS = {
    "flux1-dev": {"coefficients": [498.651651, -283.781631, 55.8554382, -3.82021401, 0.264230861], "delta": 0.4},
    "ltx-video-0.9.1": {"coefficients": [21.4700694, -12.8016453, 2.31279151, 0.792487521, 0.00969274326],
                        "delta": 0.05},
}


def modulated_input(run: StackRun, spec: BackboneSpec | None = None) -> torch.Tensor:
    """What TeaCache watches at the first block of a pass: its timestep-modulated input. Where the block's norm1
    is adaLN-zero (DiT, FLUX.1, SD3, HunyuanImage 2.1, HunyuanVideo 1.5) its output; else what the backbone's
    ``spec`` computes for its ``teacache_blocks`` (PixArt, Sana, LTX, Z-Image, FLUX.2, Chroma, Qwen-Image,
    SD3.5 Medium; on Wan the timestep projection its blocks take, as TeaCache's Wan code watches)."""
    block, arguments = run.block, run.arguments
    if _adaln_zero(block):
        return block.norm1(run.hidden, arguments.get("timestep"), arguments.get("class_labels"),
                           hidden_dtype=run.hidden.dtype, emb=arguments.get("temb"))[0]
    if spec is None or type(block).__name__ not in spec.teacache_blocks:
        raise NotImplementedError(UNKNOWN_BLOCK.format(type(block).__name__))
    return spec.teacache_input(block, run.hidden, arguments)


def watched_spec(model) -> BackboneSpec | None:
    """The spec that computes what TeaCache watches on ``model``'s first block (None: its adaLN-zero output); a
    ValueError where neither knows it."""
    block = blocks_of(model)[0]
    if _adaln_zero(block):
        return None
    spec = spec_for(getattr(model, "backbone", model))
    if type(block).__name__ not in spec.teacache_blocks:
        raise ValueError(UNKNOWN_BLOCK.format(type(block).__name__))
    return spec


def _adaln_zero(block) -> bool:
    return isinstance(getattr(block, "norm1", None), AdaLayerNormZero)


def load_teacache_fit(path: str | Path) -> list[float]:
    """Polynomial coefficients saved by ``write_teacache_fit``, highest degree first."""
    try:
        return json.loads(Path(path).read_text())["coefficients"]
    except FileNotFoundError:
        raise FileNotFoundError(f"no TeaCache fit at {path}: fit one with TeaCacheRecorder and fit_teacache "
                                "(the testbed: ddit calibrate teacache), then write_teacache_fit(), "
                                "or pass coefficients=[...] (highest degree first)") from None


def resolve_fit(coefficients: Sequence[float] | str | os.PathLike | None) -> list[float] | None:
    """Coefficients given as numbers, as a published fit's name (``PUBLISHED_FITS``) or as a fit file."""
    if isinstance(coefficients, (str, os.PathLike)):
        if str(coefficients) in PUBLISHED_FITS:
            return list(PUBLISHED_FITS[str(coefficients)]["coefficients"])
        if not Path(coefficients).is_file():
            raise ValueError(f"TeaCache coefficients {str(coefficients)!r} are neither a published fit "
                             f"({', '.join(PUBLISHED_FITS)}) nor a fit file; fit one with `ddit calibrate "
                             "teacache --pipeline DIR --prompts FILE --out FIT.json`, or pass the numbers (highest "
                             "degree first)")
        coefficients = load_teacache_fit(coefficients)
    if coefficients is None:
        return None
    coefficients = [float(c) for c in coefficients]
    if not np.isfinite(coefficients).all():
        raise ValueError(f"TeaCache coefficients {coefficients} are not all finite: fit them again")
    return coefficients


def least_step(coefficients: Sequence[float]) -> float:
    """The least a step adds to TeaCache's sum: the fit (clipped at 0) at its lowest for input changes in [0, 1]."""
    changes = np.linspace(0.0, 1.0, 10_001)
    return float(np.clip(np.polyval(coefficients, changes), 0.0, None).min())


def teacache_step(distance: float, change: float, coefficients: Sequence[float], delta: float) -> tuple[float, bool]:
    """TeaCache's rule at a step that may skip: add the rescaled input ``change`` (clipped at 0: a fitted polynomial
    can dip below zero near no change; a change cannot) to the accumulated ``distance``; skip while the sum stays
    below ``delta``, else compute and start again from 0. Returns the new sum and whether to skip."""
    distance += max(float(np.polyval(coefficients, change)), 0.0)
    return (distance, True) if distance < delta else (0.0, False)


def skipped_steps(coefficients: Sequence[float], delta: float, changes: Sequence[float]) -> list[bool]:
    """Which steps TeaCache at ``delta`` skips on a trajectory whose input changes between consecutive steps are
    ``changes`` (one fewer than the steps): the first and last steps always compute."""
    skips, distance = [False], 0.0
    for change in changes[:-1]:
        distance, skip = teacache_step(distance, change, coefficients, delta)
        skips.append(skip)
    return skips + [False] * bool(changes)


def skipped_share(coefficients: Sequence[float], delta: float, sequences: Sequence[Sequence[float]]) -> float:
    """The share of all steps TeaCache at ``delta`` skips on ``sequences`` (``TeaCacheRecorder.sequences``)."""
    skips = [s for changes in sequences for s in skipped_steps(coefficients, delta, changes)]
    return sum(skips) / max(len(skips), 1)


def delta_for_share(coefficients: Sequence[float], sequences: Sequence[Sequence[float]], share: float) -> float | None:
    """A delta at which TeaCache skips at least ``share`` of the steps on ``sequences``: the middle of the range
    of deltas that skip the same steps as the least such delta (by bisection), not its edge, where one step's sum
    sits and the smallest change of the trajectory would make it compute. None where no delta reaches the share
    (the first and last steps always compute). An estimate for the real run: the sequences were recorded with
    every step computed, and a skip moves the trajectory a little."""
    rescaled = [max(float(np.polyval(coefficients, c)), 0.0) for changes in sequences for c in changes]
    top = sum(r for r in rescaled if np.isfinite(r)) + 1.0  # above every sum: every step that may skip does

    def least(target: float) -> float | None:
        low, high = 0.0, top
        if skipped_share(coefficients, high, sequences) < target:
            return None
        for _ in range(100):
            middle = (low + high) / 2
            low, high = (low, middle) if skipped_share(coefficients, middle, sequences) >= target else (middle, high)
        return high

    first = least(share)
    if first is None:
        return None
    steps = sum(len(changes) + 1 for changes in sequences)
    after = least(skipped_share(coefficients, first, sequences) + 0.5 / steps)  # one more step skipped
    return (first + (2 * first if after is None else after)) / 2


def write_teacache_fit(coefficients: Sequence[float], path: str | Path, **about) -> None:
    """Save a fit (and whatever describes how it was made) where ``load_teacache_fit`` finds it."""
    Path(path).write_text(json.dumps({"coefficients": [float(c) for c in coefficients], **about}, indent=1))


class TeaCache(Cache):
    """Skip while the accumulated rescaled input change of a sample stays below ``delta``.

    The first and last steps always compute, and so does a sample's first step at
    a new patch size. ``coefficients`` (highest degree first) are the model's own fit:
    another model's would misjudge every change, so there is no default. The
    default ``delta`` was chosen on the testbed (docs/caches.md); higher skips more.
    """

    name = "teacache"
    #: chosen on the testbed by the issue-13 rule (largest speed-up with FD <= 1.1x): docs/policies.md
    delta: float = 0.025

    def __init__(self, delta: float | None = None, coefficients: Sequence[float] | str | Path | None = None):
        if delta is None:  # a published fit comes with its own; another fit's scale is the model's
            delta = PUBLISHED_FITS.get(str(coefficients), {}).get("delta", type(self).delta)
        self.delta = delta
        if not self.delta >= 0:
            raise ValueError(f"delta must be >= 0 (0 never skips), got {self.delta}")
        self.coefficients = resolve_fit(coefficients)
        if self.coefficients is not None and least_step(self.coefficients) >= self.delta > 0:
            least = least_step(self.coefficients)
            raise ValueError(f"TeaCache with these coefficients adds at least {least:.3g} per step (the fit's least "
                             f"value for input changes 0 to 1), so at delta {self.delta:g} it never skips: use a "
                             f"delta above {least:.3g}")
        self.spec = None  # the spec check() finds computes what TeaCache watches, if not an adaLN-zero output
        super().__init__()

    def check(self, model) -> None:
        super().check(model)
        if self.coefficients is None:
            raise ValueError("TeaCache needs its polynomial fit for this model: pass coefficients= a fit file, a "
                             f"published fit by name ({', '.join(PUBLISHED_FITS)}) or the numbers (highest degree "
                             "first); fit them on the model's own generations with `ddit calibrate teacache "
                             "--pipeline DIR --prompts FILE --out FIT.json` (the testbed: `ddit calibrate teacache`)")
        if type(self).indicator is TeaCache.indicator:
            self.spec = watched_spec(model)


    def indicator(self, run: StackRun) -> torch.Tensor:
        """What TeaCache watches, one row per model row; override for another block type."""
        return modulated_input(run, self.spec)

    def reuse(self, group: Group, run: StackRun, rows: dict[tuple, slice]) -> dict[tuple, bool]:
        indicator = self.indicator(run).float()
        always = group.step in (0, group.num_steps - 1)
        skip = {}
        for s, r in rows.items():
            state = self.states[s]
            previous, state["indicator"] = state.get("indicator"), indicator[r]
            if always or previous is None:
                state["distance"], skip[s] = 0.0, False
                continue
            state["distance"], skip[s] = teacache_step(state["distance"], rel_l1(indicator[r], previous),
                                                       self.coefficients, self.delta)
        return skip


class TeaCacheRecorder(Cache):
    """Computes every step and records, per sample and step, (input change, output change) of the stack:
    the ``pairs`` that ``fit_teacache`` fits; and the input changes of each sample, branch and call in step order
    (``sequences``), on which ``delta_for_share`` estimates what a delta skips."""

    name = "teacache_calibration"

    def __init__(self) -> None:
        super().__init__()
        self.pairs: list[tuple[float, float]] = []
        self.sequences: list[list[float]] = []
        self.spec = None

    def check(self, model) -> None:
        super().check(model)
        self.spec = watched_spec(model)

    def reuse(self, group, run, rows):
        indicator = modulated_input(run, self.spec).float()
        for s, r in rows.items():
            self.states[s]["next"] = indicator[r]
        return dict.fromkeys(rows, False)

    def finish(self, group, run, output, compute, stream=None):
        """Records the image tokens' change; a side stream's output (LTX-2's audio), computed too, as it is."""
        return output if stream is not None else super().finish(group, run, output, compute)

    def record(self, state, group, hidden, output):
        indicator, output = state.pop("next"), output.float()
        if "indicator" in state:
            change = rel_l1(indicator, state["indicator"])
            self.pairs.append((change, rel_l1(output, state["output"])))
            state["changes"].append(change)
        else:  # a sample's first step in a call
            state["changes"] = []
            self.sequences.append(state["changes"])
        state["indicator"], state["output"] = indicator, output


def fit_teacache(pairs: Sequence[tuple[float, float]]) -> list[float]:
    """TeaCache's degree-4 polynomial, output change as a function of input change; highest degree first. Pairs
    that are not finite (a 0 / 0 change, an overflow) are left out; too few finite ones are refused."""
    pairs = np.array(pairs, dtype=np.float64).reshape(-1, 2)
    finite = pairs[np.isfinite(pairs).all(1)]
    if len(finite) < 5:
        raise ValueError(f"{len(finite)} finite (input change, output change) pairs of {len(pairs)}: a degree-4 fit "
                         "needs more; give more prompts or steps")
    x, y = finite.T
    return np.polyfit(x, y, 4).tolist()
