"""The tiny pipeline folders: stock ``from_pretrained`` loads them, they run from a text prompt, ddit enables them."""

import sys

import diffusers
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

import ddit
from ddit.tiny_pipelines import CONTROLNET_KINDS, KINDS, TINY_CALL, save_tiny_pipeline

PROMPTS = ["a red circle", "a blue square"]
STEPS = 4
PIPELINE_CLASS = {"flux": "FluxPipeline", "flux2": "Flux2KleinPipeline", "chroma": "ChromaPipeline",
                  "qwenimage": "QwenImagePipeline", "zimage": "ZImagePipeline", "sd3": "StableDiffusion3Pipeline",
                  "pixart": "PixArtSigmaPipeline", "sana": "SanaPipeline", "wan": "WanPipeline",
                  "wan-i2v": "WanImageToVideoPipeline", "wan22": "WanPipeline", "wan22-i2v": "WanImageToVideoPipeline",
                  "hunyuanvideo15": "HunyuanVideo15Pipeline", "ltx": "LTXPipeline", "ltx2": "LTX2Pipeline",
                  "hunyuanimage": "HunyuanImagePipeline", "skyreels": "SkyReelsV2Pipeline",
                  "skyreels-i2v": "SkyReelsV2ImageToVideoPipeline",
                  "skyreels-df": "SkyReelsV2DiffusionForcingPipeline"}
VIDEO = ("wan", "wan-i2v", "wan22", "wan22-i2v", "hunyuanvideo15", "ltx", "ltx2", "skyreels", "skyreels-i2v",
         "skyreels-df")
#: The first frame of an image-to-video pipeline: the same for every prompt, so that only the prompt differs.
FIRST_FRAME = {kind: dict(image=torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(5)))
               for kind in ("wan-i2v", "wan22-i2v", "skyreels-i2v")}
# Flux and Qwen-Image guide with true CFG only when given a negative prompt; the others guide above a scale of 1
TRUE_CFG = dict(true_cfg_scale=2.0, negative_prompt="blurry")
CFG_ON = {"flux": TRUE_CFG, "qwenimage": TRUE_CFG, "hunyuanvideo15": {}, "hunyuanimage": {}}
CFG_OFF = {"flux": {}, "qwenimage": {}, "hunyuanvideo15": {}, "hunyuanimage": {}}
#: Pipelines whose guidance is a component (a diffusers guider): its scale, on and off.
GUIDER_SCALE = {"hunyuanvideo15": 6.0, "hunyuanimage": 3.5}
#: About 10x under what a prompt, or guidance, moves each tiny random pipeline's image (the smaller of the two,
#: measured: 0.003 for Qwen-Image, whose text passes an RMSNorm, 0.0002 for HunyuanImage 2.1's prompt, 0.008
#: for HunyuanVideo 1.5, 0.015 for FLUX.2 [klein], 0.045 to 0.41 for the others, Sana 0.088 and Z-Image 0.41
#: among them); the same inputs give the same image exactly.
MOVED = {"qwenimage": 2e-4, "hunyuanvideo15": 8e-4, "flux2": 1e-3, "hunyuanimage": 2e-5}


@pytest.fixture(scope="module", params=KINDS)
def saved(request, tmp_path_factory):
    kind = request.param
    return kind, save_tiny_pipeline(kind, tmp_path_factory.mktemp(kind))


def load(folder):
    pipe = DiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, kind, prompt, guidance, **kwargs):
    if kind in GUIDER_SCALE:  # its guidance is a component's
        pipe.guider.guidance_scale = GUIDER_SCALE[kind] if guidance else 1.0
    # HunyuanVideo 1.5's VAE decodes one video a call (in diffusers 0.42 a batch's causal mask lands on the heads);
    # SkyReels-V2's stock diffusion forcing adds its fps embedding to a batch of one only (it does not broadcast)
    if kind == "skyreels-df" or kind == "hunyuanvideo15" and kwargs.get("output_type") != "latent":
        if isinstance(prompt, list):
            return np.concatenate([run(pipe, kind, p, guidance, **kwargs) for p in prompt])
    cfg = (CFG_ON if guidance else CFG_OFF).get(kind, dict(guidance_scale=4.0 if guidance else 1.0))
    generator = [torch.Generator().manual_seed(0) for _ in ([prompt] if isinstance(prompt, str) else prompt)]
    out = pipe(prompt=prompt, num_inference_steps=STEPS, generator=generator, **cfg, **TINY_CALL[kind],
               **FIRST_FRAME.get(kind, {}), **kwargs)
    return out.frames if kind in VIDEO else out.images


