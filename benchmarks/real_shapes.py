"""What a coarse step saves on the real shapes of FLUX.1-dev (and FLUX.1 Kontext editing, and beside a ControlNet),
FLUX.2-dev, Qwen-Image, Z-Image-Turbo, SD3.5-medium, Sana-1.6B, Wan2.1-T2V-1.3B, Wan2.2-T2V-A14B (one expert),
HunyuanVideo-1.5, LTX-Video 2B and LTX-2 (issue 10, part 4).

    python benchmarks/real_shapes.py --device cpu     # reduced models, fp32, a few minutes on 2 cores
    python benchmarks/real_shapes.py --device cuda    # full depth, bf16 (benchmarks/gpu/run.sh runs this)
    python benchmarks/real_shapes.py --device meta    # FLOPs alone, full depth and shapes, no weights in memory

Random-weight transformers built from each model's published config (no download: the time
of a forward does not depend on the weights), at the usual resolution and text length, each
wrapped in ``ddit.MultiPatchTransformer`` with the patch sizes p, 2p, 4p that its latent
allows. Timed, interleaved round by round (median of the rounds): the stock backbone at p,
and the adapter at each size, the way the runtime calls it (base size with the LoRA layers
out, ``set_lean_base``; coarse sizes through the extra embed, de-embed, residual and LoRA).
From those medians, the wall speed-up of schedules with 30/50/70% of the steps coarse;
``--steps`` > 0 also times one whole schedule (50% at 2p) against the stock loop.

FLOPs (torch's FlopCounterMode, attention included) are counted per call too: the FLOP
speed-up is what the shapes allow, the wall speed-up what the device makes of it. On the
meta device nothing runs, so the full-size counts cost no memory and a minute of CPU.

``--scale reduced`` (the CPU default) keeps each config's kinds of block and head size but
makes it 4x narrower (heads / 4, feed-forward / 4) with 4x fewer image tokens (half the
resolution per side; Wan: a quarter of the latent frames) and 4x fewer text tokens, so the
tokens per width, hence attention's share of a block, and the text tokens' share stay as at
full size; ``--depth`` (default 1 when reduced) sets the blocks of each kind.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (
    Flux2Transformer2DModel,
    FluxControlNetModel,
    FluxTransformer2DModel,
    HunyuanImageTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    LTX2VideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from torch.overrides import TorchFunctionMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ddit import MultiPatchTransformer
from ddit.backbones import Reference, as_batch, patchify
from ddit.caches import SkipAll, replace_stack
from ddit.flops import EXTRA_FORMULAS

SHRINK = 4  # the reduced scale's factor on width, image tokens and text tokens
FRACTIONS = (0.3, 0.5, 0.7)
FORMAT = 1  # of real_shapes.json: a run merges its records only into a file of the same format, device and scale
PAPER_FLUX_SPEEDUP = 2.18  # DDiT alone on FLUX.1-dev, 50 steps: 12.0 s -> 5.5 s per image (paper, Table 1)


@dataclass(frozen=True)
class Model:
    title: str
    cls: type
    config: dict
    source: str
    resolution: str
    latent: tuple[int, ...]  # (C, *dims) where the transformer patchifies, at full scale
    text: int  # text tokens the stock pipeline passes by default
    text_note: str
    batch: int  # rows of one transformer call in the stock pipeline with guidance on
    batch_note: str
    text_width: int = 4096  # features per text token the transformer takes
    patch: int = 2  # the backbone's own patch, in latent pixels
    latent_arg: str = "hidden_states"  # the forward's names for the latent and the timestep
    timestep_arg: str = "timestep"
    no_meta: str = ""  # why the model's forward cannot run on the meta device, if it cannot
    reference: tuple[int, int] | None = None  # an edit's reference image beside the latent: its latent's (H, W)
    #: a ControlNet that the pipeline runs beside the transformer at every step, on the fine latent: its class,
    #: config and the config's source
    controlnet: tuple[type, dict, str] | None = None

    def reference_dims(self, scale: str) -> tuple[int, int] | None:
        """The reference's latent (H, W) at ``scale``: half per side when reduced, as the latent's."""
        if self.reference is None or scale == "full":
            return self.reference
        return tuple(d // 2 for d in self.reference)

    def spatial(self, scale: str) -> tuple[int, ...]:
        """The latent's dims at ``scale``: the last two are the ones a patch size must divide."""
        dims = self.latent[1:]
        if scale == "full":
            return dims
        if len(dims) == 3:  # video: fewer frames, the frame keeps its size
            return (max(1, dims[0] // SHRINK), *dims[1:])
        return tuple(d // 2 for d in dims)

    def text_tokens(self, scale: str) -> int:
        return self.text if scale == "full" else self.text // SHRINK


FLUX = Model(
    "FLUX.1-dev", FluxTransformer2DModel,
    dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
         num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
         axes_dims_rope=(16, 56, 56)),
    "black-forest-labs/FLUX.1-dev transformer/config.json; the same values as BFL's flux-dev params "
    "(depth 19, depth_single_blocks 38, hidden 3072 = 24 x 128, context_in_dim 4096, vec_in_dim 768, "
    "axes_dim [16, 56, 56], guidance_embed True)",
    "1024x1024", (16, 128, 128), 512, "T5, FluxPipeline's max_sequence_length",
    1, "guidance-distilled: one row per step")
FLUX2 = Model(
    "FLUX.2-dev", Flux2Transformer2DModel,
    dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=48, attention_head_dim=128,
         num_attention_heads=48, joint_attention_dim=15360, timestep_guidance_channels=256, mlp_ratio=3.0,
         axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=True),
    "diffusers' Flux2Transformer2DModel defaults, which describe FLUX.2-dev (8 dual-stream + 48 single-stream "
    "blocks, hidden 6144 = 48 x 128, a 32-channel VAE packed 2x2 into 128, three stacked Mistral layers of 5120 "
    "= 15360 text features); not checked against the checkpoint's config.json here",
    "1024x1024", (32, 128, 128), 512, "Mistral, Flux2Pipeline's max_sequence_length",
    1, "guidance-distilled: one row per step", text_width=15360)
FLUX_CONTROLNET = dataclasses.replace(
    FLUX, title="FLUX.1-dev with a ControlNet",
    controlnet=(FluxControlNetModel,
                dict(patch_size=1, in_channels=64, num_layers=6, num_single_layers=0, attention_head_dim=128,
                     num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768,
                     guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
                "Shakker-Labs/FLUX.1-dev-ControlNet-Union-Pro-2.0 (6 dual-stream blocks, no single-stream ones), "
                "as copies of its config.json on the Hub list it; not checked against the repository itself"))
KONTEXT = dataclasses.replace(
    FLUX, title="FLUX.1-Kontext-dev",
    source="FLUX.1-dev's config: FLUX.1 Kontext [dev] is the same transformer, given the reference image's packed "
           "tokens after the latent's (ids with first coordinate 1); not checked against its config.json here",
    resolution="1024x1024, editing a 1024x1024 image", reference=(128, 128))
QWEN = Model(
    "Qwen-Image", QwenImageTransformer2DModel,
    dict(patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
         num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56)),
    "diffusers' QwenImageTransformer2DModel defaults, which describe Qwen-Image (60 dual-stream blocks, hidden "
    "3072 = 24 x 128, Qwen2.5-VL-7B's 3584 text features, a 16-channel VAE packed 2x2 into 64); not checked "
    "against the checkpoint's config.json here",
    "1024x1024", (16, 128, 128), 128, "the prompt's own length (QwenImagePipeline does not pad): a long prompt",
    1, "true CFG: one call per branch, two per step", text_width=3584)
ZIMAGE = Model(
    "Z-Image-Turbo", ZImageTransformer2DModel,
    dict(all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=3840, n_layers=30, n_refiner_layers=2,
         n_heads=30, n_kv_heads=30, cap_feat_dim=2560, axes_dims=(32, 48, 48), axes_lens=(1024, 512, 512)),
    "diffusers' ZImageTransformer2DModel defaults, which describe Z-Image (6B: 30 single-stream layers of 3840 = "
    "30 x 128 and 2 refiner layers each for image and text, Qwen3-4B's 2560 text features, FLUX.1's 16-channel "
    "VAE); not checked against Z-Image-Turbo's config.json here",
    "1024x1024", (16, 128, 128), 128, "the prompt's own length with its chat template, unpadded "
    "(ZImagePipeline): a long prompt", 1, "Turbo: guidance_scale 0, no CFG", text_width=2560, latent_arg="x", timestep_arg="t")
SD35 = Model(
    "SD3.5-medium", SD3Transformer2DModel,
    dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
         num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536,
         pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=384,
         dual_attention_layers=tuple(range(13)), qk_norm="rms_norm"),
    "stabilityai/stable-diffusion-3.5-medium transformer/config.json (24 layers, 24 x 64, "
    "dual attention in layers 0-12, qk_norm rms_norm, pos_embed_max_size 384)",
    "1024x1024", (16, 128, 128), 333, "CLIP 77 + T5 256, StableDiffusion3Pipeline's max_sequence_length",
    2, "CFG: both branches in one call")
