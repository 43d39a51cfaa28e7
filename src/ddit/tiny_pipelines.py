"""Complete tiny pipeline folders (Flux, FLUX.2 [klein], Chroma, Qwen-Image, Z-Image, SD3, PixArt-Sigma, Sana,
HunyuanImage 2.1, Wan 2.1 and Wan 2.2 with its two experts, each also as image-to-video, HunyuanVideo 1.5,
LTX-Video, LTX-2 (video and audio), SkyReels-V2, also image-to-video, and its diffusion forcing; FLUX.1, SD3,
Qwen-Image and Sana with a ControlNet), made offline, that stock diffusers loads.

Why: to try ``ddit`` (distil, ablate, enable) end to end from a text prompt (and a first frame) without
downloading a model, and to test it on the same folders a user would hand it.
``save_tiny_pipeline(kind, folder)`` writes ``model_index.json`` and every component:
tokenizers built from a hand-written vocabulary (a byte-level CLIP BPE, a character
T5 unigram, a byte-level Qwen BPE with its chat template, ByT5's bytes, a character Gemma), random
CLIP / T5 / UMT5 / Qwen3 / Qwen2.5-VL / Gemma 2 / Gemma 3 text encoders, a VAE that downsamples by the
factor the pipeline assumes, a small random transformer and the scheduler.
Each folder is a few hundred kilobytes (Z-Image's 1.7 MB: its timestep MLP is 1024 wide
at any model width) and the same bytes every call.

Run a saved folder at ``TINY_CALL[kind]``: there the latent is 16x16 where the
transformer patchifies it (Flux: before its 2x2 packing), so patch sizes 2, 4 and 8
divide it::

    pipe = DiffusionPipeline.from_pretrained(save_tiny_pipeline("flux", "tiny-flux"))
    image = pipe("a red circle", num_inference_steps=4, **TINY_CALL["flux"]).images[0]

Needs ``transformers`` 5 or later (for the text encoders and tokenizers).
"""

from __future__ import annotations

import copy
import inspect
import os
import re
import string
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AdaptiveProjectedMixGuidance,
    AutoencoderDC,
    AutoencoderKL,
    AutoencoderKLFlux2,
    AutoencoderKLHunyuanImage,
    AutoencoderKLHunyuanVideo15,
    AutoencoderKLLTX2Audio,
    AutoencoderKLLTX2Video,
    AutoencoderKLLTXVideo,
    AutoencoderKLQwenImage,
    AutoencoderKLWan,
    ChromaPipeline,
    ChromaTransformer2DModel,
    ClassifierFreeGuidance,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    Flux2KleinPipeline,
    Flux2Transformer2DModel,
    FluxControlNetModel,
    FluxControlNetPipeline,
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
    QwenImageControlNetModel,
    QwenImageControlNetPipeline,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    SanaControlNetModel,
    SanaControlNetPipeline,
    SanaPipeline,
    SanaTransformer2DModel,
    SD3ControlNetModel,
    SD3Transformer2DModel,
    SkyReelsV2DiffusionForcingPipeline,
    SkyReelsV2ImageToVideoPipeline,
    SkyReelsV2Pipeline,
    SkyReelsV2Transformer3DModel,
    StableDiffusion3ControlNetPipeline,
    StableDiffusion3Pipeline,
    UniPCMultistepScheduler,
    WanImageToVideoPipeline,
    WanPipeline,
    WanTransformer3DModel,
    ZImagePipeline,
    ZImageTransformer2DModel,
)

KINDS = ("flux", "flux2", "chroma", "qwenimage", "zimage", "sd3", "pixart", "sana", "hunyuanimage", "wan", "wan-i2v",
         "wan22", "wan22-i2v", "hunyuanvideo15", "ltx", "ltx2", "skyreels", "skyreels-i2v", "skyreels-df")
