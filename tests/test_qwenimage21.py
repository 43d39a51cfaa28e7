"""Qwen-Image 2.1 in its stock pipeline, given prompt embeddings (its Qwen3-VL encoder is not built here): the
pipeline's KV cache of the prefix (text, condition images) serves coarse and fine steps alike, and each group of
samples a mixed batch runs in keeps its own rows of it."""

import json
from types import SimpleNamespace

import pytest
import torch
from diffusers import (
    AutoencoderKLQwenImage21,
    FlowMatchEulerDiscreteScheduler,
    QwenImage21Pipeline,
    QwenImage21Transformer2DModel,
)
from test_pipelines import SplitPolicy

import ddit
from ddit.caches import TaylorSeer, TeaCache

STEPS = 4


class Template:
    """What the pipeline's constructor asks of its processor (the system prompt's token count); the prompt
    embeddings given to each call leave it unused."""

    tokenizer = SimpleNamespace(encode=lambda text: [0])

    def apply_chat_template(self, messages, **kwargs):
        return [[0]]


@pytest.fixture(scope="module")
def pipe():
    torch.manual_seed(0)
    transformer = QwenImage21Transformer2DModel(in_channels=64, out_channels=64, num_layers=2, attention_head_dim=16,
                                                num_attention_heads=2, context_in_dim=16, mlp_ratio=2,
                                                axes_dims_rope=(4, 6, 6))
    for p in transformer.parameters():  # zero-initialised layers too, so that outputs depend on everything
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    vae = AutoencoderKLQwenImage21(base_dim=4, decoder_base_dim=4, dim_mult=[1, 1, 1, 1, 1], num_res_blocks=1)
    pipe = QwenImage21Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, text_encoder=None,
                               processor=Template(), transformer=transformer.eval())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps=STEPS, **kwargs):
    """Two samples with true CFG, their prompts of different lengths (the first padded), 256x256: a 16x16 latent."""
    text = torch.Generator().manual_seed(1)
    embeds, negative = torch.randn(2, 7, 16, generator=text), torch.randn(2, 7, 16, generator=text)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, -2:] = 0
    return pipe(prompt_embeds=embeds, prompt_embeds_mask=mask, negative_prompt_embeds=negative,
                negative_prompt_embeds_mask=torch.ones(2, 7, dtype=torch.long), true_cfg_scale=3.0,
                num_inference_steps=steps, output_type="latent", generator=torch.Generator().manual_seed(0),
                **{"height": 256, "width": 256, **kwargs}).images


@torch.no_grad()
def test_base_size_is_stock_and_the_kv_cache_changes_nothing_at_mixed_sizes(pipe):
    stock = generate(pipe)
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    for p in adapter.trainable_parameters():  # LoRA B starts at zero: as if trained, so that a size's LoRA counts
        torch.nn.init.normal_(p, std=0.05)
    ddit.enable(pipe, adapter, policy="baseline")
    assert torch.equal(generate(pipe), stock)
    ddit.disable(pipe)
    ddit.enable(pipe, adapter, policy=SplitPolicy(coarse=4, early=2))  # sample 0 coarse, sample 1 fine: two groups
    cached, recomputed = generate(pipe), generate(pipe, use_kv_cache=False)
    records = [r for r in ddit.summary(pipe).records if r["branch"] == "cond"]
    sizes = sorted((r["step"], r["sample"], r["patch_size"]) for r in records)
    ddit.disable(pipe)
    assert sizes == [(s, i, 4 if i == 0 and s < 2 else 1) for s in range(STEPS) for i in (0, 1)]
    torch.testing.assert_close(cached, recomputed)
    assert (cached[0] - stock[0]).abs().max() > 1e-3 and torch.allclose(cached[1], stock[1], atol=1e-5)


@torch.no_grad()
def test_several_images_per_prompt_run_apart_with_their_own_cache_rows(pipe):
    """num_images_per_prompt=2: four latents under two prompts' img_mask rows (samples share one layout)."""
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    for p in adapter.trainable_parameters():
        torch.nn.init.normal_(p, std=0.05)
    ddit.enable(pipe, adapter, policy=SplitPolicy(coarse=2, early=3))
    cached, recomputed = (generate(pipe, num_images_per_prompt=2, use_kv_cache=cache) for cache in (True, False))
    ddit.disable(pipe)
    assert cached.shape[0] == 4
    torch.testing.assert_close(cached, recomputed)


