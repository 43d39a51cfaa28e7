"""SkyReels-V2 inside its stock pipelines: text-to-video, and diffusion forcing, whose per-frame schedulers leave
the pipeline's own scheduler unstepped (the runtime tells its steps apart by the timestep)."""

import pytest
import torch
from diffusers import DiffusionPipeline

import ddit
from ddit.caches import TaylorSeer, TeaCache
from ddit.tiny_pipelines import TINY_CALL, save_tiny_pipeline

STEPS = 5


@pytest.fixture(scope="module", params=["skyreels", "skyreels-df"])
def folder(request, tmp_path_factory):
    return request.param, save_tiny_pipeline(request.param, tmp_path_factory.mktemp(request.param))


def generate(pipe, kind, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a red circle", num_inference_steps=STEPS, output_type="latent", max_sequence_length=16,
                generator=torch.Generator().manual_seed(0), **{**TINY_CALL[kind], **kwargs}).frames


@torch.no_grad()
def test_base_size_is_stock_and_each_step_is_decided_once(folder):
    kind, path = folder
    pipe = DiffusionPipeline.from_pretrained(path)
    stock = generate(pipe, kind)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.equal(generate(pipe, kind), stock)
    assert torch.equal(generate(pipe, kind), stock)  # again: diffusion forcing copies the watched scheduler
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", fraction=0.4)
    coarse = generate(pipe, kind)
    records = ddit.summary(pipe).records
    assert [r["step"] for r in records if r["branch"] == "cond"] == list(range(STEPS))
    assert [r["patch_size"] for r in records if r["branch"] == "cond"] == [8, 8, 2, 2, 2]
    sigmas = [r["sigma"] for r in records if r["branch"] == "cond"]
    assert sigmas == pytest.approx(pipe.scheduler.sigmas[:STEPS].tolist())
    assert coarse.isfinite().all() and (coarse - stock).abs().max() > 1e-3


@torch.no_grad()
def test_teacache_skips_the_middle_steps_and_taylorseer_forecasts_them(folder):
    kind, path = folder
    pipe = DiffusionPipeline.from_pretrained(path)
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    for cache in (TeaCache(delta=1e9, coefficients="flux1-dev"), TaylorSeer(interval=2, order=1, warmup=1)):
        ddit.enable(pipe, adapter, policy="fixed", fraction=0.4, cache=cache)
        assert generate(pipe, kind).isfinite().all()
        cached = [r["cached"] for r in ddit.summary(pipe).records if r["branch"] == "cond"]
        ddit.disable(pipe)
        if isinstance(cache, TeaCache):  # a new size computes its first step; the last step always computes
            assert cached == [False, True, False, True, False]
        else:  # computes each size's first step, then forecasts every other one
            assert cached == [False, True, False, True, False]


def test_diffusion_forcing_with_frames_at_different_noise_levels_is_refused(tmp_path):
    """Asynchronous diffusion forcing (ar_step > 0) keeps later frames noisier: one size per sample and step, and
    steps told by the timestep, do not fit it."""
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("skyreels-df", tmp_path))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    with pytest.raises(ValueError, match="ar_step=0"):
        generate(pipe, "skyreels-df", num_frames=13, ar_step=3, causal_block_size=1)