#: ControlNet pipelines (FLUX.1, SD3, Qwen-Image, Sana) with a one-block ControlNet, called with a control_image.
CONTROLNET_KINDS = ("flux-controlnet", "sd3-controlnet", "qwenimage-controlnet", "sana-controlnet")
SIDE = 128  # image side: a 16x16 latent under the VAEs' factor 8
TINY_CALL = {
    "flux": dict(height=SIDE, width=SIDE),
    "flux2": dict(height=SIDE, width=SIDE),  # FLUX.2 [klein]: call it with prompt=..., its first argument is image
    "chroma": dict(height=SIDE, width=SIDE),
    "qwenimage": dict(height=SIDE, width=SIDE),
    "zimage": dict(height=SIDE, width=SIDE),
    "sd3": dict(height=SIDE, width=SIDE),
    # binning would snap 128 to the 256-pixel bins of the transformer's sample size
    "pixart": dict(height=SIDE, width=SIDE, use_resolution_binning=False),
    # its DC-AE's factor 32: an 8x8 latent, which Sana's sizes 1, 2 and 4 divide; binning off, as for PixArt
    "sana": dict(height=2 * SIDE, width=2 * SIDE, use_resolution_binning=False),
    "hunyuanimage": dict(height=SIDE, width=SIDE),  # its tiny VAE: 8x where HunyuanImage 2.1's is 32x
    "wan": dict(height=SIDE, width=SIDE, num_frames=5),  # 2 latent frames
    "wan-i2v": dict(height=SIDE, width=SIDE, num_frames=5),  # Wan 2.1 image-to-video: call it with an image too
    "wan22": dict(height=SIDE, width=SIDE, num_frames=5),  # Wan 2.2's two experts
    "wan22-i2v": dict(height=SIDE, width=SIDE, num_frames=5),  # and its image-to-video: call it with an image too
    "hunyuanvideo15": dict(height=2 * SIDE, width=2 * SIDE, num_frames=5),  # its VAE's factor 16: 16x16, 2 frames
    "ltx": dict(height=SIDE // 2, width=SIDE // 2, num_frames=9),  # its tiny VAE: 4x in space and time, 16x16x3
    "ltx2": dict(height=SIDE // 4, width=SIDE // 4, num_frames=5),  # its tiny VAE: 2x in space and time, 16x16x3
    "skyreels": dict(height=SIDE, width=SIDE, num_frames=5),  # Wan's VAE: 2 latent frames
    "skyreels-i2v": dict(height=SIDE, width=SIDE, num_frames=5),  # call it with an image too
    "skyreels-df": dict(height=SIDE, width=SIDE, num_frames=5),  # diffusion forcing: a timestep per latent frame
}
# a ControlNet pipeline runs at its family's size, called with a control_image too
TINY_CALL.update({kind: TINY_CALL[kind.removesuffix("-controlnet")] for kind in CONTROLNET_KINDS})
CLIP_LENGTH = 77  # the CLIP tokenizers' model_max_length, as in every real checkpoint
#: Qwen's chat format, which FLUX.2 [klein] wraps every prompt in before encoding it.
QWEN_CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
             "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError("tiny pipelines need transformers for their text encoders and tokenizers: "
                          "pip install transformers") from e
    if int(transformers.__version__.split(".")[0]) < 5:
        raise ImportError(f"tiny pipelines need transformers 5 or later (found {transformers.__version__}): "
                          "pip install -U transformers")
    return transformers


def wake_zeros(model: torch.nn.Module) -> torch.nn.Module:
    """Give zero-initialised parameters (adaLN, output heads) random values, so the output depends on everything."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                torch.nn.init.normal_(p, std=0.05)
    return model


# -- tokenizers: a fixed vocabulary, so nothing is trained or downloaded

def _byte_alphabet() -> list[str]:
    """GPT-2's printable stand-ins for the 256 bytes (what CLIP's byte-level BPE works on)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in keep else chr(next(extra)) for b in range(256)]


def _clip_tokenizer(tf):
    """CLIP's byte-level BPE with no merges: one token per byte, ``</w>`` marking a word's last one."""
    alphabet = _byte_alphabet()
    tokens = [*alphabet, *(c + "</w>" for c in alphabet), "<|startoftext|>", "<|endoftext|>"]
    return tf.CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=CLIP_LENGTH)


def _t5_tokenizer(tf, max_length: int):
    """T5's unigram tokenizer over single characters (UMT5 uses the same class)."""
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -3.0) for c in string.ascii_letters + string.digits + string.punctuation]
    return tf.T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=max_length)