def test_a_saved_folder_loads_with_stock_diffusers_and_runs_from_text(saved):
    kind, folder = saved
    pipe = load(folder)
    assert type(pipe).__name__ == PIPELINE_CLASS[kind]
    assert type(getattr(diffusers, PIPELINE_CLASS[kind]).from_pretrained(folder)) is type(pipe)
    call = TINY_CALL[kind]
    frames = (call["num_frames"],) if kind in VIDEO else ()

    guided = run(pipe, kind, PROMPTS, guidance=True, output_type="np")  # both prompts from the same noise
    assert guided.shape == (2, *frames, call["height"], call["width"], 3) and np.isfinite(guided).all()
    moved = MOVED.get(kind, 4e-3)
    assert np.abs(guided[0] - guided[1]).max() > moved  # the prompt reaches the image
    unguided = run(pipe, kind, PROMPTS[0], guidance=False, output_type="np")[0]
    assert np.abs(unguided - guided[0]).max() > moved  # guidance does something

    images = run(pipe, kind, PROMPTS[0], guidance=False, output_type="pil")[0]
    images = images if kind in VIDEO else [images]  # a video is a list of frames
    assert all(image.size == (call["width"], call["height"]) for image in images)


def test_the_folder_is_the_same_bytes_every_time(saved, tmp_path):
    same_bytes_every_time(*saved, tmp_path)


@pytest.mark.parametrize("kind", CONTROLNET_KINDS)
def test_a_controlnet_folder_is_the_same_bytes_every_time(kind, tmp_path):
    same_bytes_every_time(kind, save_tiny_pipeline(kind, tmp_path / "first"), tmp_path / "again")


def same_bytes_every_time(kind, folder, tmp_path):
    state = torch.random.get_rng_state()
    again = save_tiny_pipeline(kind, tmp_path)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's random state is left alone
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert all((folder / f).read_bytes() == (again / f).read_bytes() for f in files)
    # Z-Image's timestep MLP is 1024 wide and HunyuanVideo 1.5's ByT5 projection 2048 whatever the model's width
    limit = {"zimage": 2, "hunyuanvideo15": 20, "hunyuanimage": 20}.get(kind, 1) * 2**20
    assert sum((folder / f).stat().st_size for f in files) < limit


def test_ddit_wraps_the_loaded_transformer_and_runs_the_pipeline_from_text(saved):
    kind, folder = saved
    pipe = load(folder)
    adapter = {name: ddit.MultiPatchTransformer(getattr(pipe, name), patch_sizes=(4, 8))  # Wan 2.2: both experts
               for name in ("transformer", "transformer_2") if getattr(pipe, name, None) is not None}
    ddit.enable(pipe, adapter, policy="third_order")
    assert np.isfinite(run(pipe, kind, PROMPTS[0], guidance=True, output_type="np")).all()
    assert len({r["step"] for r in ddit.summary(pipe).records}) == STEPS

    ddit.disable(pipe)  # four steps are too few for the third difference to go coarse: force it
    ddit.enable(pipe, adapter, policy="fixed", fraction=0.5)
    assert np.isfinite(run(pipe, kind, PROMPTS[0], guidance=True, output_type="np")).all()
    assert ddit.summary(pipe).coarse_fraction == 0.5


IMAGE = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(1))
MASK = torch.zeros(1, 1, 128, 128).index_fill_(2, torch.arange(32, 96), 1.0)