SANA = Model(
    "Sana-1.6B", SanaTransformer2DModel,
    dict(in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32, num_layers=20,
         num_cross_attention_heads=20, cross_attention_head_dim=112, cross_attention_dim=2240, caption_channels=2304,
         mlp_ratio=2.5, sample_size=32, patch_size=1),
    "diffusers' SanaTransformer2DModel defaults, which describe Sana 1600M at 1024px (20 blocks, hidden 2240 = "
    "70 x 32 with linear self-attention, Gemma-2-2B's 2304 text features, a 32-channel DC-AE at 32x); not checked "
    "against the checkpoint's config.json here",
    "1024x1024", (32, 32, 32), 300, "Gemma, SanaPipeline's max_sequence_length",
    2, "CFG: both branches in one call", text_width=2304, patch=1)
WAN = Model(
    "Wan2.1-T2V-1.3B", WanTransformer3DModel,
    dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
         text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
         qk_norm="rms_norm_across_heads", eps=1e-6),
    "Wan-AI/Wan2.1-T2V-1.3B-Diffusers transformer/config.json; Wan's own t2v_1_3B config "
    "(dim 1536 = 12 x 128, ffn_dim 8960, 30 layers, qk_norm, cross_attn_norm)",
    "480x832, 81 frames", (16, 21, 60, 104), 512, "UMT5, WanPipeline's max_sequence_length",
    1, "CFG: one call per branch, two per step")
WAN14B = Model(
    "Wan2.2-T2V-A14B, one expert", WanTransformer3DModel,
    dict(patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
         text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
         qk_norm="rms_norm_across_heads", eps=1e-6),
    "Wan's own t2v_A14B config (dim 5120 = 40 x 128, ffn_dim 13824, 40 layers, qk_norm, cross_attn_norm; each of "
    "the two experts, and Wan2.1-T2V-14B, has this shape); not checked against the Diffusers checkpoint's "
    "config.json here",
    "704x1280, 81 frames (720x1280's 90 latent rows admit no coarser patch)", (16, 21, 88, 160), 512,
    "UMT5, WanPipeline's max_sequence_length", 1, "CFG: one call per branch, two per step")
HUNYUAN15 = Model(
    "HunyuanVideo-1.5", HunyuanVideo15Transformer3DModel,
    dict(in_channels=65, out_channels=32, num_attention_heads=16, attention_head_dim=128, num_layers=54,
         num_refiner_layers=2, patch_size=1, patch_size_t=1, text_embed_dim=3584, text_embed_2_dim=1472,
         image_embed_dim=1152, rope_axes_dim=(16, 56, 56)),
    "diffusers' HunyuanVideo15Transformer3DModel defaults, which describe HunyuanVideo-1.5 (8.3B: 54 dual-stream "
    "blocks of 2048 = 16 x 128, patch 1 on a 32-channel 16x VAE, latent + condition + mask = 65 channels in, "
    "Qwen2.5-VL's 3584 and ByT5's 1472 text features, SigLIP's 1152); not checked against its config.json here",
    "480x832, 121 frames", (65, 31, 30, 52), 1000, "Qwen2.5-VL padded to the pipeline's 1000, beside 256 ByT5 "
    "tokens and 729 image-prompt slots (masked out in text-to-video, still in every block)",
    1, "CFG through its guider: one call per branch, two per step", text_width=3584, patch=1,
    no_meta="its forward selects text tokens by their mask's values, which meta tensors do not hold")
