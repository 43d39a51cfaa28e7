"""LTX-2: one transformer denoises a video and its audio, and returns both. Only the video changes patch size; the
audio keeps its tokens, and its output is what the backbone computes beside the coarse video. The backbone alone,
and the stock ``LTX2Pipeline`` (tests/tiny_pipelines.py: prompt embeddings through its real tiny text connectors;
CFG, spatio-temporal and modality guidance: three calls a step)."""

import pytest
import torch
from diffusers import LTX2ImageToVideoPipeline, LTX2VideoTransformer3DModel
from peft.tuners.lora import LoraLayer
from tiny_pipelines import build, ltx2_transformer

import ddit
from ddit.adapter import MultiPatchTransformer, PatchHead
from ddit.distill import DistillationLoss
from ddit.caches import Cache, TaylorSeer, TeaCache
from ddit.caches.base import Group
from ddit.caches.stack import check_stack, replace_stack
from ddit.policies import FixedPolicy, PatchPolicy
from ddit.tiny_pipelines import wake_zeros

B, GRID = 2, (2, 8, 8)  # two samples; latent frames, rows, columns
STEPS, TOKENS = 6, 3 * 16 * 16  # the pipeline's video: 3 latent frames of 16x16


def randomized():
    return ltx2_transformer().eval()  # its zero-initialised layers woken: outputs depend on everything


def inputs(**changes):
    g = torch.Generator().manual_seed(0)
    f, h, w = GRID
    return {**dict(hidden_states=torch.randn(B, f * h * w, 4, generator=g),
                   audio_hidden_states=torch.randn(B, 5, 4, generator=g),
                   encoder_hidden_states=torch.randn(B, 6, 32, generator=g),
                   audio_encoder_hidden_states=torch.randn(B, 6, 32, generator=g),
                   encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]),
                   audio_encoder_attention_mask=torch.tensor([[1, 1, 1, 1, 0, 0], [1] * 6]),
                   timestep=torch.tensor([10.0, 900.0]), num_frames=f, height=h, width=w, audio_num_frames=5),
            **changes}


def image_to_video():
    """Image-to-video's timesteps: one per video token, the first frame's at t = 0; the audio's one per sample."""
    t = torch.full((B, GRID[0] * GRID[1] * GRID[2]), 700.0)
    t[:, : GRID[1] * GRID[2]] = 0.0
    return dict(timestep=t, audio_timestep=torch.full((B,), 700.0))


@torch.no_grad()
def test_both_outputs_are_the_backbones_at_the_base_size_and_through_the_spec_forward():
    backbone = randomized()
    model = MultiPatchTransformer(backbone)
    layers = backbone.proj_in, backbone.proj_out, backbone._gradient_checkpointing_func
    for changes in ({}, image_to_video()):
        video, audio = backbone(**inputs(**changes), return_dict=False)
        for size in (None, 1):
            out = model(**inputs(**changes), patch_size=size)
            assert torch.equal(out.sample, video) and torch.equal(out.audio_sample, audio)
        given = model._signature.bind(**inputs(**changes), return_dict=False)
        given.apply_defaults()
        head = PatchHead(*model.spec.base_weights(), scale=1)  # the backbone's own layers, through the spec
        out = model._patched(head, 1, model.spec.latent(given.arguments), given.arguments)
        assert len(out) == 2
        assert (out[0] - video).abs().max() <= 1e-5 and (out[1] - audio).abs().max() <= 1e-5
    assert (backbone.proj_in, backbone.proj_out, backbone._gradient_checkpointing_func) == layers  # put back
    assert model.spec.timestep(inputs(**image_to_video())).tolist() == [700.0, 700.0]


