"""Wan 2.2's two experts (``pipe.transformer`` takes the high-noise steps, ``pipe.transformer_2`` the rest) under
one policy: a tiny random stock ``WanPipeline`` whose boundary puts 3 of 6 steps on each expert."""

import pytest
import torch
from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig
from peft.tuners.lora import LoraLayer
from tiny_pipelines import TEXT_LEN, build, generators, latents, per_sample

import ddit
from ddit.caches import TaylorSeer
from ddit.checkpoint import CheckpointError
from ddit.pipelines import ADAPTER_FOLDER
from ddit.policies import FixedPolicy

STEPS = 6  # steps 0-2 on transformer (t >= 750), 3-5 on transformer_2
ATOL = 1e-5


def lora_free(module):
    return not any(isinstance(m, LoraLayer) for m in module.modules())


def trained(adapter):
    """An adapter with nothing at its initial value, as after distillation."""
    with torch.no_grad():
        for p in adapter.trainable_parameters():
            p.add_(0.01 * torch.randn_like(p))
    return adapter


def both(pipe):
    torch.manual_seed(0)
    return {"transformer": trained(ddit.MultiPatchTransformer(pipe.transformer)),
            "transformer_2": trained(ddit.MultiPatchTransformer(pipe.transformer_2))}


def tokens_per_call(expert):
    """The image tokens of each call of ``expert``'s first block."""
    seen = []
    expert.blocks[0].register_forward_pre_hook(lambda m, args, kw: seen.append(args[0].shape[1]), with_kwargs=True)
    return seen


class StepLog(FixedPolicy):
    """A fixed schedule that logs the step indices it decides and its resets."""

    def __init__(self, schedule):
        super().__init__(schedule)
        self.indices, self.resets = [], 0

    def reset(self, batch_size, base_size, candidates):
        self.resets += 1
        super().reset(batch_size, base_size, candidates)

    def choose(self, step):
        self.indices.append(step.index)
        return super().choose(step)