def _qwen_tokenizer(tf):
    """Qwen's byte-level BPE with no merges (one token per byte), its special tokens and chat template."""
    tokens = [*_byte_alphabet(), "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = tf.Qwen2Tokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], model_max_length=512)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = QWEN_CHAT
    return tokenizer


def _gemma_tokenizer(tf):
    """Gemma's tokenizer over single printable characters (Sana's Gemma 2, LTX-2's Gemma 3)."""
    return tf.GemmaTokenizer(vocab={t: i for i, t in enumerate(
        ["<pad>", "<eos>", "<bos>", "<unk>", "\u2581", *(c for c in string.printable if not c.isspace())])})


# -- text encoders: random, from tiny configs whose widths the transformers take

def _clip_encoder(tf, tokenizer, hidden: int, projection: int | None = None):
    """CLIPTextModel, or CLIPTextModelWithProjection when ``projection`` is given (SD3's pooled text embeds)."""
    config = tf.CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_LENGTH, projection_dim=projection or hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    return (tf.CLIPTextModelWithProjection if projection else tf.CLIPTextModel)(config)


def _t5_encoder(tf, tokenizer, d_model: int, umt5: bool = False):
    """T5EncoderModel (Flux, SD3, PixArt) or UMT5EncoderModel (Wan)."""
    config = (tf.UMT5Config if umt5 else tf.T5Config)(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=2, num_heads=2,
        relative_attention_num_buckets=8, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id)
    return (tf.UMT5EncoderModel if umt5 else tf.T5EncoderModel)(config)


def _qwen3_encoder(tf, tokenizer, hidden: int, layers: int = 28, causal_lm: bool = True):
    """Qwen3ForCausalLM with 28 layers: FLUX.2 [klein] stacks the hidden states of layers 9, 18 and 27;
    Z-Image takes a Qwen3Model's last but one."""
    config = tf.Qwen3Config(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                            num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                            head_dim=hidden // 2, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id)
    return (tf.Qwen3ForCausalLM if causal_lm else tf.Qwen3Model)(config)


def _qwen25vl_encoder(tf, tokenizer, hidden: int):
    """Qwen2_5_VLForConditionalGeneration (Qwen-Image's text encoder), whose last hidden state the pipeline takes;
    its vision tower, which text-to-image never runs, is one block of width 8."""
    text = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},  # halves of head_dim 16
                bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id)
    vision = dict(depth=1, hidden_size=8, intermediate_size=16, num_heads=2, out_hidden_size=hidden,
                  fullatt_block_indexes=[0], patch_size=2, temporal_patch_size=1, spatial_merge_size=1, window_size=4)
    return tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision))


def _vae(latent_channels: int, **scaling) -> AutoencoderKL:
    """An AutoencoderKL with four blocks: the factor 8 (2 ** (blocks - 1)) every image pipeline assumes."""
    return AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=latent_channels, norm_num_groups=2,
        sample_size=SIDE, **scaling)


# -- the pipelines: tests/tiny_pipelines.py's transformers and schedulers, at the VAEs' latent channels

def _flux(tf) -> DiffusionPipeline:
    tokenizer, tokenizer_2 = _clip_tokenizer(tf), _t5_tokenizer(tf, 512)
    transformer = wake_zeros(FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
        axes_dims_rope=(4, 4, 8)))
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip_encoder(tf, tokenizer, 32), tokenizer=tokenizer,
        text_encoder_2=_t5_encoder(tf, tokenizer_2, 32), tokenizer_2=tokenizer_2, transformer=transformer)


def _flux2(tf) -> DiffusionPipeline:
    """FLUX.2 [klein] (guided with CFG, not guidance-distilled): three stacked Qwen3 layers of width 8 make the
    transformer's 24-wide text input."""
    tokenizer = _qwen_tokenizer(tf)
    transformer = wake_zeros(Flux2Transformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4),
        guidance_embeds=False))
    vae = AutoencoderKLFlux2(block_out_channels=(8,) * 4, layers_per_block=1, latent_channels=16, norm_num_groups=4,
                             mid_block_add_attention=False, sample_size=SIDE)
    return Flux2KleinPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True),
                              vae=vae, text_encoder=_qwen3_encoder(tf, tokenizer, 8), tokenizer=tokenizer,
                              transformer=transformer)


