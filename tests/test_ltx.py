"""LTX-Video in a tiny random stock ``LTXPipeline``: patch 1 (sizes 1, 2 and 4), CFG as one doubled batch
inside a cache context named "cond_uncond", which holds both branches."""

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo, LTXImageToVideoPipeline
from peft.tuners.lora import LoraLayer
from tiny_pipelines import build, latents

import ddit
from ddit.policies import FixedPolicy, PatchPolicy

STEPS = 6
TOKENS = 2 * 16 * 16  # 2 latent frames of 16x16 at patch 1


def tokens_per_call(pipe):
    seen = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(tuple(kwargs["hidden_states"].shape[:2])), with_kwargs=True)
    return seen


def test_the_baseline_policy_is_the_stock_pipeline_and_disable_restores_it():
    pipe, kwargs = build("ltx")
    stock = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    original = pipe.transformer
    ddit.enable(pipe, ddit.MultiPatchTransformer(original), policy="baseline")
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock, atol=1e-5, rtol=0)
    ddit.disable(pipe)
    assert pipe.transformer is original and not any(isinstance(m, LoraLayer) for m in original.modules())
    assert torch.equal(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock)


def test_coarse_steps_run_on_fewer_tokens_and_both_cfg_branches_of_a_sample_share_its_size():
    pipe, kwargs = build("ltx")
    stock = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    seen = tokens_per_call(pipe)

    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=OneCoarse())
    out = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    # a step of two groups: sample 1's two CFG rows at patch 1, sample 0's two at patch 4 (16x fewer tokens)
    assert seen[:4] == [(2, TOKENS), (2, TOKENS // 16)] * 2 and set(seen[4:]) == {(4, TOKENS)}
    records = ddit.summary(pipe).records
    assert len(records) == 2 * STEPS and {r["branch"] for r in records} == {None}  # two samples, not four rows
    assert [r["patch_size"] for r in records if r["sample"] == 0] == [4, 4, 1, 1, 1, 1]
    assert torch.isfinite(out).all() and (out[0] - stock[0]).abs().max() > 1e-4
    assert torch.allclose(out[1], stock[1], atol=1e-5)  # sample 1 ran the stock steps


def test_a_fixed_schedule_repeats_exactly_and_a_cache_runs_on_its_blocks():
    pipe, kwargs = build("ltx")
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    ddit.enable(pipe, adapter, policy=FixedPolicy([4, 2, 1, 1, 1, 1]))
    out = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    assert torch.equal(latents(pipe(**kwargs(batch=1, steps=STEPS))), out)
    assert ddit.summary(pipe).coarse_fraction == 2 / STEPS
    ddit.disable(pipe)
    ddit.enable(pipe, adapter, policy=FixedPolicy([4, 2, 1, 1, 1, 1]), cache="taylorseer")
    cached = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    assert torch.isfinite(cached).all() and any(r["cached"] for r in ddit.summary(pipe).records)


class OneCoarse(PatchPolicy):
    """Sample 0 at patch 4 for the first two steps, sample 1 always at the base size."""

    name = "one_coarse"

    def choose(self, step):
        return torch.tensor([4 if step.index < 2 else 1, 1]), {}


def image_to_video():
    """``LTXImageToVideoPipeline`` over the tiny transformer, with a tiny random VAE (4x in space and time: a
    64x64 first frame and 9 frames give 3 latent frames of 16x16); the first frame's tokens run at t = 0."""
    pipe, kwargs = build("ltx")
    torch.manual_seed(0)
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, encoder_causal=True, decoder_causal=False, patch_size=1)
    device = pipe.transformer.device  # DDIT_TEST_DEVICE's, as build() put it (benchmarks/gpu_check.sh: cuda)
    i2v = LTXImageToVideoPipeline(scheduler=pipe.scheduler, vae=vae, text_encoder=None, tokenizer=None,
                                  transformer=pipe.transformer).to(device)
    i2v.set_progress_bar_config(disable=True)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(3)).to(device)  # one per sample

    def call(batch):
        return {**kwargs(batch=batch, steps=4), "height": 64, "width": 64, "num_frames": 9, "image": images[:batch]}

    return i2v, call


def test_image_to_video_runs_coarse_steps_with_its_per_token_timesteps():
    pipe, call = image_to_video()
    stock = latents(pipe(**call(2)))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.allclose(latents(pipe(**call(2))), stock, atol=1e-5, rtol=0)
    ddit.disable(pipe)

    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=OneCoarse())
    out = latents(pipe(**call(2)))  # a step of two groups: each cuts its rows of the (rows, tokens) timesteps
    records = ddit.summary(pipe).records
    assert sorted({r["step"] for r in records}) == [0, 1, 2, 3]  # steps told apart by the noisiest token's t
    assert [r["patch_size"] for r in records if r["sample"] == 0] == [4, 4, 1, 1]
    assert torch.isfinite(out).all() and (out[0] - stock[0]).abs().max() > 1e-4
    assert torch.allclose(out[1], stock[1], atol=1e-5)


def test_coordinates_a_pipeline_passes_itself_are_refused_at_the_first_call():
    """LTXConditionPipeline's video_coords cover conditioning tokens beside the grid."""
    pipe, kwargs = build("ltx")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    given = {}
    pipe.transformer.adapter.backbone.register_forward_pre_hook(lambda m, a, kw: given.update(kw), with_kwargs=True)
    pipe(**kwargs(batch=1, steps=1))
    coords = torch.zeros(len(given["hidden_states"]), 3, given["hidden_states"].shape[1])
    with pytest.raises(ValueError, match="video_coords cannot be used with dynamic patches"):
        pipe.transformer(**{**given, "video_coords": coords})