HUNYUANIMAGE = Model(
    "HunyuanImage-2.1", HunyuanImageTransformer2DModel,
    dict(in_channels=64, out_channels=64, num_attention_heads=28, attention_head_dim=128, num_layers=20,
         num_single_layers=40, num_refiner_layers=2, patch_size=(1, 1), text_embed_dim=3584, text_embed_2_dim=1472,
         rope_axes_dim=(64, 64)),
    "diffusers' HunyuanImageTransformer2DModel defaults, which describe HunyuanImage-2.1 (17B: 20 dual-stream and "
    "40 single-stream blocks of 3584 = 28 x 128, patch 1 on a 64-channel 32x VAE, Qwen2.5-VL's 3584 text "
    "features), with ByT5's 1472; not checked against its config.json here",
    "2048x2048", (64, 64, 64), 1000, "Qwen2.5-VL padded to the pipeline's 1000, beside 128 ByT5 tokens", 1,
    "CFG through its guider: one call per branch, two per step", text_width=3584, patch=1,
    no_meta="its forward selects text tokens by their mask's values, which meta tensors do not hold")
LTX = Model(
    "LTX-Video 2B", LTXVideoTransformer3DModel,
    dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
         attention_head_dim=64, cross_attention_dim=2048, num_layers=28, caption_channels=4096),
    "diffusers' LTXVideoTransformer3DModel defaults, which describe LTX-Video 0.9's 2B model (28 blocks of 2048 = "
    "32 x 64, patch 1 on a 128-channel VAE at 32x in space and 8x in time, T5's 4096 text features); not checked "
    "against a checkpoint's config.json here",
    "768x512, 121 frames", (128, 16, 16, 24), 128, "T5, LTXPipeline's max_sequence_length",
    2, "CFG: both branches in one call", patch=1)
LTX2 = Model(
    "LTX-2 19B", LTX2VideoTransformer3DModel,
    dict(in_channels=128, out_channels=128, patch_size=1, patch_size_t=1, num_attention_heads=32,
         attention_head_dim=128, cross_attention_dim=4096, audio_in_channels=128, audio_out_channels=128,
         audio_num_attention_heads=32, audio_attention_head_dim=64, audio_cross_attention_dim=2048, num_layers=48,
         caption_channels=3840),
    "diffusers' LTX2VideoTransformer3DModel defaults, which describe LTX-2's 19B model (48 blocks, each a video "
    "stream of 4096 = 32 x 128 and an audio stream of 2048 = 32 x 64 with cross-attention both ways, patch 1 on a "
    "128-channel VAE at 32x in space and 8x in time, Gemma 3's 3840 text features); not checked against a "
    "checkpoint's config.json here",
    "768x512, 121 frames at 24 fps", (128, 16, 16, 24), 1024, "Gemma 3 through the text connectors, LTX2Pipeline's "
    "max_sequence_length; the audio's 126 tokens (5 s at 25 latent frames a second) run beside the video's at "
    "every size", 2, "CFG: both branches in one call (spatio-temporal and modality guidance add a call of one row "
    "each)", text_width=3840, patch=1)
FLUX1 = (FLUX, FLUX_CONTROLNET, KONTEXT)  # FLUX.1's transformer, its inputs and ids
MODELS = {"flux": FLUX, "flux-controlnet": FLUX_CONTROLNET, "flux-kontext": KONTEXT, "flux2": FLUX2, "qwenimage": QWEN,
          "zimage": ZIMAGE, "sd3": SD35, "sana": SANA, "hunyuanimage": HUNYUANIMAGE, "wan": WAN, "wan14b": WAN14B,
          "hunyuanvideo15": HUNYUAN15, "ltx": LTX, "ltx2": LTX2}
#: Run when --models is not given: all but Wan2.2-A14B's expert, whose 73,920 tokens make one reduced CPU run last
#: longer than the others together, LTX-2 and FLUX.1 with a ControlNet (``--models wan14b,ltx2,flux-controlnet``).
DEFAULT_MODELS = [name for name in MODELS if name not in ("wan14b", "ltx2", "flux-controlnet")]
AUDIO_TOKENS = 126  # LTX-2's audio latent frames for 121 video frames at 24 fps


def model_config(model: Model, scale: str, depth: int | None) -> dict:
    """The config at ``scale``, with ``depth`` blocks of each kind (None: the model's own)."""
    config = dict(model.config)
    if scale == "reduced" and model is ZIMAGE:  # the head size stays that of the RoPE axes
        config["n_heads"] = config["n_kv_heads"] = config["n_heads"] // SHRINK
        config["dim"] = config["n_heads"] * sum(config["axes_dims"])
    elif scale == "reduced":
        config["num_attention_heads"] //= SHRINK
        if "caption_projection_dim" in config:
            config["caption_projection_dim"] //= SHRINK  # SD3's width
        if "ffn_dim" in config:
            config["ffn_dim"] //= SHRINK
        if model is SANA:  # cross-attention works at the narrowed width
            config["num_cross_attention_heads"] //= SHRINK
            config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
        if model in (LTX, LTX2):  # its cross-attention reads the caption projected to the block width
            config["cross_attention_dim"] = config["num_attention_heads"] * config["attention_head_dim"]
        if model is LTX2:  # and so does the audio's, at its own width
            config["audio_num_attention_heads"] //= SHRINK
            config["audio_cross_attention_dim"] = (config["audio_num_attention_heads"]
                                                   * config["audio_attention_head_dim"])
    if depth is not None:
        if model is ZIMAGE:
            config.update(n_layers=depth, n_refiner_layers=depth)
        elif model in (*FLUX1, FLUX2, HUNYUANIMAGE):
            config.update(num_layers=depth, num_single_layers=depth)
        elif model is SD35:  # as many plain layers as dual-attention ones
            config.update(num_layers=2 * depth, dual_attention_layers=tuple(range(depth)))
        else:
            config["num_layers"] = depth
    return config


