"""Tiny, random-weight, *stock* diffusers pipelines, built offline, for tests of ``ddit.enable``.

Not a test module: tests import it. ``build(name)`` returns an unmodified diffusers
pipeline (FluxPipeline, Flux2Pipeline, ChromaPipeline, QwenImagePipeline, ZImagePipeline,
StableDiffusion3Pipeline, PixArtSigmaPipeline, SanaPipeline, WanPipeline, HunyuanVideo15Pipeline,
HunyuanImagePipeline, LTXPipeline, LTX2Pipeline or DiTPipeline) whose transformer is a
few-kilobyte random model, and a ``call_kwargs`` function giving the keyword arguments
for ``pipe(**kwargs)``. Nothing is downloaded:
text encoders and tokenizers are ``None`` and prompts are passed as random,
seed-deterministic embeddings; the text-to-image pipelines run with
``output_type="latent"`` and ``vae=None`` (HunyuanVideo 1.5 and HunyuanImage read their latent channels or
scale from their VAE's config: they get a tiny one, never run). DiTPipeline always decodes, so it gets a tiny
AutoencoderKL (no downsampling) and ``output_type="pt"``: its output is the decoded
16x16 image, kept inside (0, 1) so the final clamp never bites.

Every latent is 16x16 where the transformer patchifies it (Flux: before its 2x2
packing; Z-Image's is 32x32), so patch sizes 2, 4 and 8 divide it. ``call_kwargs`` gives one generator and
one set of embeddings per sample, seeded by that sample's seed, so a sample does not
depend on the rest of its batch. Its ``guidance`` defaults turn classifier-free
guidance on: SD3, PixArt, Sana, Z-Image and DiT run cond and uncond as one doubled batch, Flux and
Qwen-Image (true CFG), Wan, HunyuanVideo 1.5 and HunyuanImage (their guider component) make two transformer calls
per step. ``guidance=1`` turns it off (HunyuanVideo 1.5, HunyuanImage: ``call_kwargs`` sets the guider's scale).
Z-Image takes its prompts as lists of per-sample embeddings, each of its own length.

Usage::

    pipe, call_kwargs = build("sd3")
    out = pipe(**call_kwargs(batch=2))
    x = latents(out)
"""

from __future__ import annotations

import os
from copy import deepcopy
from functools import cache, partial
from typing import Callable

import torch
from diffusers import (
    AdaptiveProjectedMixGuidance,
    AutoencoderKL,
    AutoencoderKLHunyuanImage,
    AutoencoderKLHunyuanVideo15,
    ChromaPipeline,
    ChromaTransformer2DModel,
    ClassifierFreeGuidance,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2Pipeline,
    Flux2Transformer2DModel,
    FluxPipeline,
    FluxTransformer2DModel,
    HunyuanImagePipeline,
    HunyuanImageTransformer2DModel,
    HunyuanVideo15Pipeline,
    HunyuanVideo15Transformer3DModel,
    LTX2Pipeline,
    LTX2VideoTransformer3DModel,
    LTXPipeline,
    LTXVideoTransformer3DModel,
    PixArtSigmaPipeline,
    PixArtTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

from ddit.tiny_pipelines import tiny_pipeline
from ddit.tiny_pipelines import wake_zeros as _wake_zeros

NAMES = ("flux", "flux2", "chroma", "qwenimage", "zimage", "sd3", "pixart", "sana", "wan", "hunyuanvideo15",
         "hunyuanimage", "dit")
LATENT = 16  # latent height and width at the transformer's patchify
TEXT_LEN = 8  # tokens of the fake prompt embeddings
VAE_SCALE = 8  # the pipelines' vae_scale_factor when vae is None
NEG_SEED = 10_000  # the shared negative ("") prompt's embeddings


def _randn(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def per_sample(seeds, offset: int, *shape: int) -> torch.Tensor:
    """One row per seed, each drawn from its own generator: batch-independent."""
    return torch.stack([_randn(1000 * offset + s, *shape) for s in seeds])


def _shared(batch: int, offset: int, *shape: int) -> torch.Tensor:
    return _randn(NEG_SEED + offset, *shape).expand(batch, *shape).clone()


def generators(seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


def _seeds(batch, seeds):
    seeds = list(range(batch)) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != batch:
        raise ValueError(f"{len(seeds)} seeds for a batch of {batch}")
    return seeds


def _finish(pipe: DiffusionPipeline) -> DiffusionPipeline:
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):  # built on the CPU in fp32 (.to(dtype) would only warn)
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flux():
    torch.manual_seed(0)
    transformer = _wake_zeros(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8)))
    # FLUX.1-dev's scheduler config (dynamic shifting, mu from the image sequence length)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 4.0 if guidance is None else guidance
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 32), pooled_prompt_embeds=per_sample(seeds, 2, 32),
                  guidance_scale=3.5, true_cfg_scale=guidance, height=LATENT * VAE_SCALE, width=LATENT * VAE_SCALE,
                  num_inference_steps=steps, generator=generators(seeds), output_type="latent")
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 32),
                      negative_pooled_prompt_embeds=_shared(batch, 2, 32))
        return kw

    return pipe, call_kwargs


