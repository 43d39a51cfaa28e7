"""TeaCache's fit on a pipeline's own generations.

TeaCache skips a step while its rescaled input change stays small, and the rescaling polynomial
is fitted per model: TeaCache publishes FLUX.1-dev's, every other model (and every fine-tune)
needs its own. This runs a stock pipeline on prompts with every step computed, records per sample,
branch and step the change of the first block's modulated input and of the block stack's output,
and fits the polynomial, as TeaCache's own calibration scripts do.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .adapter import MultiPatchTransformer
from .caches import TeaCacheRecorder, delta_for_share, fit_teacache, write_teacache_fit
from .pipeline_call import (GLOBAL_SEED_OFFSET, Prompt, as_prompts, check_call, progress_bars_off, run_pipeline,
                            seeded_globally)
from .pipelines import DynamicPatchTransformer, disable, enable
from .quantized import storage
from .recorded_states import experts
from .self_distill import pipeline_loras

#: Fewer (input change, output change) pairs than this leave a degree-4 fit unconstrained.
MIN_PAIRS = 20
#: Shares of the steps for which the fit file gives the delta that skips them on the calibration's trajectories.
GUIDE_SHARES = (0.2, 0.3, 0.4, 0.5, 0.6)
TWO_EXPERTS = ("a pipeline with two experts (Wan 2.2) needs a fit per expert, which one TeaCache cannot hold; ddit "
               "refuses TeaCache there")


def calibrate_teacache_on_pipeline(pipe, prompts: Sequence[str | Prompt], out: str | os.PathLike, *,
                                   call: dict | None = None, seed: int = 0, progress: bool = True) -> list[float]:
    """Fit TeaCache on ``pipe``'s generations of ``prompts`` and write the fit to ``out`` (a JSON file that
    ``TeaCache(coefficients=out)`` and ``--cache-param teacache.coefficients=OUT`` take); returns it.

    ``call`` holds the pipeline's own arguments (``num_inference_steps``, ``height``, ``guidance_scale``...),
    which should be those the cache will run at; prompt i runs from seed ``seed + i``.
    """
    call, prompts, out = dict(call or {}), as_prompts(prompts), Path(out)
    if not prompts:
        raise ValueError("no prompts to calibrate on; pass at least one")
    if isinstance(pipe.transformer, DynamicPatchTransformer):
        raise ValueError("this pipeline is enabled: TeaCache is fitted on the stock transformer; ddit.disable(pipe) "
                         "first")
    if len(experts(pipe)) > 1:
        raise ValueError(TWO_EXPERTS)
    check_call(pipe, call, prompts)
    recorder = TeaCacheRecorder()
    recorder.check(pipe.transformer)  # before the adapter's layers go into it
    out.parent.mkdir(parents=True, exist_ok=True)  # a bad folder fails now, not after the generations
    adapter = MultiPatchTransformer(pipe.transformer)
    try:
        enable(pipe, adapter, policy="baseline", cache=recorder)  # every step computes
    except Exception:
        adapter.detach()
        raise
    try:
        with progress_bars_off(pipe):  # one bar over the prompts, not one per call
            for i, prompt in enumerate(tqdm(prompts, desc="calibrate teacache", disable=not progress)):
                # not inference_mode: weights model CPU offload moves stay trainable
                with torch.no_grad(), seeded_globally(seed + GLOBAL_SEED_OFFSET + i, pipe._execution_device):
                    run_pipeline(pipe, prompt=prompt.text, generator=torch.Generator("cpu").manual_seed(seed + i),
                                 output_type="latent", **call, **prompt.call_inputs())
    finally:
        disable(pipe)
    if len(recorder.pairs) < MIN_PAIRS:
        raise ValueError(f"{len(recorder.pairs)} pairs of consecutive steps are too few for TeaCache's degree-4 "
                         f"fit (at least {MIN_PAIRS}): give more prompts or steps")
    coefficients = fit_teacache(recorder.pairs)
    deltas = {str(share): delta_for_share(coefficients, recorder.sequences, share) for share in GUIDE_SHARES}
    # a quantized or styled transformer's fit is its own
    about = {"storage": storage(pipe.transformer), "loras": pipeline_loras(pipe)}
    write_teacache_fit(coefficients, out, model=type(pipe.transformer).__name__, prompts=len(prompts),
                       pairs=len(recorder.pairs), call={k: repr(v) for k, v in call.items()}, seed=seed,
                       delta_for_skipped_share=deltas, **{k: v for k, v in about.items() if v})
    return coefficients