def test_the_baseline_policy_with_both_adapters_is_the_stock_pipeline_and_disable_restores_both():
    pipe, kwargs = build("wan22")
    stock = latents(pipe(**kwargs(batch=2, steps=STEPS)))
    originals = pipe.transformer, pipe.transformer_2
    ddit.enable(pipe, both(pipe), policy="baseline")
    assert torch.allclose(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    assert (pipe.transformer, pipe.transformer_2) == originals
    assert lora_free(pipe.transformer) and lora_free(pipe.transformer_2)
    assert torch.equal(latents(pipe(**kwargs(batch=2, steps=STEPS))), stock)


def test_both_experts_run_coarse_steps_under_one_policy_whose_history_crosses_the_switch():
    pipe, kwargs = build("wan22")
    stock = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    high, low = tokens_per_call(pipe.transformer), tokens_per_call(pipe.transformer_2)
    policy = StepLog([4, 4, 2, 4, 4, 2])
    ddit.enable(pipe, both(pipe), policy=policy)
    out = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    fine = max(high)
    assert high == [fine // 4] * 4 + [fine] * 2  # two calls (cond, uncond) per step
    assert low == [fine // 4] * 4 + [fine] * 2
    assert policy.indices == list(range(STEPS)) and policy.resets == 1  # one generation, not one per expert
    summary = ddit.summary(pipe)
    assert sorted({r["step"] for r in summary.records}) == list(range(STEPS))
    assert summary.coarse_fraction == pytest.approx(4 / 6)
    assert (out - stock).abs().max() > 1e-3 and torch.isfinite(out).all()
    assert torch.equal(latents(pipe(**kwargs(batch=1, steps=STEPS))), out)


def test_a_ddit_cache_starts_over_when_the_second_expert_takes_over():
    """TaylorSeer computing every 4th step from step 0 would reuse at step 3; the new expert's blocks have
    no features yet, so step 3 computes, and the next two reuse."""
    pipe, kwargs = build("wan22")
    ddit.enable(pipe, both(pipe), policy="baseline", cache=TaylorSeer(interval=4, order=0, warmup=1))
    outs = []
    for _ in range(2):  # the second generation starts on the first expert again, after one that ended on the other
        outs.append(latents(pipe(**kwargs(batch=1, steps=STEPS))))
        cached = {r["step"]: r["cached"] for r in ddit.summary(pipe).records if r["branch"] == "cond"}
        assert cached == {0: False, 1: True, 2: True, 3: False, 4: True, 5: True}
    assert torch.isfinite(outs[0]).all() and torch.equal(*outs)
    with pytest.raises(ValueError, match="TeaCache's rescaling polynomial is fitted to one model"):
        ddit.enable(ddit.disable(pipe), both(pipe), cache="teacache")
    assert lora_free(pipe.transformer) and lora_free(pipe.transformer_2)


@pytest.mark.parametrize("config", [FirstBlockCacheConfig(threshold=0.5),
                                    TaylorSeerCacheConfig(cache_interval=2, disable_cache_before_step=1, max_order=1,
                                                          cache_identifiers=[r"blocks\.\d+\.(attn1|attn2|ffn)"])],
                         ids=["first_block", "taylorseer"])
def test_a_diffusers_cache_config_on_both_experts_is_the_stock_pipeline_cached_the_same_way(config):
    pipe, kwargs = build("wan22")
    stock = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    pipe.transformer.enable_cache(config)
    pipe.transformer_2.enable_cache(config)
    stock_cached = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    pipe.transformer.disable_cache()
    pipe.transformer_2.disable_cache()
    assert (stock_cached - stock).abs().max() > 1e-3  # the hooks do skip work here

    ddit.enable(pipe, both(pipe), policy="baseline", cache=config)
    for _ in range(2):  # and again from the first expert, whose hooks last ran a generation ago
        assert torch.allclose(latents(pipe(**kwargs(batch=1, steps=STEPS))), stock_cached, atol=ATOL, rtol=0)
    ddit.disable(pipe)
    assert not pipe.transformer.is_cache_enabled and not pipe.transformer_2.is_cache_enabled


def test_an_adapter_for_the_first_expert_alone_leaves_the_second_stock_with_a_warning():
    pipe, kwargs = build("wan22")
    low = tokens_per_call(pipe.transformer_2)
    with pytest.warns(UserWarning, match="transformer_2 .* stays stock"):
        ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy([4] * STEPS))
    pipe(**kwargs(batch=1, steps=STEPS))
    assert len(set(low)) == 1 and lora_free(pipe.transformer_2)
    assert {r["step"] for r in ddit.summary(pipe).records} == {0, 1, 2}


def test_an_enabled_two_expert_pipeline_saves_both_adapters_and_loads_them_back(tmp_path):
    pipe, kwargs = build("wan22")
    ddit.enable(pipe, both(pipe), policy=FixedPolicy([4, 2, 2, 4, 2, 2]))
    out = latents(pipe(**kwargs(batch=1, steps=STEPS)))
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / ADAPTER_FOLDER / "transformer_2" / "multipatch_config.json").exists()
    assert (tmp_path / "transformer_2" / "config.json").exists()
    assert torch.equal(latents(pipe(**kwargs(batch=1, steps=STEPS))), out)  # still enabled after saving

    loaded = type(pipe).from_pretrained(tmp_path, tokenizer=None, text_encoder=None, vae=None)
    loaded.set_progress_bar_config(disable=True)
    assert lora_free(loaded.transformer) and lora_free(loaded.transformer_2)
    adapters = ddit.load_adapters(loaded, tmp_path)
    assert sorted(adapters) == ["transformer", "transformer_2"]
    for adapter in adapters.values():
        adapter.detach()
    ddit.enable(loaded, {"transformer": tmp_path, "transformer_2": tmp_path}, policy=FixedPolicy([4, 2, 2, 4, 2, 2]))
    assert torch.allclose(latents(loaded(**kwargs(batch=1, steps=STEPS))), out, atol=ATOL, rtol=0)  # each its own
    ddit.disable(loaded)
    ddit.enable(loaded, tmp_path, policy=FixedPolicy([4, 2, 2, 4, 2, 2]))
    assert torch.allclose(latents(loaded(**kwargs(batch=1, steps=STEPS))), out, atol=ATOL, rtol=0)

    ddit.disable(loaded)  # saved again with the first expert's adapter alone: the second's must not linger
    with pytest.warns(UserWarning, match="stays stock"):
        ddit.enable(loaded, ddit.MultiPatchTransformer(loaded.transformer), policy="baseline")
    loaded.save_pretrained(tmp_path)
    assert not (tmp_path / ADAPTER_FOLDER / "transformer_2").exists()


def test_what_two_experts_cannot_do_is_refused_before_anything_changes(tmp_path):
    pipe, kwargs = build("wan22")
    originals = pipe.transformer, pipe.transformer_2

    def unchanged():
        return (pipe.transformer, pipe.transformer_2) == originals and lora_free(originals[0]) \
            and lora_free(originals[1])

    adapters = both(pipe)
    for adapter in adapters.values():
        adapter.detach()
    pipe.transformer_2.enable_cache(FirstBlockCacheConfig(threshold=0.1))  # its hooks would see every size
    with pytest.raises(ValueError, match="pipe.transformer_2 has a diffusers cache enabled"):
        ddit.enable(pipe, adapters, policy="third_order")
    pipe.transformer_2.disable_cache()
    assert unchanged()
    with pytest.raises(ValueError, match="by expert .* got \\['transformer_3'\\]"):
        ddit.enable(pipe, {"transformer_3": adapters["transformer"]})
    with pytest.raises(ValueError, match="another transformer than pipe.transformer_2"):
        ddit.enable(pipe, {"transformer": adapters["transformer"], "transformer_2": adapters["transformer"]})
    assert unchanged()
    other = ddit.MultiPatchTransformer(pipe.transformer_2, patch_sizes=(4,))
    other.detach()
    with pytest.raises(ValueError, match="different patch sizes"):
        ddit.enable(pipe, {"transformer": adapters["transformer"], "transformer_2": other})
    assert unchanged()

    # a folder with a second expert's adapter, on a pipeline without one; a second adapter for another model
    adapters["transformer"].save_pretrained(tmp_path / "a")
    adapters["transformer_2"].save_pretrained(tmp_path / "a" / "transformer_2")
    wan21, _ = build("wan")
    with pytest.raises(ValueError, match="adapter for a second expert .* has none"):
        ddit.enable(wan21, tmp_path / "a")
    assert lora_free(wan21.transformer)
    adapters["transformer"].save_pretrained(tmp_path / "b")
    adapters["transformer"].save_pretrained(tmp_path / "b" / "transformer_2")
    pipe.transformer_2 = build("wan")[0].transformer
    pipe.transformer_2.register_to_config(num_layers=3)  # another config: the adapter is not for it
    with pytest.raises(CheckpointError, match="was made for"):
        ddit.enable(pipe, tmp_path / "b")
    assert lora_free(pipe.transformer) and pipe.transformer is originals[0]


def wan22_image_to_video():
    """Wan 2.2 A14B's image-to-video layout: no image encoder, the image's latent and a mask appended after the
    noisy latent (16 + 16 + 4 = 36 channels in, 16 out), and two experts."""
    from diffusers import (AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline,
                           WanTransformer3DModel)

    from ddit.tiny_pipelines import wake_zeros

    def transformer(seed):
        torch.manual_seed(seed)
        return wake_zeros(WanTransformer3DModel(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36, out_channels=16,
            text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32))

    torch.manual_seed(2)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae, image_processor=None,
                                   image_encoder=None, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                   transformer=transformer(0), transformer_2=transformer(1), boundary_ratio=0.75)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(3))

    def call():
        return dict(image=image, prompt_embeds=per_sample([0], 1, TEXT_LEN, 16), height=128, width=128,
                    negative_prompt_embeds=torch.randn(1, TEXT_LEN, 16, generator=torch.Generator().manual_seed(4)),
                    num_frames=5, num_inference_steps=STEPS, generator=generators([0]), output_type="latent")

    return pipe, call


def test_wan22_image_to_video_runs_both_experts_and_its_policy_reads_the_noisy_latent_alone():
    pipe, call = wan22_image_to_video()
    stock = latents(pipe(**call()))
    ddit.enable(pipe, both(pipe), policy="baseline")
    assert torch.equal(latents(pipe(**call())), stock)
    ddit.disable(pipe)

    seen = []

    class Seen(FixedPolicy):
        def choose(self, step):
            seen.append(step.latent.shape[1])
            return super().choose(step)

    ddit.enable(pipe, both(pipe), policy=Seen([4] * STEPS))
    out = latents(pipe(**call()))
    assert torch.isfinite(out).all() and ddit.summary(pipe).coarse_fraction == 1.0  # both experts coarse
    assert seen == [16] * STEPS  # the 36 channels in are the noisy latent's 16, then the image's condition