@torch.no_grad()
def test_caches_skip_steps_in_the_pipeline(pipe):
    """A size's first step runs the whole sequence (and fills its KV cache), its later ones the target alone: the
    caches take the second step's sequence as new, as they take a new size's."""
    adapter = ddit.MultiPatchTransformer(pipe.transformer)
    for cache in (TeaCache(delta=1e9, coefficients="flux1-dev"), TaylorSeer(interval=2, order=1, warmup=1)):
        ddit.enable(pipe, adapter, policy="fixed", fraction=0.5, cache=cache)
        assert generate(pipe, steps=6).isfinite().all()
        cached = [r["cached"] for r in ddit.summary(pipe).records if r["branch"] == "cond" and r["sample"] == 0]
        ddit.disable(pipe)
        # TeaCache computes the last step, TaylorSeer forecasts it
        assert cached == [False, False, True, False, False, not isinstance(cache, TeaCache)]


class Prompted:
    """The pipeline with prompt embeddings of a length that follows the prompt, as its encoder gives them."""

    def __init__(self, pipe):
        self.pipe, self.transformer, self.device = pipe, pipe.transformer, pipe.device

    def __call__(self, prompt, generator, output_type, **call):
        n, text = 3 + len(prompt) % 5, torch.Generator().manual_seed(len(prompt))
        return self.pipe(prompt_embeds=torch.randn(1, n, 16, generator=text),
                         negative_prompt_embeds=torch.randn(1, 4, 16, generator=text), true_cfg_scale=3.0,
                         height=256, width=256, generator=generator, output_type=output_type, **call)


def test_recorded_calls_replay_without_the_kv_cache_and_distil_in_batches_of_one_text_length(pipe, tmp_path):
    """The pipeline's KV cache is not recorded (a replay recomputes the prefix); img_mask follows the text's
    length, so rows of prompts of other lengths are drawn apart."""
    from ddit.distill import DistillConfig, distill
    from ddit.recorded_states import RecordedStates, record_states

    seen = {}
    handle = pipe.transformer.register_forward_hook(
        lambda m, a, k, out: seen.setdefault(k["hidden_states"].numpy().tobytes() + k["encoder_hidden_states"]
                                              .numpy().tobytes(), out[0][:, -256:].clone()), with_kwargs=True)
    record_states(Prompted(pipe), ["a red circle", "stripes"], tmp_path / "states", call={"num_inference_steps": 2},
                  progress=False)
    handle.remove()
    states = RecordedStates(tmp_path / "states")
    for seed in range(4):
        z, kwargs = states.draw(torch.Generator().manual_seed(seed), 3)
        assert "kv_cache" not in kwargs and len({len(t) for t in kwargs["encoder_hidden_states"]}) == 1
        with torch.no_grad():
            out = pipe.transformer(hidden_states=z, **kwargs, return_dict=False)[0][:, -256:]
        for row in range(len(z)):
            key = z[row:row + 1].numpy().tobytes() + kwargs["encoder_hidden_states"][row:row + 1].numpy().tobytes()
            torch.testing.assert_close(out[row:row + 1], seen[key], rtol=1e-5, atol=1e-6)
    model = ddit.MultiPatchTransformer(pipe.transformer)
    try:
        distill(model, states, tmp_path / "run", DistillConfig(steps=2, batch_size=2, num_inference_steps=None,
                                                                        timestep_scale=None), progress=False)
    finally:
        model.detach()
    report = json.loads((tmp_path / "run" / "distill.json").read_text())
    assert report["steps"] == 2 and torch.isfinite(torch.tensor(report["losses"])).all()


def test_a_resolution_whose_coarse_target_does_not_fill_its_slots_is_refused_at_the_first_call(pipe):
    """320x320: a 20x20 latent, which sizes 2 and 4 divide, but at size 4 a 5x5 target: 25 tokens, not slots of 4."""
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    calls = []
    handle = pipe.transformer.adapter.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="5x5 tokens at patch size 4, which does not fill"):
            generate(pipe, height=320, width=320)
    finally:
        handle.remove()
        ddit.disable(pipe)
    assert not calls  # before any step ran