@torch.no_grad()
def test_ltx23s_blocks_are_reproduced_through_the_spec_and_run_coarse():
    """LTX-2.3: gated attention, cross-attention modulated by the prompt and by the other stream's sigma
    (use_cross_timestep), text at each stream's own width, and spatio-temporal guidance perturbing one row."""
    config = dict(gated_attn=True, audio_gated_attn=True, cross_attn_mod=True, audio_cross_attn_mod=True,
                  use_prompt_embeddings=False, perturbed_attn=True)
    base = {k: v for k, v in ltx2_transformer().config.items() if not k.startswith("_")}  # the tiny 2.0's sizes
    torch.manual_seed(0)
    backbone = wake_zeros(LTX2VideoTransformer3DModel(**{**base, **config})).eval()
    model = MultiPatchTransformer(backbone)
    call = inputs(encoder_hidden_states=torch.randn(B, 6, 16), audio_encoder_hidden_states=torch.randn(B, 6, 8),
                  sigma=torch.tensor([10.0, 900.0]), use_cross_timestep=True, spatio_temporal_guidance_blocks=[1],
                  perturbation_mask=torch.tensor([0.0, 1.0]))
    reference = backbone(**call, return_dict=False)
    given = model._signature.bind(**call, return_dict=False)
    given.apply_defaults()
    out = model._patched(PatchHead(*model.spec.base_weights(), scale=1), 1, model.spec.latent(given.arguments),
                         given.arguments)
    assert all((o - r).abs().max() <= 1e-5 for o, r in zip(out, reference))
    coarse = model(**call, patch_size=2, return_dict=False)
    assert [c.shape for c in coarse] == [r.shape for r in reference] and all(c.isfinite().all() for c in coarse)