@pytest.mark.parametrize(("kind", "cls", "extra"), [
    ("flux", "FluxImg2ImgPipeline", dict(image=IMAGE, strength=0.6)),
    ("sd3", "StableDiffusion3Img2ImgPipeline", dict(image=IMAGE, strength=0.6)),
    ("flux", "FluxInpaintPipeline", dict(image=IMAGE, mask_image=MASK, strength=0.6)),
    ("sd3", "StableDiffusion3InpaintPipeline", dict(image=IMAGE, mask_image=MASK, strength=0.6)),
    ("qwenimage", "QwenImageImg2ImgPipeline", dict(image=IMAGE, strength=0.6)),
    ("qwenimage", "QwenImageInpaintPipeline", dict(image=IMAGE, mask_image=MASK, strength=0.6)),
    ("zimage", "ZImageImg2ImgPipeline", dict(image=IMAGE, strength=0.6)),
    ("zimage", "ZImageInpaintPipeline", dict(image=IMAGE, mask_image=MASK, strength=0.6)),
    ("flux", "FluxKontextPipeline", dict(image=IMAGE, max_area=128 * 128, _auto_resize=False)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_image_conditioned_pipelines_count_steps_from_where_they_start(kind, cls, extra, tmp_path):
    """img2img and inpainting start at the scheduler's begin index (strength 0.6 of 10 steps: step 4), so a
    fixed schedule is read at the steps that run; Kontext's reference tokens run beside the latent's
    (tests/test_edit_pipelines.py)."""
    pipe = getattr(diffusers, cls).from_pipe(load(save_tiny_pipeline(kind, tmp_path)))
    pipe.set_progress_bar_config(disable=True)
    size = {} if cls == "FluxKontextPipeline" else TINY_CALL[kind]

    def call():
        return pipe(prompt="a red circle", num_inference_steps=10, generator=torch.Generator().manual_seed(0),
                    output_type="pt", **size, **extra).images

    stock = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", schedule=[4] * 7 + [2] * 3)
    out = call()
    sizes = {r["step"]: r["patch_size"] for r in ddit.summary(pipe).records}
    first = 0 if cls == "FluxKontextPipeline" else 4
    assert sizes == {step: 4 if step < 7 else 2 for step in range(first, 10)}
    assert torch.isfinite(out).all() and (out - stock).abs().max() > 1e-3
    ddit.disable(pipe)
    assert torch.equal(call(), stock)


class FirstSampleCoarse(ddit.policies.PatchPolicy):
    """Sample 0 at patch 4 for the first two steps, the others at the base size."""

    name = "first_sample_coarse"

    def choose(self, step):
        sizes = torch.full((self.batch_size,), self.base_size)
        sizes[0] = 4 if step.index < 2 else self.base_size
        return sizes, {}


def test_wan_first_and_last_frame_video_runs_a_batch_split_by_size(tmp_path):
    """Wan 2.1 FLF2V: a transformer with pos_embed_seq_len reads two images' CLIP tokens per sample, rows 2i and
    2i + 1: a group of samples takes both of each of its samples' (the fine sample equals its stock twin)."""
    pipe = load(save_tiny_pipeline("wan-i2v", tmp_path))
    stock = pipe.transformer
    pipe.transformer = type(stock).from_config({**stock.config, "pos_embed_seq_len": 2 * 5})  # 5 CLIP tokens
    pipe.transformer.load_state_dict(stock.state_dict(), strict=False)
    torch.nn.init.normal_(pipe.transformer.condition_embedder.image_embedder.pos_embed, std=0.5)

    def call():
        return pipe(prompt=PROMPTS, image=IMAGE, last_image=IMAGE.flip(-1), num_inference_steps=STEPS,
                    generator=[torch.Generator().manual_seed(i) for i in range(2)], output_type="latent",
                    **TINY_CALL["wan-i2v"]).frames

    before = call()
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy=FirstSampleCoarse())
    after = call()
    assert torch.allclose(after[1], before[1], atol=1e-5) and (after[0] - before[0]).abs().max() > 1e-3
    assert {(r["sample"], r["patch_size"]) for r in ddit.summary(pipe).records if r["step"] == 0} == {(0, 4), (1, 2)}


def test_wan22_ti2v_per_token_timesteps_run_coarse_steps_in_the_stock_pipeline(tmp_path):
    """Wan 2.2 TI2V's pipeline (expand_timesteps) hands the transformer one timestep per token."""
    pipe = diffusers.WanPipeline.from_pretrained(save_tiny_pipeline("wan", tmp_path), expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    seen = []
    pipe.transformer.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["timestep"].shape),
                                               with_kwargs=True)

    def call():
        return run(pipe, "wan", PROMPTS[0], guidance=True, output_type="latent")

    stock = call()
    assert seen[0] == (1, 2 * 16 * 16 // 4)  # (batch, tokens): 2 latent frames of 16x16 at patch 2
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.allclose(call(), stock, atol=1e-5)
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", fraction=0.5)
    coarse = call()
    assert torch.isfinite(coarse).all() and (coarse - stock).abs().max() > 1e-3
    assert ddit.summary(pipe).coarse_fraction == 0.5


def test_hunyuanvideo15_image_to_video_runs_its_image_prompt_at_every_size(tmp_path):
    """HunyuanVideo15ImageToVideoPipeline on the tiny folder's components with a tiny SigLIP encoder, its size
    picked from the image at a 64-pixel target: the baseline policy is stock, and the image reaches coarse steps."""
    import transformers

    base = load(save_tiny_pipeline("hunyuanvideo15", tmp_path))
    encoder = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
    pipe = diffusers.HunyuanVideo15ImageToVideoPipeline(
        **base.components, image_encoder=encoder,
        feature_extractor=transformers.SiglipImageProcessor(size={"height": 28, "width": 28}))
    pipe.target_size = 64  # the tiny VAE's 16x: a 4x4 latent
    pipe.set_progress_bar_config(disable=True)

    def call(colour):
        return pipe(image=Image.new("RGB", (64, 64), colour), prompt="a red circle", num_frames=5,
                    num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").frames

    stock = call((200, 30, 30))
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="baseline")
    assert torch.allclose(call((200, 30, 30)), stock, atol=1e-5, rtol=0)
    ddit.disable(pipe)
    ddit.enable(pipe, ddit.MultiPatchTransformer(pipe.transformer), policy="fixed", schedule=[4, 4, 4])
    out = call((200, 30, 30))
    assert {(r["patch_size"], r["tokens"]) for r in ddit.summary(pipe).records} == {(4, 2)}  # 2 frames of 1 token
    assert (out - stock).abs().max() > 1e-3 and (call((30, 30, 200)) - out).abs().max() > 1e-3


def test_unknown_kinds_and_a_missing_transformers_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="one of flux, flux2, .* wan, wan-i2v, wan22, wan22-i2v, hun"):
        save_tiny_pipeline("dit", tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(ImportError, match="pip install transformers"):
        save_tiny_pipeline("flux", tmp_path)