def _flux2():
    torch.manual_seed(0)
    transformer = _wake_zeros(Flux2Transformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4)))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True)  # the pipeline passes mu
    pipe = Flux2Pipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):  # guidance-distilled: no CFG branches
        seeds = _seeds(batch, seeds)
        return dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 32), guidance_scale=4.0 if guidance is None
                    else guidance, height=LATENT * VAE_SCALE, width=LATENT * VAE_SCALE, num_inference_steps=steps,
                    generator=generators(seeds), output_type="latent")

    return pipe, call_kwargs


def _chroma():
    torch.manual_seed(0)
    transformer = _wake_zeros(ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = ChromaPipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)
    mask = torch.ones(TEXT_LEN).index_fill_(0, torch.tensor([TEXT_LEN - 1]), 0)  # T5 padding

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 4.0 if guidance is None else guidance
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 32), prompt_attention_mask=mask.expand(batch, -1),
                  guidance_scale=guidance, height=LATENT * VAE_SCALE, width=LATENT * VAE_SCALE,
                  num_inference_steps=steps, generator=generators(seeds), output_type="latent")
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 32),
                      negative_prompt_attention_mask=torch.ones(batch, TEXT_LEN))
        return kw

    return pipe, call_kwargs


def _qwenimage():
    torch.manual_seed(0)
    transformer = _wake_zeros(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))
    # Qwen-Image's scheduler config (dynamic shifting, exponential time shift)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5,
                                                max_shift=0.9, base_image_seq_len=256, max_image_seq_len=8192,
                                                time_shift_type="exponential", shift_terminal=0.02)
    pipe = QwenImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None,
                             transformer=transformer)
    mask = torch.ones(TEXT_LEN, dtype=torch.long).index_fill_(0, torch.tensor([TEXT_LEN - 1]), 0)  # padding

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 4.0 if guidance is None else guidance
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 32), prompt_embeds_mask=mask.expand(batch, -1),
                  true_cfg_scale=guidance, height=LATENT * VAE_SCALE, width=LATENT * VAE_SCALE,
                  num_inference_steps=steps, generator=generators(seeds), output_type="latent")
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 32),
                      negative_prompt_embeds_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long))
        return kw

    return pipe, call_kwargs


def _zimage():
    """A 32x32 latent: the backbone pads its image tokens to a multiple of 32, which 16x16 at patch 4 is not."""
    torch.manual_seed(0)
    transformer = _wake_zeros(ZImageTransformer2DModel(
        in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[4, 6, 6], axes_lens=[128, 32, 32]))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # Z-Image's (the pipeline passes its own sigmas)
    pipe = ZImagePipeline(scheduler=scheduler, vae=None, text_encoder=None, tokenizer=None, transformer=transformer)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 4.0 if guidance is None else guidance if guidance > 1 else 0.0  # it guides at any scale above 0
        # the pipeline keeps each prompt's own tokens: 5 or 33 here, which the backbone pads to 32 or 64
        kw = dict(prompt_embeds=[_randn(1000 + s, 5 + 28 * (s % 2), 32) for s in seeds], guidance_scale=guidance,
                  height=2 * LATENT * VAE_SCALE, width=2 * LATENT * VAE_SCALE, num_inference_steps=steps,
                  generator=generators(seeds), output_type="latent")
        if guidance > 0:
            kw.update(negative_prompt_embeds=[_randn(NEG_SEED + 1, 3, 32)] * batch)
        return kw

    return pipe, call_kwargs