@torch.no_grad()
def test_a_coarse_step_keeps_the_audio_tokens_and_changes_the_audio_only_through_cross_attention():
    model = MultiPatchTransformer(randomized())
    seen = []
    model.backbone.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((kwargs["hidden_states"].shape[1],
                                                  kwargs["audio_hidden_states"].shape[1])), with_kwargs=True)
    base = model(**inputs(), return_dict=False)
    for size in (2, 4):
        video, audio = model(**inputs(), patch_size=size, return_dict=False)
        assert video.shape == base[0].shape and audio.shape == base[1].shape
        assert video.isfinite().all() and not torch.allclose(audio, base[1], atol=1e-4)
        alone = model(**inputs(isolate_modalities=True), patch_size=size, return_dict=False)[1]
        assert (alone - model(**inputs(isolate_modalities=True), return_dict=False)[1]).abs().max() <= 1e-5
    assert set(seen) == {(128, 5), (128 // 4, 5), (128 // 16, 5)}  # the video's tokens at sizes 1, 2, 4; 5 audio
    coarse = model(**inputs(**image_to_video()), patch_size=4).sample
    assert coarse.isfinite().all() and not torch.allclose(coarse, model(**inputs(timestep=torch.full(
        (B,), 700.0)), patch_size=4).sample, atol=1e-3)  # the first frame's t = 0 counts


@torch.no_grad()
def test_timesteps_of_every_shape_and_dtype_the_backbone_takes_run_coarse():
    """Per sample as (B,) or (B, 1), per token, floats or integers: each as at the base size."""
    model = MultiPatchTransformer(randomized())
    tokens = GRID[0] * GRID[1] * GRID[2]
    for size in (2, 4):
        per_sample = model(**inputs(timestep=torch.tensor([10.0, 900.0])), patch_size=size).sample
        assert torch.equal(model(**inputs(timestep=torch.tensor([[10.0], [900.0]])), patch_size=size).sample,
                           per_sample)
        audio = dict(audio_timestep=torch.tensor([10.0, 900.0]))  # per token, the audio's is given (as in I2V)
        per_token = model(**inputs(timestep=torch.tensor([[10.0], [900.0]]).expand(B, tokens), **audio),
                          patch_size=size)
        assert torch.allclose(per_token.sample, per_sample, atol=1e-5)
        integers = model(**inputs(timestep=torch.tensor([[10], [900]]).expand(B, tokens), **audio), patch_size=size)
        assert torch.allclose(integers.sample, per_sample, atol=1e-5)


def test_the_backbone_is_put_back_when_a_coarse_forward_fails():
    backbone = randomized()
    model = MultiPatchTransformer(backbone)
    layers = backbone.proj_in, backbone.proj_out, backbone._gradient_checkpointing_func
    with pytest.raises(RuntimeError):
        model(**inputs(audio_hidden_states=torch.randn(B, 5, 3)), patch_size=2)  # the audio's channels: wrong
    assert (backbone.proj_in, backbone.proj_out, backbone._gradient_checkpointing_func) == layers


def test_a_coarse_token_spans_the_fine_tokens_it_holds():
    model = MultiPatchTransformer(randomized())
    fine = model.backbone.rope.prepare_video_coords(B, *GRID, torch.device("cpu"), fps=25.0)
    coarse = model.spec._coarse_bounds(fine, (GRID[0], GRID[1] // 2, GRID[2] // 2), 2)
    assert coarse.shape == (B, 3, 2 * 4 * 4, 2)
    centres = fine.mean(-1).reshape(B, 3, GRID[0], 4, 2, 4, 2).mean((4, 6)).flatten(2)
    assert torch.allclose(coarse.mean(-1), centres)  # at the centre of its fine tokens; frames keep theirs
    assert torch.equal(coarse[:, 0, :16], fine[:, 0, :1].expand(B, 16, 2))


def test_lora_sits_on_the_videos_layers_and_fine_token_arguments_are_refused_at_coarse_sizes():
    model = MultiPatchTransformer(randomized())
    names = {n.split(".", 2)[2] for n, m in model.backbone.named_modules() if isinstance(m, LoraLayer)}
    assert names == {"attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2"}
    tokens = GRID[0] * GRID[1] * GRID[2]
    with pytest.raises(ValueError, match="video_self_attention_mask cannot be used at a coarse patch size"):
        model(**inputs(video_self_attention_mask=torch.ones(B, tokens, tokens)), patch_size=2)
    with pytest.raises(ValueError, match="video tokens are not the \\(2, 8, 4\\) grid the call names"):
        model(**inputs(width=4), patch_size=2)


def test_distillation_counts_the_audio_and_checkpointing_gives_every_size_its_own_gradients():
    """A coarse video step changes the audio output too: the loss compares both. The backbone's own gradient
    checkpointing recomputes a block with the LoRA of the size that ran it."""
    def gradients(checkpointing):
        backbone = randomized()
        torch.manual_seed(0)  # peft's LoRA A
        model = MultiPatchTransformer(backbone)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            model.enable_gradient_checkpointing()
        x, rest = inputs()["hidden_states"], {k: v for k, v in inputs().items() if k != "hidden_states"}
        loss = DistillationLoss(model, model.patch_sizes[1:])(x, rest)
        loss.sum().backward()
        return model, loss.detach(), {name: p.grad for name, p in model.named_parameters() if ".lora_" in name}

    model, loss, plain = gradients(False)
    with torch.no_grad():
        teacher = model(**inputs(), return_dict=False)
        student = model(**inputs(), patch_size=2, return_dict=False)
    assert torch.allclose(loss[0], sum(torch.nn.functional.mse_loss(s, t) for s, t in zip(student, teacher)))
    checkpointed = gradients(True)[2]
    for size in (2, 4):
        names = [name for name in plain if f".patch{size}." in name]
        assert names and all(plain[n].abs().sum() > 0 for n in names if "lora_A" in n)
        assert all(torch.allclose(checkpointed[n], plain[n], rtol=1e-4, atol=1e-7) for n in names), size
    # accelerate's FSDP shards the blocks one by one: LTX-2 names them as its repeated blocks only
    assert DistillationLoss(model, (2,))._no_split_modules == ["LTX2VideoTransformerBlock"]


class OneCoarse(PatchPolicy):
    """Sample 0 at patch 4 for the first two steps, sample 1 always at the base size."""

    name = "one_coarse"

    def choose(self, step):
        return torch.tensor([4 if step.index < 2 else 1, 1]), {}


def test_the_stock_pipeline_runs_the_baseline_unchanged_and_disable_restores_it():
    pipe, kwargs = build("ltx2")
    stock = pipe(**kwargs(batch=2, steps=STEPS))
    original = pipe.transformer
    ddit.enable(pipe, ddit.MultiPatchTransformer(original), policy="baseline")
    out = pipe(**kwargs(batch=2, steps=STEPS))
    assert torch.equal(out.frames, stock.frames) and torch.equal(out.audio, stock.audio)
    ddit.disable(pipe)
    assert pipe.transformer is original and not any(isinstance(m, LoraLayer) for m in original.modules())
    out = pipe(**kwargs(batch=2, steps=STEPS))
    assert torch.equal(out.frames, stock.frames) and torch.equal(out.audio, stock.audio)


def test_coarse_video_steps_in_the_stock_pipeline_and_a_samples_guidance_calls_share_its_size():
    pipe, kwargs = build("ltx2")
    stock = pipe(**kwargs(batch=2, steps=STEPS))
    seen = []
    pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: seen.append((len(kwargs["hidden_states"]), kwargs["hidden_states"].shape[1],
                                                  kwargs["audio_hidden_states"].shape[1])), with_kwargs=True)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=OneCoarse())
    out = pipe(**kwargs(batch=2, steps=STEPS))
    audio = stock.audio.shape[2]  # audio tokens: one per latent audio frame, never coarsened
    # a step: CFG's doubled batch, then STG's and modality isolation's rows, each in two groups of one size
    step = [(2, TOKENS, audio), (2, TOKENS // 16, audio)] + [(1, TOKENS, audio), (1, TOKENS // 16, audio)] * 2
    assert seen[:6] == step and seen[6:12] == step and set(seen[12:]) == {(4, TOKENS, audio), (2, TOKENS, audio)}
    records = ddit.summary(pipe).records
    assert {r["branch"] for r in records} == {None, "uncond_stg", "uncond_modality"}
    assert [r["patch_size"] for r in records if r["sample"] == 0] == [4] * 6 + [1] * 12
    first = records[1]  # sample 0's CFG call at patch 4: its two rows' video tokens and audio tokens
    assert (first["sample"], first["tokens"], first["base_tokens"]) == (0, 2 * (TOKENS // 16 + audio),
                                                                        2 * (TOKENS + audio))
    assert (out.frames[0] - stock.frames[0]).abs().max() > 1e-3 and (out.audio[0] - stock.audio[0]).abs().max() > 1e-4
    assert torch.allclose(out.frames[1], stock.frames[1], atol=1e-5)  # sample 1 ran the stock steps, video
    assert torch.allclose(out.audio[1], stock.audio[1], atol=1e-5)  # and audio


def test_a_second_stage_from_the_first_stages_latents_is_a_generation_of_its_own():
    """LTX-2's two-stage use: a refine call given the first call's video and audio latents and its own sigmas."""
    pipe, kwargs = build("ltx2")
    first = pipe(**kwargs(batch=1, steps=4))

    def refine():
        return pipe(**{**kwargs(batch=1, steps=3), "latents": first.frames, "audio_latents": first.audio,
                       "sigmas": [0.6, 0.4, 0.2]})

    stock = refine()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.equal(pipe(**kwargs(batch=1, steps=4)).frames, first.frames) and torch.equal(refine().frames,
                                                                                             stock.frames)
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FixedPolicy([4, 1, 1]))
    out = refine()
    assert [r["patch_size"] for r in ddit.summary(pipe).records if r["branch"] is None] == [4, 1, 1]
    assert (out.frames - stock.frames).abs().max() > 1e-3 and out.audio.isfinite().all()


def test_image_to_video_runs_coarse_steps_with_its_per_token_timesteps():
    """``LTX2ImageToVideoPipeline`` gives each video token its timestep (the first frame's 0) and the audio one per
    sample."""
    pipe, kwargs = build("ltx2")
    i2v = LTX2ImageToVideoPipeline(**pipe.components)
    i2v.set_progress_bar_config(disable=True)
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3)).to(pipe.device)

    def call():  # image_crf=0: no re-compression, which takes PIL images
        return {**kwargs(batch=2, steps=4), "image": images, "image_crf": 0}

    stock = i2v(**call())
    modulation = []
    i2v.transformer.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: modulation.append(kwargs["temb"].shape[:2]), with_kwargs=True)
    ddit.enable(i2v, ddit.MultiPatchTransformer(i2v.transformer), policy=OneCoarse())
    out = i2v(**call())
    assert modulation[:2] == [(2, TOKENS), (2, TOKENS // 16)]  # one modulation per token, coarse ones too
    assert [r["patch_size"] for r in ddit.summary(i2v).records if r["sample"] == 0] == [4] * 6 + [1] * 6
    assert (out.frames[0] - stock.frames[0]).abs().max() > 1e-3
    assert torch.allclose(out.frames[1], stock.frames[1], atol=1e-5)
    assert torch.allclose(out.audio[1], stock.audio[1], atol=1e-5)


def test_calls_whose_video_tokens_are_not_the_named_grid_are_refused_at_the_first_call():
    """LTX-2's keyframe (DFR) pipeline names no grid; the condition and IC-LoRA pipelines append tokens to it."""
    pipe, kwargs = build("ltx2")
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    given = {}
    pipe.transformer.adapter.backbone.register_forward_pre_hook(lambda m, a, kw: given.update(kw), with_kwargs=True)
    pipe(**kwargs(batch=1, steps=1))
    unnamed = {k: v for k, v in given.items() if k not in ("num_frames", "height", "width")}
    with pytest.raises(ValueError, match="video tokens are not the \\(None, None, None\\) grid the call names"):
        pipe.transformer(**unnamed)
    appended = torch.cat([given["hidden_states"], given["hidden_states"][:, :16]], 1)
    with pytest.raises(ValueError, match=f"the {TOKENS + 16} video tokens are not the \\(3, 16, 16\\) grid"):
        pipe.transformer(**{**given, "hidden_states": appended})


class ReuseAfterFirst(Cache):
    """Computes a sample's first step, reuses its residuals at later ones (the samples in ``computing``: never)."""

    name = "reuse_after_first"

    def __init__(self, computing=()):
        self.computing = computing
        super().__init__()

    def reuse(self, group, run, rows):
        return {s: group.step > 0 and s not in self.computing for s in rows}


SAMPLES = ((None, 0), (None, 1))


@torch.no_grad()
@pytest.mark.parametrize("size", [None, 2])
@pytest.mark.parametrize("computing", [(), SAMPLES[:1]])
def test_a_skipped_step_reuses_the_residual_of_the_video_and_of_the_audio(size, computing):
    """Called again on the same inputs, a step that reuses the last computed residuals gives that step's outputs,
    the audio's too (which the stack finishes at the audio's own output norm); also where one sample computes
    beside one that reuses."""
    model = MultiPatchTransformer(randomized())
    cache = ReuseAfterFirst(computing)
    check_stack(model)
    outputs = []
    for step in (0, 1):
        with replace_stack(model, cache.standing_in(Group(step, 2, SAMPLES, size or 1))):
            outputs.append(model(**inputs(), patch_size=size, return_dict=False))
    assert cache.reused == {s: s not in computing for s in SAMPLES}
    assert all((computed - reused).abs().max() <= 1e-5 for computed, reused in zip(*outputs))


@torch.no_grad()
@pytest.mark.parametrize("size", [None, 2])
def test_taylorseer_extrapolates_the_audios_residual_as_the_videos(size):
    """Two computed steps, then one extrapolated to first order: each stream's finished output is its input plus
    2 r1 - r0, r the residual (output - input) of each computed step."""
    model = MultiPatchTransformer(randomized())
    cache = TaylorSeer(interval=3, order=1, warmup=2)
    first, norms = model.backbone.transformer_blocks[0], (model.backbone.norm_out, model.backbone.audio_norm_out)
    seen = {"in": [], "out": []}
    first.register_forward_pre_hook(lambda m, a, kw: seen["in"].append(
        (kw["hidden_states"], kw["audio_hidden_states"])), with_kwargs=True)
    for step, t in enumerate((900.0, 700.0, 500.0)):
        with replace_stack(model, cache.standing_in(Group(step, 6, SAMPLES, size or 1))):
            finished = [norm.register_forward_pre_hook(lambda m, a: seen["out"].append(a[0])) for norm in norms]
            model(**inputs(timestep=torch.full((B,), t)), patch_size=size, return_dict=False)
            for hook in finished:
                hook.remove()
    assert cache.reused == dict.fromkeys(SAMPLES, True)
    for stream in (0, 1):  # the video, the audio
        x = [seen["in"][step][stream] for step in range(3)]
        y = seen["out"][stream::2]
        expected = x[2] + 2 * (y[1] - x[1]) - (y[0] - x[0])
        assert (y[2] - expected).abs().max() <= 1e-4 * expected.abs().max()


def test_feature_caches_run_in_the_stock_pipeline_beside_coarse_steps():
    pipe, kwargs = build("ltx2")
    stock = pipe(**kwargs(batch=2, steps=STEPS))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=OneCoarse(),
                cache=TaylorSeer(interval=2, order=1))
    out = pipe(**kwargs(batch=2, steps=STEPS))
    records = ddit.summary(pipe).records
    cached = {(r["step"], r["sample"], r["branch"]) for r in records if r["cached"]}
    assert {step for step, _, _ in cached} == {2, 4}  # warmed up on 2 steps (again at a new size), then every other
    assert out.frames.isfinite().all() and out.audio.isfinite().all()
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline",
                cache=TeaCache(delta=0.5, coefficients=[0, 0, 0, 1, 0]))  # the change as it is: skips some steps
    out = pipe(**kwargs(batch=2, steps=STEPS))
    assert any(r["cached"] for r in ddit.summary(pipe).records) and out.audio.isfinite().all()
    assert (out.audio - stock.audio).abs().max() > 1e-5
