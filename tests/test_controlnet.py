"""ControlNet pipelines (FLUX.1, SD3, Qwen-Image): the ControlNet runs as stock on the fine latent, and its residuals
reach coarse steps averaged over the fine tokens each coarse token covers, as a coarse token starts as their mean.
The backbones alone (more blocks than residuals, as real ControlNets have), and the stock pipelines from
``ddit tiny-pipeline KIND-controlnet`` folders."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    DiffusionPipeline,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetInpaintPipeline,
    FluxControlNetModel,
    FluxControlNetPipeline,
    FluxMultiControlNetModel,
    FluxTransformer2DModel,
    QwenImageControlNetInpaintPipeline,
    QwenImageControlNetModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    StableDiffusion3ControlNetInpaintingPipeline,
)
from PIL import Image

import ddit
from ddit.ablate.cli import main as ablate
from ddit.adapter import MultiPatchTransformer, PatchHead
from ddit.backbones import patchify, pool_tokens
from ddit.caches import TaylorSeer, TeaCache
from ddit.cli import main as ddit_main
from ddit.policies import FixedPolicy, PatchPolicy
from ddit.tiny_pipelines import CONTROLNET_KINDS, TINY_CALL, save_tiny_pipeline, wake_zeros

ROOT = Path(__file__).resolve().parents[1]
B, ROWS, COLS = 2, 8, 4  # two samples; fine tokens of a 16 x 8 latent under a 2x2 patch
STEPS, ATOL = 4, 1e-5
DEVICE = torch.device(os.environ.get("DDIT_TEST_DEVICE", "cpu"))  # the stock pipelines' (benchmarks/gpu_check.sh)


def flux(**config):
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=4, num_single_layers=3,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    ids = torch.zeros(ROWS, COLS, 3)
    ids[..., 1], ids[..., 2] = torch.arange(ROWS)[:, None], torch.arange(COLS)[None]
    return model, dict(hidden_states=torch.randn(B, ROWS * COLS, 64), encoder_hidden_states=torch.randn(B, 5, 32),
                       pooled_projections=torch.randn(B, 32), timestep=torch.tensor([0.3, 0.9]),
                       img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]))


def sd3():
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=7, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    return model, dict(hidden_states=torch.randn(B, 4, 2 * ROWS, 2 * COLS), encoder_hidden_states=torch.randn(B, 5, 32),
                       pooled_projections=torch.randn(B, 16), timestep=torch.tensor([300.0, 900.0]))


def qwenimage():
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=4,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        axes_dims_rope=(4, 6, 6))
    return model, dict(hidden_states=torch.randn(B, ROWS * COLS, 64), encoder_hidden_states=torch.randn(B, 5, 32),
                       encoder_hidden_states_mask=torch.ones(B, 5, dtype=torch.long),
                       timestep=torch.tensor([0.3, 0.9]), img_shapes=[[(1, ROWS, COLS)]] * B)


def sana():  # patch 1: the fine tokens are the latent's pixels
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=4, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=32, mlp_ratio=2.0, sample_size=8,
                                   patch_size=1)
    return model, dict(hidden_states=torch.randn(B, 4, ROWS, COLS), encoder_hidden_states=torch.randn(B, 5, 32),
                       timestep=torch.tensor([10, 900]))


# each family's residual arguments, fewer than its blocks (a residual serves several), in counts where FLUX's and
# Qwen-Image's ceil(blocks / residuals) blocks per residual and SD3's blocks / residuals pick differently
FAMILIES = {
    "flux": (flux, {"controlnet_block_samples": 3, "controlnet_single_block_samples": 2}),
    "flux_repeat": (flux, {"controlnet_block_samples": 2, "controlnet_single_block_samples": 1,
                           "controlnet_blocks_repeat": True}),
    "sd3": (sd3, {"block_controlnet_hidden_states": 3}),
    "qwenimage": (qwenimage, {"controlnet_block_samples": 3}),
    "sana": (sana, {"controlnet_block_samples": 2}),  # after the second block onwards, one per block
}


def family(name):
    build, control = FAMILIES[name]
    torch.manual_seed(0)
    backbone, inputs = build()
    backbone = wake_zeros(backbone).eval()
    dim = backbone.config.num_attention_heads * backbone.config.attention_head_dim
    residuals = {k: v if isinstance(v, bool) else [torch.randn(B, ROWS * COLS, dim) for _ in range(v)]
                 for k, v in control.items()}
    return MultiPatchTransformer(backbone), inputs, residuals


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_the_spec_adds_the_residuals_where_the_backbone_does(name):
    """The spec's forward, fed the backbone's own patch layers, is the backbone's computation with the residuals."""
    model, inputs, residuals = family(name)
    reference = model.backbone(**inputs, **residuals, return_dict=False)[0]
    assert (reference - model.backbone(**inputs, return_dict=False)[0]).abs().max() > 1e-2  # they matter
    assert torch.equal(model(**inputs, **residuals, patch_size=None).sample, reference)
    given = model._signature.bind(**inputs, **residuals, return_dict=False)
    given.apply_defaults()
    head = PatchHead(*model.spec.base_weights(), scale=1)
    out = model._patched(head, model.base_patch_size, model.spec.latent(given.arguments), given.arguments)[0]
    assert (out - reference).abs().max() <= 1e-5