def _sd3(dual_attention_layers=()):
    """SD3; with ``dual_attention_layers`` (0,): SD3.5 Medium's, whose first blocks add a second self-attention."""
    torch.manual_seed(0)
    transformer = _wake_zeros(SD3Transformer2DModel(
        sample_size=LATENT, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=LATENT, dual_attention_layers=dual_attention_layers))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)  # SD3-medium's
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=scheduler, vae=None, text_encoder=None,
                                    tokenizer=None, text_encoder_2=None, tokenizer_2=None, text_encoder_3=None,
                                    tokenizer_3=None)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 4.0 if guidance is None else guidance
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 32), pooled_prompt_embeds=per_sample(seeds, 2, 16),
                  guidance_scale=guidance, height=LATENT * VAE_SCALE, width=LATENT * VAE_SCALE,
                  num_inference_steps=steps, generator=generators(seeds), output_type="latent")
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 32),
                      negative_pooled_prompt_embeds=_shared(batch, 2, 16))
        return kw

    return pipe, call_kwargs


def _pixart():
    torch.manual_seed(0)
    transformer = _wake_zeros(PixArtTransformer2DModel(
        sample_size=LATENT, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8))
    # v-prediction: x0 = alpha x - sigma v stays bounded for a random model (epsilon would divide by alpha_t)
    scheduler = DPMSolverMultistepScheduler(prediction_type="v_prediction")
    pipe = PixArtSigmaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer,
                               scheduler=scheduler)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 4.5 if guidance is None else guidance
        # padded prompts of 4 to 7 tokens, as a T5 tokenizer would give
        mask = torch.stack([(torch.arange(TEXT_LEN) < 4 + s % 4).long() for s in seeds])
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 32), prompt_attention_mask=mask, negative_prompt=None,
                  guidance_scale=guidance, height=LATENT * VAE_SCALE, width=LATENT * VAE_SCALE,
                  num_inference_steps=steps, generator=generators(seeds), output_type="latent",
                  use_resolution_binning=False)
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 32),
                      negative_prompt_attention_mask=(torch.arange(TEXT_LEN) < 1).long().expand(batch, -1).clone())
        return kw

    return pipe, call_kwargs


def _sana():
    """Patch 2, where Sana's checkpoints use 1, so that the shared tests' sizes 2, 4 and 8 hold here too
    (tests/test_backbones.py runs patch 1); the latent is 32x (the pipeline's factor without a VAE)."""
    torch.manual_seed(0)
    transformer = _wake_zeros(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.0, sample_size=LATENT, patch_size=2))
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    pipe = SanaPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=transformer, scheduler=scheduler)
    mask = torch.ones(TEXT_LEN, dtype=torch.long).index_fill_(0, torch.tensor([TEXT_LEN - 1]), 0)  # padding

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 32), prompt_attention_mask=mask.expand(batch, -1),
                  guidance_scale=4.5 if guidance is None else guidance, height=LATENT * 32, width=LATENT * 32,
                  use_resolution_binning=False, num_inference_steps=steps, generator=generators(seeds),
                  output_type="latent")
        if kw["guidance_scale"] > 1:
            kw.update(negative_prompt=None, negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 32),
                      negative_prompt_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long))
        return kw

    return pipe, call_kwargs


def _wan_transformer(seed: int = 0) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return _wake_zeros(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32))