def _chroma(tf) -> DiffusionPipeline:
    tokenizer = _t5_tokenizer(tf, 512)
    transformer = wake_zeros(ChromaTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
        approximator_hidden_dim=32, approximator_layers=1))
    return ChromaPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096),
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_t5_encoder(tf, tokenizer, 32), tokenizer=tokenizer, transformer=transformer)


def _prefix_as_tokens(tokenizer, prefix: str, text: str, count: int) -> None:
    """Add ``text`` (the system instruction inside ``prefix``) to the byte-level ``tokenizer`` as added tokens, so
    that ``prefix`` counts ``count`` tokens, as under Qwen's own merges: a pipeline that drops that many tokens
    of its encoded template then keeps the prompt and the template's tail. ``text`` holds no newline, so no added
    token can reach across the newline before the prompt into it. Each token is a run of whole characters
    ending in a non-space one, with the spaces before it: a run of spaces alone would also match inside others."""
    pieces = count - (len(tokenizer(prefix).input_ids) - len(text.encode()))
    units = re.findall(r"\s*\S", text)
    cuts = [round(i * len(units) / pieces) for i in range(pieces + 1)]
    tokenizer.add_tokens(["".join(units[a:b]) for a, b in zip(cuts, cuts[1:])])


def _qwenimage(tf) -> DiffusionPipeline:
    """Qwen-Image drops the first tokens of its encoded prompt template (34: its system prefix under Qwen's own
    merges)."""
    tokenizer = _qwen_tokenizer(tf)
    stock = QwenImagePipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=None)
    prefix = stock.prompt_template_encode.split("{}")[0]
    _, text = prefix.split("<|im_start|>")[1].split("<|im_end|>")[0].split("\n")  # "system", "Describe..."
    _prefix_as_tokens(tokenizer, prefix, text, stock.prompt_template_encode_start_idx)
    transformer = wake_zeros(QwenImageTransformer2DModel(
        patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, axes_dims_rope=(4, 6, 6)))
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                                 temperal_downsample=[False, True, True])  # spatial factor 8
    scheduler = FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192,
                                                time_shift_type="exponential", shift_terminal=0.02)
    return QwenImagePipeline(scheduler=scheduler, vae=vae, text_encoder=_qwen25vl_encoder(tf, tokenizer, 32),
                             tokenizer=tokenizer, transformer=transformer)


def _zimage(tf) -> DiffusionPipeline:
    """Z-Image: a Qwen3 encoder whose prompt tokens (chat template included) reach the transformer unpadded."""
    tokenizer = _qwen_tokenizer(tf)
    transformer = wake_zeros(ZImageTransformer2DModel(
        in_channels=16, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=32,
        axes_dims=[4, 6, 6], axes_lens=[1024, 32, 32]))
    return ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_qwen3_encoder(tf, tokenizer, 32, layers=2, causal_lm=False), tokenizer=tokenizer,
        transformer=transformer)


def _sd3(tf) -> DiffusionPipeline:
    """Two CLIPs of width 16 (pooled 8 each) side by side, padded to the T5's 32: SD3's layout, shrunk."""
    tokenizer, tokenizer_2, tokenizer_3 = _clip_tokenizer(tf), _clip_tokenizer(tf), _t5_tokenizer(tf, 256)
    transformer = wake_zeros(SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
        pos_embed_max_size=16))
    return StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=_vae(16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False),
        text_encoder=_clip_encoder(tf, tokenizer, 16, projection=8), tokenizer=tokenizer,
        text_encoder_2=_clip_encoder(tf, tokenizer_2, 16, projection=8), tokenizer_2=tokenizer_2,
        text_encoder_3=_t5_encoder(tf, tokenizer_3, 32), tokenizer_3=tokenizer_3)


def _pixart(tf) -> DiffusionPipeline:
    tokenizer = _t5_tokenizer(tf, 300)
    # sample_size 32 so that the default resolution binning has bins (256 pixels); TINY_CALL turns it off
    transformer = wake_zeros(PixArtTransformer2DModel(
        sample_size=32, num_layers=2, patch_size=2, attention_head_dim=8, num_attention_heads=3,
        caption_channels=32, in_channels=4, cross_attention_dim=24, out_channels=8))
    # v-prediction: x0 = alpha x - sigma v stays bounded for a random model (epsilon would divide by alpha_t)
    return PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=_t5_encoder(tf, tokenizer, 32), vae=_vae(4, scaling_factor=0.13025),
        transformer=transformer, scheduler=DPMSolverMultistepScheduler(prediction_type="v_prediction"))