def test_pooling_averages_each_coarse_patchs_fine_tokens_in_row_major_order():
    tokens = torch.randn(B, ROWS * COLS, 3)
    pooled = pool_tokens(tokens, (ROWS, COLS), (2, 2))
    grid = tokens.reshape(B, ROWS, COLS, 3)
    expected = torch.stack([grid[:, 2 * r:2 * r + 2, 2 * c:2 * c + 2].mean((1, 2))
                            for r in range(ROWS // 2) for c in range(COLS // 2)], 1)
    assert torch.allclose(pooled, expected, atol=1e-6)
    video = torch.randn(B, 2 * 4 * 4, 3)  # (frames, rows, columns): frames keep theirs
    assert torch.allclose(pool_tokens(video, (2, 4, 4), (1, 4, 4)), video.reshape(B, 2, 16, 3).mean(2), atol=1e-6)


@pytest.mark.parametrize("name", ["flux", "sd3", "qwenimage", "sana"])
@torch.no_grad()
def test_the_pooled_residuals_follow_the_coarse_tokens_order(name):
    """The mean of the fine tokens' embeddings, pooled, is each coarse token's embedding (PatchHead's start): the
    pooled residuals land on the coarse tokens they were averaged for."""
    model, inputs, _ = family(name)
    x = model.spec.latent(inputs)
    base = model.spec.patch(model.base_patch_size)
    fine = PatchHead(*model.spec.base_weights(), scale=1).embed(patchify(x, base))
    grid = tuple(d // p for d, p in zip(x.shape[2:], base))
    for size in model.patch_sizes[1:]:
        coarse = model.heads[str(size)].embed(patchify(x, model.spec.patch(size)))
        factor = size // model.base_patch_size
        assert torch.allclose(pool_tokens(fine, grid, (factor, factor)), coarse, atol=1e-5)


def _shuffled_in_patches(residual: torch.Tensor, factor: int) -> torch.Tensor:
    """``residual`` with the fine tokens inside each coarse patch put in another order (their mean unchanged)."""
    x = residual.reshape(B, ROWS // factor, factor, COLS // factor, factor, -1).movedim(4, 2).flatten(2, 3)
    x = x[:, :, torch.randperm(factor * factor)].unflatten(2, (factor, factor)).movedim(2, 4)
    return x.reshape(residual.shape)


@pytest.mark.parametrize("name", FAMILIES)
@torch.no_grad()
def test_a_coarse_step_takes_the_residuals_averaged_over_each_coarse_patch(name):
    model, inputs, residuals = family(name)
    for size in model.patch_sizes[1:]:
        factor = size // model.base_patch_size
        out = model(**inputs, **residuals, patch_size=size).sample
        assert (out - model(**inputs, patch_size=size).sample).abs().max() > 1e-3  # control reaches coarse steps
        shuffled = {k: v if isinstance(v, bool) else [_shuffled_in_patches(r, factor) for r in v]
                    for k, v in residuals.items()}
        assert (model(**inputs, **shuffled, patch_size=size).sample - out).abs().max() <= 1e-5
        moved = {k: v if isinstance(v, bool) else [r.roll(1, dims=1) for r in v] for k, v in residuals.items()}
        assert (model(**inputs, **moved, patch_size=size).sample - out).abs().max() > 1e-4  # not a global mean


def test_residuals_not_on_the_latents_tokens_are_refused_naming_the_argument():
    model, inputs, _ = family("flux")
    with pytest.raises(ValueError, match=r"controlnet_block_samples holds a tensor of shape \(2, 31, 32\), not "
                                         r"\(batch, 32, dim\)"):
        model(**inputs, controlnet_block_samples=[torch.zeros(B, ROWS * COLS - 1, 32)], patch_size=4)
    with pytest.raises(ValueError, match="controlnet_block_samples is one tensor, not a list"):
        model(**inputs, controlnet_block_samples=torch.zeros(1, B, ROWS * COLS, 32), patch_size=4)
    ids = torch.zeros(4, 4, 3)  # a Kontext reference's 4 x 4 tokens after the latent's, first id 1
    ids[..., 0], ids[..., 1], ids[..., 2] = 1, torch.arange(4)[:, None], torch.arange(4)[None]
    edit = dict(inputs, hidden_states=torch.randn(B, ROWS * COLS + 16, 64),
                img_ids=torch.cat([inputs["img_ids"], ids.reshape(-1, 3)]))
    with pytest.raises(ValueError, match="beside reference images' tokens"):
        model(**edit, controlnet_block_samples=[torch.zeros(B, ROWS * COLS, 32)], patch_size=4)


# -- the stock pipelines

CONTROL = Image.fromarray((np.random.RandomState(0).rand(128, 128, 3) * 255).astype("uint8"))


class SplitPolicy(PatchPolicy):
    """Sample 0 at patch 4 for the first two steps; sample 1 always at the base size."""

    name = "split"

    def choose(self, step):
        sizes = torch.full((self.batch_size,), self.base_size)
        if step.index < 2:
            sizes[0] = 4
        return sizes, {}


@pytest.fixture(scope="module", params=CONTROLNET_KINDS)
def folder(request, tmp_path_factory):
    return request.param, save_tiny_pipeline(request.param, tmp_path_factory.mktemp(request.param))


def generate(pipe, kind, **changes):
    """Two prompts, one control image, CFG on; SD3's pipeline samples the control image's latent from the global
    random state, seeded here."""
    torch.manual_seed(0)
    return pipe(**call_of(kind, **changes)).images


def call_of(kind, **changes) -> dict:
    call = dict(prompt=["a red circle", "a blue square"], control_image=CONTROL, num_inference_steps=STEPS,
                output_type="latent", generator=[torch.Generator().manual_seed(s) for s in (0, 1)],
                **TINY_CALL[kind])
    if kind.startswith("qwenimage"):
        call["negative_prompt"] = ["", ""]  # true CFG: two calls a step
    return {**call, **changes}


def test_in_the_stock_pipeline_the_fine_sample_equals_stock_and_coarse_steps_see_the_control(folder):
    kind, path = folder
    pipe = DiffusionPipeline.from_pretrained(path).to(DEVICE)
    assert type(pipe).__name__ in ("FluxControlNetPipeline", "StableDiffusion3ControlNetPipeline",
                                   "QwenImageControlNetPipeline", "SanaControlNetPipeline")
    check_stock_pipeline(pipe, kind)


@pytest.mark.parametrize("variant", ["img2img", "inpaint", "two_controlnets"])
def test_flux_controlnet_img2img_inpainting_and_several_controlnets(variant, tmp_path):
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("flux-controlnet", tmp_path)).to(DEVICE)
    image = Image.fromarray((np.random.RandomState(1).rand(128, 128, 3) * 255).astype("uint8"))
    if variant == "two_controlnets":  # each ControlNet's residuals summed, as the pipeline does, then averaged
        other = wake_zeros(FluxControlNetModel.from_config(pipe.controlnet.config)).to(DEVICE).eval()
        pipe = FluxControlNetPipeline.from_pipe(pipe, controlnet=FluxMultiControlNetModel([pipe.controlnet, other]))
        check_stock_pipeline(pipe, "flux-controlnet", control_image=[CONTROL, image],
                             controlnet_conditioning_scale=[1.0, 0.5], off=dict(controlnet_conditioning_scale=[0, 0]))
    elif variant == "img2img":
        pipe = FluxControlNetImg2ImgPipeline.from_pipe(pipe)
        check_stock_pipeline(pipe, "flux-controlnet", image=image, strength=1.0)
    else:
        pipe = FluxControlNetInpaintPipeline.from_pipe(pipe)
        mask = Image.fromarray(np.pad(np.full((64, 64), 255, "uint8"), 32))
        check_stock_pipeline(pipe, "flux-controlnet", image=image, mask_image=mask, strength=1.0)


@pytest.mark.parametrize("family", ["sd3", "qwenimage"])
def test_sd3_and_qwenimage_controlnet_inpainting(family, tmp_path):
    """The inpainting ControlNets take the masked image's latent and the mask as their control: extra channels of
    the ControlNet's input, none of the transformer's."""
    kind = f"{family}-controlnet"
    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline(kind, tmp_path)).to(DEVICE)
    model, extra, inpainting = {
        "sd3": (SD3ControlNetModel, {"extra_conditioning_channels": 1}, StableDiffusion3ControlNetInpaintingPipeline),
        "qwenimage": (QwenImageControlNetModel, {"extra_condition_channels": 4}, QwenImageControlNetInpaintPipeline),
    }[family]
    torch.manual_seed(0)
    controlnet = wake_zeros(model.from_config({**pipe.controlnet.config, **extra})).to(DEVICE).eval()
    pipe = inpainting.from_pipe(pipe, controlnet=controlnet)
    mask = Image.fromarray(np.pad(np.full((64, 64), 255, "uint8"), 32))
    check_stock_pipeline(pipe, kind, control_mask=mask)


def check_stock_pipeline(pipe, kind, off=None, **call):
    """``baseline`` is stock bit for bit; in a mixed batch the fine sample equals its stock twin (the residuals cut
    by rows); all-coarse steps see the control (``off``: the call without it); ``disable`` restores stock."""
    stock = generate(pipe, kind, **call)
    adapter = MultiPatchTransformer(pipe.transformer)
    ddit.enable(pipe, adapter, policy="baseline")
    assert torch.equal(generate(pipe, kind, **call), stock)
    ddit.disable(pipe)

    ddit.enable(pipe, adapter, policy=SplitPolicy())
    mixed = generate(pipe, kind, **call)
    assert torch.allclose(mixed[1], stock[1], atol=ATOL, rtol=0) and (mixed[0] - stock[0]).abs().max() > 1e-3
    assert {r["patch_size"] for r in ddit.summary(pipe).records if r["sample"] == 0 and r["step"] < 2} == {4}
    ddit.disable(pipe)

    ddit.enable(pipe, adapter, policy=FixedPolicy([4] * STEPS))
    coarse = generate(pipe, kind, **call)
    assert {r["patch_size"] for r in ddit.summary(pipe).records} == {4}
    off = off or dict(controlnet_conditioning_scale=0.0)
    assert (generate(pipe, kind, **{**call, **off}) - coarse).abs().max() > 1e-3
    ddit.disable(pipe)
    assert torch.equal(generate(pipe, kind, **call), stock)


def test_progressive_resolution_runs_in_the_controlnet_pipelines(folder):
    """The training-free competitor in the same pipelines: its early steps at half size (the control image resized
    by the pipeline), and above every step's noise level the stock call exactly, since each of its calls draws the
    control image's latent from where the stock call drew it."""
    kind, path = folder
    pipe = DiffusionPipeline.from_pretrained(path).to(DEVICE)
    if kind == "sana-controlnet":  # as SanaPipeline
        with pytest.raises(ValueError, match="progressive resolution runs in .* not in SanaControlNetPipeline"):
            ddit.progressive_call(pipe, 0.6, **call_of(kind))
        return
    stock = generate(pipe, kind, num_inference_steps=6)
    tokens = []
    pipe.transformer.register_forward_pre_hook(lambda m, a, k: tokens.append(k["hidden_states"].shape[1:]),
                                               with_kwargs=True)
    call = call_of(kind, num_inference_steps=6)
    torch.manual_seed(0)  # as generate() seeds the global random state
    pipe(**call)
    after = [g.get_state() for g in call["generator"]], torch.random.get_rng_state()  # where a stock call leaves
    call = call_of(kind, num_inference_steps=6)
    torch.manual_seed(0)
    above = ddit.progressive_call(pipe, 1.0, **call).images
    assert torch.equal(above, stock)
    assert all(torch.equal(g.get_state(), state) for g, state in zip(call["generator"], after[0]))
    assert torch.equal(torch.random.get_rng_state(), after[1])  # the generators and the global state
    torch.manual_seed(0)
    tokens.clear()
    early = ddit.progressive_call(pipe, 0.6, **call_of(kind, num_inference_steps=6)).images
    assert early.shape == stock.shape and early.isfinite().all() and (early - stock).abs().max() > 1e-3
    assert tokens[0].numel() == tokens[-1].numel() // 4  # half the height and width first, the full size last
    with pytest.raises(ValueError, match="cannot take control_guidance_end= other than 1.0: the ControlNet"):
        ddit.progressive_call(pipe, 0.6, **call_of(kind, control_guidance_end=0.5))


def test_feature_caches_run_beside_the_control_at_coarse_steps(folder):
    kind, path = folder
    pipe = DiffusionPipeline.from_pretrained(path).to(DEVICE)
    adapter, policy = MultiPatchTransformer(pipe.transformer), [4, 4, 4, 2, 2, 2]
    if kind == "sana-controlnet":  # a single-stream stack runs whole in its first block: the residuals would not fit
        ddit.enable(pipe, adapter, policy=FixedPolicy(policy), cache=TaylorSeer(interval=2, warmup=1))
        with pytest.raises(ValueError, match="single-stream block stack .* without the cache"):
            generate(pipe, kind, num_inference_steps=6)
        return
    ddit.enable(pipe, adapter, policy=FixedPolicy(policy))
    plain = generate(pipe, kind, num_inference_steps=6)
    for cache in (TeaCache(delta=0, coefficients=[1.0, 0.0]), TeaCache(delta=1e9, coefficients=[1.0, 0.0]),
                  TaylorSeer(interval=2, warmup=1)):
        ddit.disable(pipe)
        ddit.enable(pipe, adapter, policy=FixedPolicy(policy), cache=cache)
        out = generate(pipe, kind, num_inference_steps=6)
        reused = [r["cached"] for r in ddit.summary(pipe).records]
        if cache.__dict__.get("delta") == 0:  # never reuses: every step as computed without the cache
            assert not any(reused) and torch.allclose(out, plain, atol=ATOL, rtol=0)
        else:
            assert any(reused) and out.isfinite().all() and (out - plain).abs().max() > 1e-4


# -- the commands

def test_an_ablation_compares_a_controlnet_pipelines_rows_with_their_twins(tmp_path):
    """SD3's ControlNet pipeline samples its control image's latent from torch's global random state: each batch
    seeds it alike, so a row that computes what the baseline computes gives the baseline's images."""
    folder = save_tiny_pipeline("sd3-controlnet", tmp_path / "sd3-controlnet")
    MultiPatchTransformer(DiffusionPipeline.from_pretrained(folder).transformer).save_pretrained(tmp_path / "adapter")
    CONTROL.save(tmp_path / "edges.png")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red circle", "control_image": "edges.png"}\n'
                                            '{"prompt": "blue stripes", "control_image": "edges.png"}\n')
    out = tmp_path / "run"
    assert ablate(["--pipeline", str(folder), "--adapter", str(tmp_path / "adapter"), "--prompts",
                   str(tmp_path / "prompts.jsonl"), "--out", str(out), "--steps", "4", "--fewer-steps", "",
                   "--policies", "fixed", "--sweep", "fixed.fraction=[0,0.5]", "--caches", "none", "--height", "128",
                   "--width", "128", "--pipeline-arg", "max_sequence_length=16", "--progressive", "1.0,0.6",
                   "--no-progress"]) == 0
    summary = {r["row"]: r for r in json.loads((out / "summary.json").read_text())}
    assert summary["fixed[fraction=0]"]["ssim_vs_baseline"] == 1.0
    assert summary["fixed[fraction=0]"]["psnr_vs_baseline"] is None  # identical
    coarse = summary["fixed[fraction=0.5]"]
    assert coarse["coarse_step_fraction"] == 0.5 and coarse["ssim_vs_baseline"] < 1
    assert set(coarse["per_prompt"]) == {f"{t} [control_image=edges.png]" for t in ("a red circle", "blue stripes")}
    assert summary["progressive[switch=1.0]"]["psnr_vs_baseline"] is None  # above every step: the stock call
    assert summary["progressive[switch=0.6]"]["ssim_vs_baseline"] < 1


def test_distilling_from_a_controlnet_pipeline_is_refused_before_any_work(tmp_path, capsys):
    folder = save_tiny_pipeline("flux-controlnet", tmp_path / "flux-controlnet")
    CONTROL.save(tmp_path / "edges.png")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "a red circle", "control_image": "edges.png"}\n')
    assert ddit_main(["distill", "--pipeline", str(folder), "--prompts", str(tmp_path / "prompts.jsonl"), "--out",
                      str(tmp_path / "out"), "--steps", "2", "--height", "128", "--width", "128"]) == 2
    error = capsys.readouterr().err
    assert "FluxControlNetPipeline runs a ControlNet" in error
    assert "AutoPipelineForText2Image.from_pipe(pipe, controlnet=None)" in error
    assert not (tmp_path / "out").exists()


def test_the_real_shapes_benchmark_counts_the_controlnet_beside_every_step(tmp_path):
    run = subprocess.run([sys.executable, "benchmarks/real_shapes.py", "--device", "cpu", "--models", "flux-controlnet",
                          "--repeats", "1", "--warmup", "0", "--steps", "0", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    record = json.loads((tmp_path / "real_shapes.json").read_text())["models"]["flux-controlnet"]
    flops, control = record["flops"], record["flops"]["controlnet"]
    assert record["controlnet"]["model"] == "FluxControlNetModel" and control > 0
    beside = record["flops_with_controlnet"]
    assert beside["share"] == pytest.approx(control / flops["stock"])
    for size in ("4", "8"):  # the ControlNet's cost is added to every step, whatever its size
        assert beside["speedup"][size] == pytest.approx((flops["stock"] + control) / (flops[size] + control))
        assert beside["speedup"][size] < record["flops_speedup"][size]
    assert "Its ControlNet (FluxControlNetModel" in (tmp_path / "real_shapes.md").read_text()