def _wan(two_experts: bool = False):
    """Wan 2.1; with ``two_experts``, Wan 2.2's layout: a second expert takes the steps below t = 750 (3 of 6)."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=_wan_transformer(),
                       transformer_2=_wan_transformer(1) if two_experts else None,
                       boundary_ratio=0.75 if two_experts else None)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 5.0 if guidance is None else guidance
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 16), guidance_scale=guidance,
                  height=LATENT * VAE_SCALE, width=LATENT * VAE_SCALE, num_frames=5,  # 2 latent frames
                  num_inference_steps=steps, generator=generators(seeds), output_type="latent")
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 16))
        return kw

    return pipe, call_kwargs


def _hunyuanvideo15():
    """Patch 2, where HunyuanVideo 1.5 uses 1 (as Sana's tiny pipeline), so that the shared tests' sizes 2, 4 and 8
    hold; a 16x VAE. Text-to-video: its image prompt is zeros, masked out."""
    torch.manual_seed(0)
    transformer = _wake_zeros(HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, patch_size=2, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
        rope_axes_dim=(4, 6, 6)))
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1)
    pipe = HunyuanVideo15Pipeline(text_encoder=None, tokenizer=None, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=None,
                                  tokenizer_2=None, guider=ClassifierFreeGuidance(guidance_scale=6.0))
    mask = torch.ones(TEXT_LEN, dtype=torch.long).index_fill_(0, torch.tensor([TEXT_LEN - 1]), 0)  # padding

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        pipe.guider.guidance_scale = 6.0 if guidance is None else guidance  # its guidance is a component's
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 16), prompt_embeds_mask=mask.expand(batch, -1),
                  prompt_embeds_2=per_sample(seeds, 2, 4, 8), prompt_embeds_mask_2=torch.ones(batch, 4),
                  height=LATENT * 16, width=LATENT * 16, num_frames=5,  # 2 latent frames
                  num_inference_steps=steps, generator=generators(seeds), output_type="latent")
        if pipe.guider.guidance_scale > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 16),
                      negative_prompt_embeds_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                      negative_prompt_embeds_2=_shared(batch, 2, 4, 8),
                      negative_prompt_embeds_mask_2=torch.ones(batch, 4))
        return kw

    return pipe, call_kwargs


def _ltx():
    """LTX-Video 0.9: the pipeline packs its latent into tokens of patch 1 (sizes 1, 2 and 4 here; a 32x VAE
    and 8x in time when vae is None: 512x512, 9 frames for a 16x16 latent of 2 frames); CFG as one doubled
    batch, which the pipeline's cache context names "cond_uncond"."""
    torch.manual_seed(0)
    transformer = _wake_zeros(LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                         attention_head_dim=12, cross_attention_dim=24, num_layers=2,
                                                         caption_channels=16))
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=None, text_encoder=None,
                       tokenizer=None, transformer=transformer)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 3.0 if guidance is None else guidance
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 16),
                  prompt_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long), guidance_scale=guidance,
                  height=LATENT * 32, width=LATENT * 32, num_frames=9, num_inference_steps=steps,
                  generator=generators(seeds), output_type="latent")
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 16),
                      negative_prompt_attention_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long))
        return kw

    return pipe, call_kwargs


def _dit():
    torch.manual_seed(0)
    transformer = _wake_zeros(DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
        sample_size=LATENT, patch_size=2, norm_num_groups=1))
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), layers_per_block=1,
                        latent_channels=4, norm_num_groups=4, sample_size=LATENT)
    with torch.no_grad():  # keep decoded values well inside (-1, 1): the pipeline clamps (x / 2 + 0.5) to [0, 1]
        vae.decoder.conv_out.weight.mul_(0.5)
        vae.decoder.conv_out.bias.zero_()
    scheduler = DDIMScheduler(prediction_type="v_prediction", clip_sample=False)  # bounded, nothing clipped
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 4.0 if guidance is None else guidance
        return dict(class_labels=[(7 * s + 1) % 1000 for s in seeds], guidance_scale=guidance,
                    num_inference_steps=steps, generator=generators(seeds), output_type="pt")

    return pipe, call_kwargs


def _hunyuanimage():
    """Patch 2, where HunyuanImage 2.1 uses 1 (as for HunyuanVideo 1.5), so that the shared tests' sizes 2, 4 and 8
    hold; an 8x VAE where 2.1's is 32x; its guidance a component, adaptive projected guidance."""
    torch.manual_seed(0)
    transformer = _wake_zeros(HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, patch_size=(2, 2), text_embed_dim=16, text_embed_2_dim=8, rope_axes_dim=(8, 8)))
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * 4,
                                    layers_per_block=1, spatial_compression_ratio=8, sample_size=128,
                                    scaling_factor=1.0)
    pipe = HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0), vae=vae, text_encoder=None,
                                tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer,
                                guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5))
    mask = torch.ones(TEXT_LEN, dtype=torch.long).index_fill_(0, torch.tensor([TEXT_LEN - 1]), 0)  # padding

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        pipe.guider.guidance_scale = 3.5 if guidance is None else guidance  # its guidance is a component's
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, 16), prompt_embeds_mask=mask.expand(batch, -1),
                  prompt_embeds_2=per_sample(seeds, 2, 4, 8), prompt_embeds_mask_2=torch.ones(batch, 4),
                  height=LATENT * 8, width=LATENT * 8, num_inference_steps=steps, generator=generators(seeds),
                  output_type="latent")
        if pipe.guider.guidance_scale > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, 16),
                      negative_prompt_embeds_mask=torch.ones(batch, TEXT_LEN, dtype=torch.long),
                      negative_prompt_embeds_2=_shared(batch, 2, 4, 8),
                      negative_prompt_embeds_mask_2=torch.ones(batch, 4))
        return kw

    return pipe, call_kwargs


def ltx2_transformer() -> LTX2VideoTransformer3DModel:
    """A copy of the tiny LTX-2 transformer of ``ddit.tiny_pipelines``: video (4 channels, patch 1) and audio (4
    channels) streams, two blocks."""
    return deepcopy(_tiny_ltx2().transformer)