def _sana(tf) -> DiffusionPipeline:
    """Sana: a character Gemma tokenizer and a Gemma2 encoder of width 32, patch 1 on a 32x DC-AE."""
    tokenizer = _gemma_tokenizer(tf)
    text = tf.Gemma2Model(tf.Gemma2Config(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    transformer = wake_zeros(SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, num_layers=2,
        num_cross_attention_heads=2, cross_attention_head_dim=8, cross_attention_dim=16, caption_channels=32,
        mlp_ratio=2.0, sample_size=8, patch_size=1))
    vae = AutoencoderDC(latent_channels=4, attention_head_dim=4, encoder_block_out_channels=(8,) * 6,
                        decoder_block_out_channels=(8,) * 6, encoder_layers_per_block=(1,) * 6,
                        decoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 6,
                        decoder_qkv_multiscales=((),) * 6, upsample_block_type="interpolate",
                        downsample_block_type="Conv", scaling_factor=0.41407)
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return SanaPipeline(tokenizer=tokenizer, text_encoder=text, vae=vae, transformer=transformer, scheduler=scheduler)


def _wan_transformer(in_channels: int = 16, image_dim: int | None = None) -> WanTransformer3DModel:
    """``image_dim``: Wan 2.1 I2V's, whose blocks also attend to CLIP image tokens through their own projections."""
    return wake_zeros(WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=in_channels, out_channels=16,
        text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32, image_dim=image_dim, added_kv_proj_dim=24 if image_dim else None))


def _wan(tf, two_experts: bool = False, image_to_video: bool = False) -> DiffusionPipeline:
    """Wan 2.1; with ``two_experts``, Wan 2.2 A14B's layout: ``transformer_2`` takes the steps below t = 750
    (a real checkpoint's ``boundary_ratio`` is in its model_index.json; 0.75 gives each expert half of a short
    tiny run's steps). ``image_to_video``: the image's latent and a mask after the noisy latent (16 + 16 + 4 = 36
    channels in); Wan 2.1's also reads the image's CLIP tokens (a 28-pixel CLIP vision model: 5 tokens), Wan 2.2
    A14B's has no image encoder. Wan 2.1 I2V's blocks take the last 512 text tokens as the text: call it at the
    pipeline's own max_sequence_length."""
    tokenizer = _t5_tokenizer(tf, 226)
    channels = 36 if image_to_video else 16
    clip = image_to_video and not two_experts
    transformer = _wan_transformer(channels, image_dim=8 if clip else None)
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])  # spatial factor 8, temporal 4
    shared = dict(tokenizer=tokenizer, text_encoder=_t5_encoder(tf, tokenizer, 16, umt5=True), vae=vae,
                  scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), transformer=transformer,
                  transformer_2=_wan_transformer(channels) if two_experts else None,
                  boundary_ratio=0.75 if two_experts else None)
    if clip:
        encoder = tf.CLIPVisionModel(tf.CLIPVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                                         num_attention_heads=2, image_size=28, patch_size=14))
        processor = tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        pipe = WanImageToVideoPipeline(image_processor=processor, image_encoder=encoder, **shared)
        # as real folders name it: without torchvision transformers builds its PIL twin, which would be recorded
        pipe.register_to_config(image_processor=("transformers", "CLIPImageProcessor"))
        return pipe
    if image_to_video:
        return WanImageToVideoPipeline(image_processor=None, image_encoder=None, **shared)
    return WanPipeline(**shared)