def depth_label(model: Model, config: dict) -> str:
    if model in (*FLUX1, FLUX2):
        return f"{config['num_layers']} dual-stream + {config['num_single_layers']} single-stream blocks"
    if model is SD35:
        return f"{config['num_layers']} blocks, {len(config['dual_attention_layers'])} of them with dual attention"
    if model is ZIMAGE:
        refiners = config["n_refiner_layers"]
        return f"{config['n_layers']} main layers + {refiners} image and {refiners} text refiner layers"
    return f"{config['num_layers']} block" + "s" * (config["num_layers"] != 1)


def build(model: Model, config: dict, sizes: tuple[int, ...], device: torch.device,
          dtype: torch.dtype) -> MultiPatchTransformer:
    """The wrapped backbone, made on ``device`` in ``dtype`` (no slow CPU init nor fp32 copy of a 12B model on a
    GPU, no memory on meta), except the modules and parameters diffusers keeps in fp32 when it loads the model
    (Wan's norms, time embedder and scale-shift tables)."""
    torch.manual_seed(0)
    with torch.device(device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            backbone = model.cls(**config).eval()
        finally:
            torch.set_default_dtype(previous)
        keep = set(getattr(backbone, "_keep_in_fp32_modules", None) or ())
        for name, module in backbone.named_modules():
            if keep & set(name.split(".")):
                module.float()
        for name, param in backbone.named_parameters():  # e.g. scale_shift_table, a parameter, not a module
            if keep & set(name.split(".")):
                param.data = param.data.float()
        adapter = MultiPatchTransformer(backbone, patch_sizes=sizes[1:]).eval()
    adapter.set_lean_base(True)  # as ddit.enable and the sampler run it
    return adapter


def make_inputs(model: Model, dims: tuple[int, ...], text: int, device: torch.device, dtype: torch.dtype,
                reference: tuple[int, int] | None = None) -> dict:
    """One transformer call's arguments as the stock pipeline passes them (random values)."""
    generator = torch.Generator().manual_seed(0)
    batch = model.batch

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    def full(value):
        return torch.full((batch,), value, device=device, dtype=dtype)

    latent = randn(batch, model.latent[0], *dims)
    args = dict(hidden_states=latent, encoder_hidden_states=randn(batch, text, model.text_width),
                timestep=full(500.0))
    if model is SD35:
        args["pooled_projections"] = randn(batch, 2048)
    if model in FLUX1:  # packed 2x2 latents, RoPE ids, timestep in [0, 1], distilled guidance
        tokens, ids = patchify(latent, (2, 2)), _flux_ids(dims[0] // 2, dims[1] // 2)
        if reference:  # Kontext: the reference's packed tokens after the latent's, its ids' first coordinate 1
            tokens = torch.cat([tokens, patchify(randn(batch, model.latent[0], *reference), (2, 2))], 1)
            ids = torch.cat([ids, _flux_ids(reference[0] // 2, reference[1] // 2, first=1)])
        ids_device = "cpu" if device.type == "meta" else device  # the adapter reads the ids' values
        args.update(hidden_states=tokens, pooled_projections=randn(batch, 768),
                    timestep=full(0.5), guidance=full(3.5), img_ids=ids.to(ids_device, dtype),
                    txt_ids=torch.zeros(text, 3).to(ids_device, dtype))
    if model is FLUX2:  # the same, with (t, h, w, l) ids and no pooled text
        h, w = dims[0] // 2, dims[1] // 2
        ids = torch.zeros(h, w, 4)
        ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
        text_ids = torch.zeros(text, 4)
        text_ids[:, 3] = torch.arange(text)
        ids_device = "cpu" if device.type == "meta" else device
        args.update(hidden_states=patchify(latent, (2, 2)), timestep=full(0.5), guidance=full(4.0),
                    img_ids=ids.reshape(-1, 4).to(ids_device), txt_ids=text_ids.to(ids_device))
    if model is QWEN:  # packed 2x2 latents, the grid as img_shapes, timestep in [0, 1]; one prompt: no mask
        args.update(hidden_states=patchify(latent, (2, 2)), timestep=full(0.5),
                    img_shapes=[[(1, dims[0] // 2, dims[1] // 2)]] * batch)
    if model is HUNYUAN15:  # its second text (ByT5) and image-prompt tokens, in proportion to the text's
        byt5, image = 256 * text // model.text, 729 * text // model.text
        args.update(encoder_attention_mask=torch.ones(batch, text, device=device),
                    encoder_hidden_states_2=randn(batch, byt5, 1472),
                    encoder_attention_mask_2=torch.ones(batch, byt5, device=device),
                    image_embeds=torch.zeros(batch, image, 1152, device=device, dtype=dtype))
    if model is HUNYUANIMAGE:  # its ByT5 tokens, in proportion to the text's, and both masks
        byt5 = 128 * text // model.text
        args.update(encoder_attention_mask=torch.ones(batch, text, device=device),
                    encoder_hidden_states_2=randn(batch, byt5, 1472),
                    encoder_attention_mask_2=torch.ones(batch, byt5, device=device))
    if model is LTX:  # tokens of patch 1, the grid by name, RoPE scaled for 25 frames a second; a prompt mask
        args.update(hidden_states=patchify(latent, (1, 1, 1)), encoder_attention_mask=torch.ones(batch, text,
                    device=device), num_frames=dims[0], height=dims[1], width=dims[2],
                    rope_interpolation_scale=(8 / 25, 32, 32))
    if model is LTX2:  # the audio's tokens beside the video's (as many fewer as its frames), its own text and masks
        audio = AUDIO_TOKENS * dims[0] // model.latent[1]
        args.update(hidden_states=patchify(latent, (1, 1, 1)), audio_hidden_states=randn(batch, audio, 128),
                    audio_encoder_hidden_states=randn(batch, text, model.text_width), sigma=full(500.0),
                    encoder_attention_mask=torch.ones(batch, text, device=device),
                    audio_encoder_attention_mask=torch.ones(batch, text, device=device), num_frames=dims[0],
                    height=dims[1], width=dims[2], fps=24.0, audio_num_frames=audio)
    if model is ZIMAGE:  # lists of per-sample (C, 1, H, W) latents and prompts, timestep in [0, 1]
        args = dict(x=list(latent.unsqueeze(2)), t=full(0.5), cap_feats=[randn(text, model.text_width)] * batch)
    return args


def build_controlnet(model: Model, scale: str, depth: int | None, device: torch.device,
                     dtype: torch.dtype) -> torch.nn.Module:
    """The model's ControlNet at ``scale`` (as narrow as the transformer) with at most ``depth`` blocks of each kind."""
    cls, config, _ = model.controlnet
    config = dict(config)
    if scale == "reduced":
        config["num_attention_heads"] //= SHRINK
    if depth is not None:
        config.update(num_layers=min(depth, config["num_layers"]),
                      num_single_layers=min(depth, config["num_single_layers"]))
    torch.manual_seed(0)
    with torch.device(device):
        return cls(**config).to(dtype).eval()


def controlnet_inputs(inputs: dict) -> dict:
    """A ControlNet's call beside the transformer's: its inputs, and the control image's packed latent."""
    return {**{k: v for k, v in inputs.items() if k != "joint_attention_kwargs"},
            "controlnet_cond": torch.randn_like(inputs["hidden_states"], device="cpu").to(inputs["hidden_states"])}


def _flux_ids(h: int, w: int, first: int = 0) -> torch.Tensor:
    """FLUX.1's (first, row, column) ids of an h x w grid of packed tokens, as FluxPipeline makes them."""
    ids = torch.zeros(h, w, 3)
    ids[..., 0], ids[..., 1], ids[..., 2] = first, torch.arange(h)[:, None], torch.arange(w)[None]
    return ids.reshape(-1, 3)


def image_tokens(dims: tuple[int, ...], size: int) -> int:
    return math.prod(dims[:-2]) * (dims[-2] // size) * (dims[-1] // size)


@contextlib.contextmanager
def bare(adapter: MultiPatchTransformer):
    """The stock model: the LoRA layers out of the backbone for the duration."""
    adapter.detach()
    try:
        yield adapter.backbone
    finally:
        adapter.attach()


@contextlib.contextmanager
def ready(adapter: MultiPatchTransformer, size: int):
    """The adapter's LoRA layers placed and selected for ``size`` before the clock starts: a generation swaps
    them when its size changes (a few ms on FLUX), not at every call, as these interleaved rounds would."""
    base = size == adapter.base_patch_size
    adapter._place_lora(not (base and adapter.lean_base))
    adapter._use_lora(None if base else size)
    yield


@contextlib.contextmanager
def skipping(adapter: MultiPatchTransformer, size: int):
    """The adapter at ``size`` with its block stack skipped, as a feature cache (TeaCache, TaylorSeer) skips it
    at a cached step: what such a step still costs (embedding, conditioning, output head)."""
    with ready(adapter, size), replace_stack(adapter, SkipAll()):
        yield


def variants(adapter: MultiPatchTransformer, inputs: dict) -> dict:
    """name -> (context, call): the stock backbone at p, then the adapter at each of its sizes, and at each
    size a step a cache skips (``"2 skipped"``)."""
    calls = {"stock": (lambda: bare(adapter), lambda: adapter.backbone(**inputs, return_dict=False))}
    for size in adapter.patch_sizes:
        calls[size] = (lambda size=size: ready(adapter, size),
                       lambda size=size: adapter(**inputs, patch_size=size, return_dict=False))
    for size in adapter.patch_sizes:
        calls[f"{size} skipped"] = (lambda size=size: skipping(adapter, size),
                                    lambda size=size: adapter(**inputs, patch_size=size, return_dict=False))
    return calls


class AttentionFlops(TorchFunctionMode):
    """Counts the FLOPs of ``scaled_dot_product_attention`` calls before dispatch: on the meta device it becomes
    plain matmuls that the counter cannot tell from the others."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention:
            q, k, v = args[:3] if len(args) >= 3 else (kwargs["query"], kwargs["key"], kwargs["value"])
            self.flops += sdpa_flop_count(q.shape, k.shape, v.shape)
        return func(*args, **kwargs)


def count_flops(context, call) -> tuple[int, int]:
    """(all FLOPs, attention FLOPs) of one call."""
    with context(), FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter, \
            AttentionFlops() as attention:
        call()
    return counter.get_total_flops(), attention.flops


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, call) -> float:
    sync(device)
    start = time.perf_counter()
    call()
    sync(device)
    return time.perf_counter() - start


def interleaved(calls: dict, device: torch.device, repeats: int, warmup: int) -> dict:
    """Seconds of each call over ``repeats`` rounds after ``warmup`` ones; the order flips every round, so a
    change in the machine's load lands on every variant alike."""
    seconds = {name: [] for name in calls}
    order = list(calls)
    for round_ in range(warmup + repeats):
        for name in order:
            context, call = calls[name]
            with context():
                elapsed = timed(device, call)
            if round_ >= warmup:
                seconds[name].append(elapsed)
        order.reverse()
    return seconds


def schedule(steps: int, fraction: float, coarse: int, base: int) -> list[int]:
    """Patch size per step: the first ``fraction`` of the steps coarse (the noisy ones, where DDiT coarsens)."""
    n = round(fraction * steps)
    return [coarse] * n + [base] * (steps - n)


def denoise(call, inputs: dict, sizes: list[int], model: Model) -> None:
    """A flow-matching Euler loop over ``sizes`` (one transformer call per step): what the stock loop costs
    besides the transformer is a few elementwise ops, here too."""
    given = inputs[model.latent_arg]
    x = as_batch(given)
    t_scale = 1.0 if model in (*FLUX1, FLUX2, QWEN, ZIMAGE) else 1000.0
    kept = None  # an edit's prediction for its latent's tokens only: the reference's stay, as in the pipeline
    if model.reference:
        kept = int((inputs["img_ids"][:, 0] == 0).sum())
    for i, size in enumerate(sizes):
        t = torch.full((len(x),), (1 - i / len(sizes)) * t_scale, device=x.device, dtype=x.dtype)
        latent = list(x) if isinstance(given, list) else x
        v = as_batch(call({**inputs, model.latent_arg: latent, model.timestep_arg: t}, size)[0])[:, :kept]
        x = torch.cat([x[:, :v.shape[1]] - v / len(sizes), x[:, v.shape[1]:]], 1)  # condition channels stay


def speedup(costs: dict, fraction: float, coarse: int, base: int) -> float:
    """Stock cost over DDiT's when ``fraction`` of the steps run at ``coarse``, the rest at ``base``."""
    return costs["stock"] / ((1 - fraction) * costs[base] + fraction * costs[coarse])


def fraction_for(costs: dict, target: float, coarse: int, base: int) -> float | None:
    """The fraction of steps at ``coarse`` that gives ``target``; None when even all of them do not."""
    gain = costs[base] - costs[coarse]
    need = costs[base] - costs["stock"] / target
    return max(0.0, need / gain) if gain > 0 and need <= gain else None


def measure(name: str, args, out: Path) -> dict:
    model, device = MODELS[name], torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()  # this model's peak, not an earlier one's
    dtype = torch.float32 if device.type == "cpu" else torch.bfloat16
    depth = args.depth if args.depth is not None else (1 if args.scale == "reduced" else None)
    config = model_config(model, args.scale, depth)
    dims, text = model.spatial(args.scale), model.text_tokens(args.scale)
    base = model.patch
    sizes = tuple(s for s in (base, 2 * base, 4 * base) if dims[-2] % s == 0 and dims[-1] % s == 0)
    start = time.perf_counter()
    adapter = build(model, config, sizes, device, dtype)
    record = dict(model=model.title, command=args.command, source=model.source, resolution=model.resolution,
                  scale=args.scale, latent=[model.latent[0], *dims], text_tokens=text, text_note=model.text_note,
                  batch=model.batch, batch_note=model.batch_note, depth=depth_label(model, config), config=config,
                  dtype=str(dtype).removeprefix("torch."), sizes=list(sizes),
                  tokens={str(s): image_tokens(dims, s) for s in sizes}, build_s=time.perf_counter() - start)
    reference = model.reference_dims(args.scale)
    if reference:  # its packed tokens at each size (the coarsest up to it that divides the reference)
        grid = (reference[0] // 2, reference[1] // 2)
        beside = Reference(0, math.prod(grid), grid, 1)
        record.update(reference=list(reference),
                      reference_tokens={str(s): adapter.reference_tokens(beside, s) for s in sizes})
    inputs = make_inputs(model, dims, text, device, dtype, reference)
    calls = variants(adapter, inputs)
    if model.controlnet:
        controlnet, cls = build_controlnet(model, args.scale, depth, device, dtype), model.controlnet[0].__name__
        record["controlnet"] = dict(model=cls, source=model.controlnet[2], config=dict(controlnet.config))
        calls["controlnet"] = (contextlib.nullcontext, lambda: controlnet(
            **controlnet_inputs(inputs), conditioning_scale=1.0, return_dict=False))
    with torch.inference_mode():
        flops = {key: count_flops(*call) for key, call in calls.items()}
        record["flops"] = {str(k): v[0] for k, v in flops.items()}
        record["attention_flops"] = {str(k): v[1] for k, v in flops.items()}
        if device.type != "meta":
            seconds = interleaved(calls, device, args.repeats, args.warmup)
            record["seconds"] = {str(k): v for k, v in seconds.items()}
            record["median_s"] = {str(k): statistics.median(v) for k, v in seconds.items()}
            if device.type == "cuda":
                record["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30
    summarise(record)
    save(out, name, record, args)
    if args.steps and device.type != "meta" and len(sizes) > 1:
        with torch.inference_mode():
            record["end_to_end"] = end_to_end(adapter, inputs, model, record, args)
        save(out, name, record, args)
    return record


def summarise(record: dict) -> None:
    """Speed-ups per size and per schedule, from the medians (wall) and the counts (FLOPs)."""
    base, coarse = record["sizes"][0], record["sizes"][1:]
    for kind, key in (("wall", "median_s"), ("flops", "flops")):
        if key not in record:
            continue
        costs = {(int(k) if k.isdigit() else k): v for k, v in record[key].items() if "skipped" not in k}
        record[f"{kind}_speedup"] = {str(s): costs["stock"] / costs[s] for s in record["sizes"]}
        record[f"{kind}_skipped_share"] = {str(s): record[key][f"{s} skipped"] / costs[s] for s in record["sizes"]}
        record[f"{kind}_schedules"] = {str(s): {str(f): speedup(costs, f, s, base) for f in FRACTIONS}
                                       for s in coarse}
        record[f"{kind}_fraction_for_paper"] = {str(s): fraction_for(costs, PAPER_FLUX_SPEEDUP, s, base)
                                                for s in coarse}
        if "controlnet" in costs:  # every step runs the ControlNet too, at its fine size
            step = {k: v + costs["controlnet"] for k, v in costs.items() if k != "controlnet"}
            record[f"{kind}_with_controlnet"] = {
                "share": costs["controlnet"] / costs["stock"],
                "speedup": {str(s): step["stock"] / step[s] for s in record["sizes"]},
                "schedules": {str(s): {str(f): speedup(step, f, s, base) for f in FRACTIONS} for s in coarse},
                "fraction_for_paper": {str(s): fraction_for(step, PAPER_FLUX_SPEEDUP, s, base) for s in coarse}}


def end_to_end(adapter: MultiPatchTransformer, inputs: dict, model: Model, record: dict, args) -> dict:
    """The stock loop, then one DDiT schedule (50% of the steps at 2p), each timed whole once (every shape is
    warm by now); skipped when the per-step medians say they would not end before ``--deadline``."""
    base, coarse = record["sizes"][0], record["sizes"][1]
    sizes = schedule(args.steps, 0.5, coarse, base)
    median = {(int(k) if k.isdigit() else k): v for k, v in record["median_s"].items() if "skipped" not in k}
    predicted = {"stock": args.steps * median["stock"], "ddit": sum(median[s] for s in sizes)}
    result = dict(steps=args.steps, schedule=f"first 50% of the steps at {coarse}, the rest at {base}",
                  predicted_s=predicted, predicted_speedup=predicted["stock"] / predicted["ddit"])
    needed = 1.3 * sum(predicted.values())
    if args.deadline and time.time() + needed > args.deadline:
        return {**result, "skipped": f"needs about {needed:.0f} s, past the deadline"}
    device = torch.device(args.device)
    with bare(adapter) as backbone:
        stock = timed(device, lambda: denoise(lambda kw, size: backbone(**kw, return_dict=False), inputs, sizes,
                                              model))
    ddit = timed(device, lambda: denoise(lambda kw, size: adapter(**kw, patch_size=size, return_dict=False),
                                         inputs, sizes, model))
    return {**result, "measured_s": {"stock": stock, "ddit": ddit}, "measured_speedup": stock / ddit}


def environment(device: torch.device) -> dict:
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return dict(device=device.type, card=card, torch=torch.__version__, diffusers=diffusers.__version__,
                threads=torch.get_num_threads(), date=datetime.datetime.now().isoformat(timespec="seconds"))


def save(out: Path, name: str, record: dict, args) -> None:
    """Merge ``record`` into ``out/real_shapes.json`` (other models' records stay) and rewrite the table, so a
    run stopped later keeps what it has."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "real_shapes.json"
    data = json.loads(path.read_text()) if path.exists() else {}
    env = environment(torch.device(args.device))
    kind = [FORMAT, env["device"], env["card"], args.scale]
    if data.get("kind") != kind:  # another run's records: start afresh
        data = {}
    data["kind"], data["environment"] = kind, env
    data.setdefault("models", {})[name] = record
    data["models"] = {k: data["models"][k] for k in MODELS if k in data["models"]}
    path.write_text(json.dumps(data, indent=1))
    (out / "real_shapes.md").write_text(markdown(data))


def markdown(data: dict) -> str:
    env = data["environment"]
    where = env["card"] or ("the meta device (FLOPs alone)" if env["device"] == "meta" else
                            f"{env['device']}, {env['threads']} thread" + "s" * (env["threads"] != 1))
    lines = [f"# Coarse steps on real shapes: {where}", "",
             f"torch {env['torch']}, diffusers {env['diffusers']}, {env['date']}.",
             "Random weights from each model's config; one transformer call per row. Wall: median of interleaved "
             "rounds; FLOPs: torch's FlopCounterMode (attention included). Speed-ups are over the stock backbone "
             "at its own patch size.", ""]
    for record in data["models"].values():
        lines += model_section(record)
    return "\n".join(lines) + "\n"


def model_section(r: dict) -> list[str]:
    wall = "median_s" in r
    reduced = f" (reduced scale: heads, feed-forward, image and text tokens / {SHRINK})" \
        if r["scale"] == "reduced" else ""
    lines = [f"## {r['model']}: {r['resolution']}, latent {'x'.join(map(str, r['latent']))}{reduced}", "",
             f"`{r['command']}`", "",
             f"{r['depth']}, {r['dtype']}; {r['text_tokens']} text tokens ({r['text_note']}); batch {r['batch']} "
             f"({r['batch_note']})." + (f" Peak GPU memory {r['peak_memory_gib']:.1f} GiB."
                                        if "peak_memory_gib" in r else ""),
             f"Config: {r['source']}.", ""]
    head = "| call | patch | image tokens | text tokens |" + (" ms | wall speed-up |" if wall else "")
    lines += [head + " TFLOPs | FLOP speed-up | attention share of FLOPs |",
              "|" + "---|" * (head.count("|") - 1 + 3)]
    for key in ["stock", *map(str, r["sizes"])]:
        size = r["sizes"][0] if key == "stock" else int(key)
        tokens = r["tokens"][str(size)]
        if "reference_tokens" in r:  # an edit's reference runs beside the latent
            tokens = f"{tokens} + {r['reference_tokens'][str(size)]} reference"
        row = f"| {'stock backbone' if key == 'stock' else 'adapter'} | {size} | {tokens} | {r['text_tokens']} |"
        if wall:
            row += f" {1e3 * r['median_s'][key]:.1f} | {r['median_s']['stock'] / r['median_s'][key]:.2f}x |"
        flops = r["flops"][key]
        row += f" {flops / 1e12:.3g} | {r['flops']['stock'] / flops:.2f}x | {r['attention_flops'][key] / flops:.0%} |"
        lines.append(row)
    kinds = ["wall", "flops"] if wall else ["flops"]
    lines += ["", "A step a feature cache skips (TeaCache, TaylorSeer: the blocks stood in for; embedding, "
              "conditioning and output head still run), as a share of a full step at its size"
              + (" (wall; FLOPs in brackets): " if wall else " (FLOPs): ")
              + ", ".join(f"{s}: " + " ".join(_percent(r[f"{k}_skipped_share"][str(s)], k) for k in kinds)
                          for s in r["sizes"]) + "."]
    coarse = r["sizes"][1:]
    if not coarse:
        return lines + [""]
    lines += ["", "Whole schedules, the first fraction of the steps at the coarse size"
              + (" (wall from the medians above; FLOPs in brackets):" if wall else " (FLOPs):"), "",
              "| coarse size | " + " | ".join(f"{f:.0%} coarse" for f in FRACTIONS)
              + f" | coarse steps for {PAPER_FLUX_SPEEDUP}x |", "|---|" + "---|" * (len(FRACTIONS) + 1)]
    for s in map(str, coarse):
        cells = [" ".join(_x(r[f"{k}_schedules"][s][str(f)], k) for k in kinds) for f in FRACTIONS]
        need = " ".join(_share(r[f"{k}_fraction_for_paper"][s], k) for k in kinds)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {need} |")
    if "controlnet" in r:
        lines += controlnet_section(r, kinds)
    e2e = r.get("end_to_end")
    if e2e:
        lines += ["", f"End to end, {e2e['steps']} steps, {e2e['schedule']}: predicted from the medians "
                      f"{e2e['predicted_s']['stock']:.2f} s -> {e2e['predicted_s']['ddit']:.2f} s "
                      f"({e2e['predicted_speedup']:.2f}x); "
                  + (f"measured {e2e['measured_s']['stock']:.2f} s -> {e2e['measured_s']['ddit']:.2f} s "
                     f"({e2e['measured_speedup']:.2f}x)."
                     if "measured_s" in e2e else f"not measured: {e2e['skipped']}.")]
    return lines + [""]


def controlnet_section(r: dict, kinds: list[str]) -> list[str]:
    """What the ControlNet, run on the fine latent at every step, leaves of the speed-ups."""
    first = r[f"{kinds[0]}_with_controlnet"]
    lines = ["", f"Its ControlNet ({r['controlnet']['model']}, {r['controlnet']['source']}) runs on the fine latent "
                 "beside every step, whatever the step's size: it costs "
                 + " ".join(_percent(r[f"{k}_with_controlnet"]["share"], k) for k in kinds)
                 + " of a stock step. With it, a step at each size against a stock step with it: "
                 + ", ".join(f"{s}: " + " ".join(_x(r[f"{k}_with_controlnet"]["speedup"][str(s)], k) for k in kinds)
                             for s in r["sizes"]) + "; whole schedules (the end-to-end line below, if any, "
                 "times the transformer alone):", "",
             "| coarse size | " + " | ".join(f"{f:.0%} coarse" for f in FRACTIONS)
             + f" | coarse steps for {PAPER_FLUX_SPEEDUP}x |", "|---|" + "---|" * (len(FRACTIONS) + 1)]
    for s in first["schedules"]:
        cells = [" ".join(_x(r[f"{k}_with_controlnet"]["schedules"][s][str(f)], k) for k in kinds) for f in FRACTIONS]
        need = " ".join(_share(r[f"{k}_with_controlnet"]["fraction_for_paper"][s], k) for k in kinds)
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {need} |")
    return lines


def _x(value: float, kind: str) -> str:
    return f"{value:.2f}x" if kind == "wall" else f"({value:.2f}x)"


def _percent(value: float, kind: str) -> str:
    return f"{value:.2%}" if kind == "wall" else f"({value:.2%})"


def _share(value: float | None, kind: str) -> str:
    text = "unreachable" if value is None else f"{value:.0%}"
    return text if kind == "wall" else f"({text})"


def parse(argv: list[str] | None = None):
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if cuda else "cpu", choices=["cpu", "cuda", "meta"])
    parser.add_argument("--models", default=",".join(DEFAULT_MODELS),
                        help=f"comma-separated, of {', '.join(MODELS)} (default: all but wan14b and ltx2)")
    parser.add_argument("--scale", choices=["full", "reduced"], help="default: reduced on cpu, else full")
    parser.add_argument("--depth", type=int, help="blocks of each kind (default: the model's; 1 when reduced)")
    parser.add_argument("--repeats", type=int, help="timed rounds (default 7 on cuda, 3 on cpu)")
    parser.add_argument("--warmup", type=int, help="untimed rounds after the FLOP count, which runs every call "
                                                   "once already (default 1 on cuda, 0 on cpu)")
    parser.add_argument("--threads", type=int, help="CPU threads (default 1 on cpu: on a shared machine a second "
                                                    "thread waits for a descheduled one and times scatter)")
    parser.add_argument("--steps", type=int, help="steps of the timed end-to-end schedules, 0 for none "
                                                  "(default 50 on cuda, 4 on cpu)")
    parser.add_argument("--deadline", type=float, help="unix time: an end-to-end run that would end later is skipped")
    parser.add_argument("--out", type=Path, help="default: runs/real_shapes/DEVICE")
    args = parser.parse_args(argv)
    gpu = args.device == "cuda"
    args.scale = args.scale or ("reduced" if args.device == "cpu" else "full")
    args.repeats = args.repeats or (7 if gpu else 3)
    args.warmup = args.warmup if args.warmup is not None else (1 if gpu else 0)
    if args.threads or args.device == "cpu":
        torch.set_num_threads(args.threads or 1)
    args.steps = args.steps if args.steps is not None else (50 if gpu else 4)
    args.out = args.out or Path("runs/real_shapes") / args.device
    bad = set(args.models.split(",")) - set(MODELS)
    if bad:
        parser.error(f"unknown models {sorted(bad)}; known: {', '.join(MODELS)}")
    words = sys.argv[1:] if argv is None else list(argv)
    if "--deadline" in words:  # a run's own clock, not part of what it measures
        at = words.index("--deadline")
        del words[at:at + 2]
    args.command = " ".join(["python benchmarks/real_shapes.py", *words])
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    records = {}
    for name in args.models.split(","):
        if args.device == "meta" and MODELS[name].no_meta:
            print(f"{name}: skipped on the meta device: {MODELS[name].no_meta}", flush=True)
            continue
        print(f"{name}: building and timing ({args.scale} scale, {args.device})", flush=True)
        records[name] = measure(name, args, args.out)
    print("\n".join(line for record in records.values() for line in model_section(record)))
    return records


if __name__ == "__main__":
    main()