@cache
def _tiny_ltx2() -> DiffusionPipeline:
    """``ddit.tiny_pipelines``' LTX-2 pipeline, built once (its Gemma 3, VAEs and vocoder too); callers copy."""
    return tiny_pipeline("ltx2")


LTX2_CAPTION, LTX2_TEXT_LAYERS = 32, 2  # the prompt embeddings the connectors take: every text layer stacked


def _ltx2():
    """LTX-2: video and audio in one transformer, which returns both. Patch 1 (sizes 1, 2 and 4 here); the tiny
    folder's VAEs, never run, 2x in space and time: 32x32, 5 frames for a 16x16 latent of 3 frames. Each step calls
    the transformer up to three times: CFG as one doubled batch ("cond_uncond"), then spatio-temporal guidance
    ("uncond_stg") and modality isolation ("uncond_modality"), one row per sample each. The text connectors are
    real (tiny); the prompts are embeddings."""
    text = ("text_encoder", "tokenizer")
    pipe = LTX2Pipeline(**{k: None if k in text else deepcopy(v) for k, v in _tiny_ltx2().components.items()})
    width = LTX2_CAPTION * (LTX2_TEXT_LAYERS + 1)

    def call_kwargs(batch=1, seeds=None, steps=6, guidance=None):
        seeds = _seeds(batch, seeds)
        guidance = 3.0 if guidance is None else guidance
        mask = torch.ones(batch, TEXT_LEN, dtype=torch.long)
        kw = dict(prompt_embeds=per_sample(seeds, 1, TEXT_LEN, width), prompt_attention_mask=mask,
                  guidance_scale=guidance, audio_guidance_scale=guidance, spatio_temporal_guidance_blocks=[1],
                  height=LATENT * 2, width=LATENT * 2, num_frames=5, frame_rate=25.0, num_inference_steps=steps,
                  generator=generators(seeds), output_type="latent")
        if guidance > 1:
            kw.update(negative_prompt_embeds=_shared(batch, 1, TEXT_LEN, width), negative_prompt_attention_mask=mask)
        return kw

    return pipe, call_kwargs


_BUILDERS = {"flux": _flux, "flux2": _flux2, "chroma": _chroma, "qwenimage": _qwenimage, "zimage": _zimage,
             "sd3": _sd3, "pixart": _pixart, "sana": _sana, "wan": _wan, "hunyuanvideo15": _hunyuanvideo15, "dit": _dit,
             "hunyuanimage": _hunyuanimage,
             # not in NAMES (whose tests assume a base patch of 2, and one model per family): tests/test_experts.py,
             # tests/test_ltx.py, tests/test_ltx2.py and the TeaCache tests of tests/test_pipelines.py run them
             "wan22": partial(_wan, two_experts=True), "ltx": _ltx, "ltx2": _ltx2,
             "sd35m": partial(_sd3, dual_attention_layers=(0,))}


def build(name: str) -> tuple[DiffusionPipeline, Callable[..., dict]]:
    """A tiny stock pipeline (fp32, eval, no progress bar; same weights every call) and its ``call_kwargs``.

    ``call_kwargs(batch=1, seeds=None, steps=6, guidance=None)`` returns the kwargs of
    ``pipe(**kwargs)``: seeds default to ``range(batch)``, ``guidance=None`` is the
    pipeline's CFG-on default and ``guidance=1`` turns CFG off. The pipeline and its
    inputs are on ``DDIT_TEST_DEVICE`` (default ``cpu``; ``cuda`` on a GPU machine), the
    generators on the CPU, so every device starts from the same noise.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown pipeline {name!r}; one of {NAMES}")
    pipe, call_kwargs = _BUILDERS[name]()
    device = torch.device(os.environ.get("DDIT_TEST_DEVICE", "cpu"))
    pipe = _finish(pipe).to(device)

    def to(v):
        return v.to(device) if isinstance(v, torch.Tensor) else [to(x) for x in v] if isinstance(v, list) else v

    def on_device(**kwargs):
        return {k: to(v) for k, v in call_kwargs(**kwargs).items()}

    return pipe, on_device


def latents(output) -> torch.Tensor:
    """The output tensor of a pipeline call (``images`` or ``frames``, or a ``return_dict=False`` tuple), as float."""
    if isinstance(output, (tuple, list)):
        x = output[0]
    else:
        x = getattr(output, "images", None)
        if x is None:
            x = output.frames
    if not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.float()