def _skyreels(tf, diffusion_forcing: bool = False, image_to_video: bool = False) -> DiffusionPipeline:
    """SkyReels-V2: Wan 2.1's text encoder, VAE and blocks, under UniPC with flow sigmas as its checkpoints have it.
    Its diffusion forcing pipeline gives each latent frame its own timestep, and passes an fps flag that the
    transformer embeds (``inject_sample_info``, as the DF checkpoints set it); its text-to-video one passes none.
    Image-to-video: Wan 2.1 I2V's layout (a mask and the image's latent after the noisy latent, CLIP image tokens
    the blocks attend to), its CLIP encoder with a projection, behind a CLIPProcessor."""
    tokenizer = _t5_tokenizer(tf, 226)
    transformer = wake_zeros(SkyReelsV2Transformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=36 if image_to_video else 16,
        out_channels=16, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2, rope_max_seq_len=32,
        inject_sample_info=diffusion_forcing, image_dim=8 if image_to_video else None,
        added_kv_proj_dim=24 if image_to_video else None))
    vae = AutoencoderKLWan(base_dim=4, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    shared = dict(tokenizer=tokenizer, text_encoder=_t5_encoder(tf, tokenizer, 16, umt5=True), vae=vae,
                  scheduler=scheduler, transformer=transformer)
    if image_to_video:
        encoder = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(
            hidden_size=8, intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, image_size=28,
            patch_size=14, projection_dim=8))
        images = tf.CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor = tf.CLIPProcessor(image_processor=images, tokenizer=_clip_tokenizer(tf))
        return SkyReelsV2ImageToVideoPipeline(image_encoder=encoder, image_processor=processor, **shared)
    pipeline = SkyReelsV2DiffusionForcingPipeline if diffusion_forcing else SkyReelsV2Pipeline
    return pipeline(**shared)


def _hunyuanvideo15(tf) -> DiffusionPipeline:
    """HunyuanVideo 1.5 (text-to-video, patch 1 on a 16x VAE): a Qwen2.5-VL text model whose third-last hidden
    state it takes after dropping its template's first 108 tokens (the system prefix under Qwen's merges, made
    to count as many here), and ByT5 for quoted text."""
    tokenizer = _qwen_tokenizer(tf)
    defaults = inspect.signature(HunyuanVideo15Pipeline._get_mllm_prompt_embeds).parameters
    system = defaults["system_message"].default
    prefix = tokenizer.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": ""}],
                                           tokenize=False).rsplit("<|im_end|>", 1)[0]  # up to the prompt
    _prefix_as_tokens(tokenizer, prefix, system, defaults["crop_start"].default)
    text = tf.Qwen2_5_VLTextModel(tf.Qwen2_5_VLTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=2048, rope_scaling={"type": "mrope", "mrope_section": [1, 2, 1]},
        bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id))
    tokenizer_2 = tf.ByT5Tokenizer()
    text_2 = tf.T5EncoderModel(tf.T5Config(vocab_size=len(tokenizer_2), d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8))
    transformer = wake_zeros(HunyuanVideo15Transformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=2,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8, rope_axes_dim=(4, 6, 6)))
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8,) * 5, layers_per_block=1)
    return HunyuanVideo15Pipeline(text_encoder=text, tokenizer=tokenizer, transformer=transformer, vae=vae,
                                  scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_2,
                                  tokenizer_2=tokenizer_2, guider=ClassifierFreeGuidance(guidance_scale=6.0))


def _hunyuanimage(tf) -> DiffusionPipeline:
    """HunyuanImage 2.1 (patch 1): Qwen2.5-VL text (the third-last hidden state, after the template's first 34
    tokens) and ByT5 for quoted text, adaptive projected guidance; a VAE with 32 channels a level (its GroupNorm's
    32 groups) that compresses 8x where 2.1's compresses 32x. 19 MB, as HunyuanVideo 1.5's: the transformer's ByT5
    projection is 2048 wide at any model width."""
    tokenizer = _qwen_tokenizer(tf)
    ids = dict(bos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               eos_token_id=tokenizer.eos_token_id)
    text = tf.Qwen2_5_VLForConditionalGeneration(tf.Qwen2_5_VLConfig(  # the class the pipeline names; its vision
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 2, 1]}, **ids),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           fullatt_block_indexes=[0]), **ids))  # tower is never called on text
    tokenizer_2 = tf.ByT5Tokenizer()
    text_2 = tf.T5EncoderModel(tf.T5Config(vocab_size=len(tokenizer_2), d_model=8, d_kv=4, d_ff=16, num_layers=1,
                                           num_heads=2, relative_attention_num_buckets=8))
    transformer = wake_zeros(HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, rope_axes_dim=(8, 8)))
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * 4,
                                    layers_per_block=1, spatial_compression_ratio=8, sample_size=SIDE,
                                    scaling_factor=1.0)
    return HunyuanImagePipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=4.0), vae=vae, text_encoder=text,
                                tokenizer=tokenizer, text_encoder_2=text_2, tokenizer_2=tokenizer_2,
                                transformer=transformer, guider=AdaptiveProjectedMixGuidance(guidance_scale=3.5))


def _ltx(tf) -> DiffusionPipeline:
    """LTX-Video 0.9 (patch 1: sizes 1, 2 and 4), T5 text, and a VAE that compresses 4x in space and time where
    LTX's own does 32x and 8x (a 64x64, 9-frame video is a 16x16 latent of 3 frames)."""
    tokenizer = _t5_tokenizer(tf, 128)
    transformer = wake_zeros(LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                        attention_head_dim=12, cross_attention_dim=24, num_layers=2,
                                                        caption_channels=16))
    vae = AutoencoderKLLTXVideo(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,) * 4,
        decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5,
        spatio_temporal_scaling=(True, True, False, False), decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4, upsample_factor=(1,) * 4,
        timestep_conditioning=False, encoder_causal=True, decoder_causal=False, patch_size=1)
    return LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae, tokenizer=tokenizer,
                       text_encoder=_t5_encoder(tf, tokenizer, 16), transformer=transformer)


def _ltx2(tf) -> DiffusionPipeline:
    """LTX-2: video and audio from one transformer (patch 1: sizes 1, 2 and 4), Gemma 3 (its vision tower one block
    of width 8) whose every layer's hidden state the connectors take, and VAEs and a vocoder at diffusers' own test
    sizes (the video's 2x in space and time where LTX-2's is 32x and 8x: a 32x32, 5-frame video is a 16x16 latent
    of 3 frames). Its stock spatio-temporal guidance perturbs block 28, which two blocks lack: pass
    ``spatio_temporal_guidance_blocks=[1]``."""
    from diffusers.pipelines.ltx2 import LTX2TextConnectors
    from diffusers.pipelines.ltx2.vocoder import LTX2Vocoder

    tokenizer = _gemma_tokenizer(tf)
    text = tf.Gemma3TextConfig(
        vocab_size=len(tokenizer) + 3, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id)
    vision = tf.SiglipVisionConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
                                   image_size=28, patch_size=14)  # never run from text
    n = len(tokenizer)  # the image tokens' ids, past the text's
    text_encoder = tf.Gemma3ForConditionalGeneration(tf.Gemma3Config(
        text_config=text.to_dict(), vision_config=vision.to_dict(), mm_tokens_per_image=4, image_token_index=n,
        boi_token_index=n + 1, eoi_token_index=n + 2))
    connectors = LTX2TextConnectors(  # every text layer's hidden state, and the embeddings': 3 x 32 wide
        caption_channels=32, text_proj_in_factor=3, video_connector_num_attention_heads=4,
        video_connector_attention_head_dim=8, video_connector_num_layers=1,
        video_connector_num_learnable_registers=None, audio_connector_num_attention_heads=4,
        audio_connector_attention_head_dim=8, audio_connector_num_layers=1,
        audio_connector_num_learnable_registers=None, connector_rope_base_seq_len=32, rope_theta=10000.0,
        rope_double_precision=False, causal_temporal_positioning=False, rope_type="split")
    transformer = wake_zeros(LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=4,
        audio_cross_attention_dim=8, num_layers=2, caption_channels=32, rope_double_precision=False,
        rope_type="split"))
    vae = AutoencoderKLLTX2Video(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,), decoder_block_out_channels=(8,),
        layers_per_block=(1,), decoder_layers_per_block=(1, 1), spatio_temporal_scaling=(True,),
        decoder_spatio_temporal_scaling=(True,), decoder_inject_noise=(False, False), downsample_type=("spatial",),
        upsample_residual=(False,), upsample_factor=(1,), timestep_conditioning=False, patch_size=1, patch_size_t=1,
        encoder_causal=True, decoder_causal=False)
    audio_vae = AutoencoderKLLTX2Audio(
        base_channels=4, output_channels=2, ch_mult=(1,), num_res_blocks=1, attn_resolutions=None, in_channels=2,
        resolution=32, latent_channels=2, norm_type="pixel", causality_axis="height", dropout=0.0,
        mid_block_add_attention=False, sample_rate=16000, mel_hop_length=160, is_causal=True, mel_bins=8)
    vocoder = LTX2Vocoder(
        in_channels=16, hidden_channels=32, out_channels=2, upsample_kernel_sizes=[4, 4], upsample_factors=[2, 2],
        resnet_kernel_sizes=[3], resnet_dilations=[[1, 3, 5]], leaky_relu_negative_slope=0.1,
        output_sampling_rate=16000)
    return LTX2Pipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, audio_vae=audio_vae,
                        text_encoder=text_encoder, tokenizer=tokenizer, connectors=connectors,
                        transformer=transformer, vocoder=vocoder)


def _sana_controlnet(transformer) -> SanaControlNetModel:
    """Sana's ControlNet, which diffusers makes from no transformer: the transformer's config, one block."""
    taken = inspect.signature(SanaControlNetModel.__init__).parameters
    return SanaControlNetModel(**{k: v for k, v in transformer.config.items() if k in taken and k != "num_layers"},
                               num_layers=1)


#: ControlNet pipelines: (pipeline class, a one-block ControlNet made from the transformer). From a copy: SD3's
#: from_transformer writes its layer count into the transformer's own config.
_CONTROLNETS = {
    "flux": (FluxControlNetPipeline, lambda t: FluxControlNetModel.from_transformer(
        copy.deepcopy(t), num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2)),
    "sd3": (StableDiffusion3ControlNetPipeline, lambda t: SD3ControlNetModel.from_transformer(
        copy.deepcopy(t), num_layers=1, num_extra_conditioning_channels=0)),
    "qwenimage": (QwenImageControlNetPipeline, lambda t: QwenImageControlNetModel.from_transformer(
        copy.deepcopy(t), num_layers=1, attention_head_dim=16, num_attention_heads=2)),
    "sana": (SanaControlNetPipeline, _sana_controlnet),
}


def _controlnet(tf, kind: str) -> DiffusionPipeline:
    """``kind``'s pipeline with a one-block ControlNet made from its transformer: call it with a ``control_image``."""
    base = _BUILDERS[kind](tf)
    pipeline, make = _CONTROLNETS[kind]
    return pipeline.from_pipe(base, controlnet=wake_zeros(make(base.transformer)))


_BUILDERS = {"flux": _flux, "flux2": _flux2, "chroma": _chroma, "qwenimage": _qwenimage, "zimage": _zimage,
             "sd3": _sd3, "pixart": _pixart, "sana": _sana, "wan": _wan, "wan-i2v": partial(_wan, image_to_video=True),
             "wan22": partial(_wan, two_experts=True),
             "wan22-i2v": partial(_wan, two_experts=True, image_to_video=True), "hunyuanvideo15": _hunyuanvideo15,
             "ltx": _ltx, "ltx2": _ltx2, "hunyuanimage": _hunyuanimage, "skyreels": _skyreels,
             "skyreels-i2v": partial(_skyreels, image_to_video=True),
             "skyreels-df": partial(_skyreels, diffusion_forcing=True),
             **{f"{kind}-controlnet": partial(_controlnet, kind=kind) for kind in _CONTROLNETS}}


def save_tiny_pipeline(kind: str, folder: str | os.PathLike) -> Path:
    """Write a complete random-weight ``kind`` pipeline (one of ``KINDS`` or ``CONTROLNET_KINDS``) to ``folder`` and
    return its path.

    Stock ``DiffusionPipeline.from_pretrained(folder)`` loads it; call it with
    ``TINY_CALL[kind]``. Seeded: the same weights every call, and the caller's random
    state is left as it was.
    """
    folder = Path(folder)
    tiny_pipeline(kind).save_pretrained(folder)
    return folder


def tiny_pipeline(kind: str) -> DiffusionPipeline:
    """The random-weight ``kind`` pipeline that ``save_tiny_pipeline`` writes, in memory, in eval mode as
    ``from_pretrained`` loads it (its text encoders' dropout off)."""
    if kind not in _BUILDERS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; one of {', '.join(KINDS + CONTROLNET_KINDS)}")
    tf = _transformers()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        pipe = _BUILDERS[kind](tf)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    return pipe
