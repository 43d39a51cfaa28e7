"""Backbone specs on the tiny random config of each family (REFERENCE.md section 2)."""

import inspect
import math
from functools import partial

import pytest
import torch
from diffusers import (
    ChromaTransformer2DModel,
    DiTTransformer2DModel,
    Flux2Transformer2DModel,
    Flux3Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanImageTransformer2DModel,
    HunyuanVideo15Transformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SD3Transformer2DModel,
    SkyReelsV2Transformer3DModel,
    WanTransformer3DModel,
    ZImageTransformer2DModel,
)
from diffusers.models.embeddings import get_1d_rotary_pos_embed
from tiny_pipelines import ltx2_transformer

import ddit.backbones
from ddit.adapter import MultiPatchTransformer, PatchHead
from ddit.backbones import BackboneSpec, DiTSpec, as_batch, patchify, sincos_positions, spec_for, unpatchify

B = 2


def _randomize(model):
    """Give zero-initialised layers (adaLN, output heads) random values, so outputs depend on everything."""
    torch.manual_seed(0)
    for p in model.parameters():
        if not p.any():
            torch.nn.init.normal_(p, std=0.05)
    return model.eval()


def _flux_ids(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1], ids[..., 2] = torch.arange(h)[:, None], torch.arange(w)[None]
    return ids.reshape(-1, 3)


def dit():
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=8, patch_size=2, norm_num_groups=1)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8), timestep=torch.tensor([10, 900]),
                       class_labels=torch.tensor([1, 2]))


def pixart():
    model = PixArtTransformer2DModel(sample_size=8, num_layers=2, patch_size=2, attention_head_dim=8,
                                     num_attention_heads=3, caption_channels=32, in_channels=4,
                                     cross_attention_dim=24, out_channels=8)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 8), encoder_hidden_states=torch.randn(B, 5, 32),
                       encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
                       timestep=torch.tensor([10, 900]), added_cond_kwargs={"resolution": None, "aspect_ratio": None})


def sana(**config):  # patch 1, as Sana's deep-compression latents have
    model = SanaTransformer2DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                   num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=8,
                                   cross_attention_dim=16, caption_channels=32, mlp_ratio=2.0, sample_size=8,
                                   patch_size=1, **config)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 8), encoder_hidden_states=torch.randn(B, 5, 32),
                       encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
                       timestep=torch.tensor([10, 900]))


def sd3():
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                  num_attention_heads=4, joint_attention_dim=32, caption_projection_dim=32,
                                  pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)
    return model, dict(hidden_states=torch.randn(B, 4, 16, 8), encoder_hidden_states=torch.randn(B, 5, 32),
                       pooled_projections=torch.randn(B, 16), timestep=torch.tensor([10.0, 900.0]))


def flux():
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    h, w = 8, 4  # packed tokens of a 16 x 8 latent
    return model, dict(hidden_states=torch.randn(B, h * w, 64), encoder_hidden_states=torch.randn(B, 5, 32),
                       pooled_projections=torch.randn(B, 32), timestep=torch.tensor([0.01, 0.9]),
                       img_ids=_flux_ids(h, w), txt_ids=torch.zeros(5, 3), guidance=torch.tensor([3.5, 3.5]))


def flux2():
    model = Flux2Transformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                    timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))
    h, w = 8, 4
    ids = torch.cat([_flux_ids(h, w), torch.zeros(h * w, 1)], 1)  # (t, h, w, l), as Flux2Pipeline makes them
    text_ids = torch.zeros(5, 4).index_copy_(1, torch.tensor([3]), torch.arange(5.0)[:, None])
    return model, dict(hidden_states=torch.randn(B, h * w, 64), encoder_hidden_states=torch.randn(B, 5, 32),
                       timestep=torch.tensor([0.01, 0.9]), img_ids=ids, txt_ids=text_ids,
                       guidance=torch.tensor([3.5, 3.5]))


def chroma():  # two blocks of each kind, so that each block's modulation is told apart
    model = ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2,
                                     attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                     axes_dims_rope=(4, 4, 8), approximator_num_channels=16,
                                     approximator_hidden_dim=32, approximator_layers=1)
    h, w = 8, 4
    mask = torch.cat([torch.tensor([[1, 1, 1, 0, 0], [1] * 5]), torch.ones(B, h * w)], 1)  # text + image, as
    # ChromaPipeline makes it (a float mask, which attention adds as a bias)
    return model, dict(hidden_states=torch.randn(B, h * w, 64), encoder_hidden_states=torch.randn(B, 5, 32),
                       timestep=torch.tensor([0.01, 0.9]), img_ids=_flux_ids(h, w), txt_ids=torch.zeros(5, 3),
                       attention_mask=mask)


def qwenimage(**config):
    model = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                        axes_dims_rope=(4, 6, 6), **config)
    h, w = 8, 4  # packed tokens of a 16 x 8 latent
    mask = torch.tensor([[1, 1, 1, 0, 0], [1] * 5])  # the first prompt is shorter, padded as the pipeline pads
    return model, dict(hidden_states=torch.randn(B, h * w, 64), encoder_hidden_states=torch.randn(B, 5, 32),
                       encoder_hidden_states_mask=mask, timestep=torch.tensor([0.01, 0.9]),
                       img_shapes=[[(1, h, w)]] * B)


def wan():
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                  out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
    return model, dict(hidden_states=torch.randn(B, 4, 3, 16, 8), encoder_hidden_states=torch.randn(B, 5, 16),
                       timestep=torch.tensor([10, 900]))


def wan_i2v():
    """Wan 2.1 image-to-video: condition channels after the latent's, and CLIP image tokens that the blocks'
    cross-attention reads through their own projections (it takes the last 512 context tokens as the text)."""
    model = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=12,
                                  out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32, num_layers=2,
                                  cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32,
                                  image_dim=8, added_kv_proj_dim=24)
    return model, dict(hidden_states=torch.randn(B, 12, 3, 16, 8), encoder_hidden_states=torch.randn(B, 512, 16),
                       encoder_hidden_states_image=torch.randn(B, 6, 8), timestep=torch.tensor([10, 900]))


def flux3(condition: bool = False, flow_map: bool = False):
    """FLUX.3: packed tokens of an 8x4 grid with (t, h, w, l) ids, text ids along l; ``condition``: a 4x4
    reference image as its own argument; ``flow_map``: a step-distilled model, given the step's target."""
    model = Flux3Transformer2DModel(in_channels=16, cond_in_channels=16, num_layers=1, num_single_layers=2,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                    timestep_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4),
                                    flow_map=flow_map)
    text_ids = torch.zeros(5, 4)
    text_ids[:, 3] = torch.arange(5)
    inputs = dict(hidden_states=torch.randn(B, 32, 16), encoder_hidden_states=torch.randn(B, 5, 16),
                  timestep=torch.tensor([0.01, 0.9]), img_ids=_ids4(8, 4), txt_ids=text_ids)
    if condition:
        inputs.update(image_cond_hidden_states=torch.randn(B, 16, 16), image_cond_ids=_ids4(4, 4, first=10))
    if flow_map:
        inputs["target_timestep"] = torch.tensor([0.0, 0.7])
    return model, inputs


def _ids4(h, w, first=0):
    ids = torch.zeros(h, w, 4)
    ids[..., 0], ids[..., 1], ids[..., 2] = first, torch.arange(h)[:, None], torch.arange(w)[None]
    return ids.reshape(-1, 4)


def qwenimage21(condition: tuple[int, int] | None = None):
    """Qwen-Image 2.1: an 8x8 target after 5 text tokens (the first prompt's last two padding), each 4 target
    tokens one slot of img_mask; ``condition``: a condition image's (rows, columns), its slots inside the text."""
    model = QwenImage21Transformer2DModel(in_channels=8, out_channels=8, num_layers=2, attention_head_dim=16,
                                          num_attention_heads=2, context_in_dim=16, mlp_ratio=2,
                                          axes_dims_rope=(4, 6, 6))
    rows, cols = 8, 8
    before, after = [False] * 3, [False] * 2  # text around a condition image's slots
    slots = [True] * (math.prod(condition) // 4) if condition else []
    img_mask = torch.tensor([before + slots + after + [True] * (rows * cols // 4)] * B)
    text = len(before) + len(slots) + len(after)
    valid = torch.ones(B, text, dtype=torch.bool)
    valid[0, -2:] = False
    shapes = [*([(1, *condition)] if condition else []), (1, rows, cols)]
    tokens = sum(math.prod(s) for s in shapes)
    return model, dict(hidden_states=torch.randn(B, tokens, 8), encoder_hidden_states=torch.randn(B, text, 16),
                       timestep=torch.tensor([0.01, 0.9]), img_shapes=[shapes] * B, img_mask=img_mask,
                       encoder_hidden_states_mask=valid)


def skyreels():
    """SkyReels-V2 text-to-video, with its fps embedding (inject_sample_info: the 14B models')."""
    model = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                         in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                                         num_layers=2, rope_max_seq_len=32, inject_sample_info=True)
    return model, dict(hidden_states=torch.randn(B, 4, 3, 16, 8), encoder_hidden_states=torch.randn(B, 5, 16),
                       timestep=torch.tensor([10, 900]), fps=[0, 1])


def skyreels_df(**config):
    """SkyReels-V2 diffusion forcing: a timestep per latent frame, and causal blocks of two frames."""
    model = SkyReelsV2Transformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                         in_channels=4, out_channels=4, text_dim=16, freq_dim=256, ffn_dim=32,
                                         num_layers=2, rope_max_seq_len=32, num_frame_per_block=2, **config)
    return model, dict(hidden_states=torch.randn(B, 4, 4, 16, 8), encoder_hidden_states=torch.randn(B, 5, 16),
                       timestep=torch.tensor([[0, 0, 500, 900], [10, 10, 20, 20]]), enable_diffusion_forcing=True)


def ltx():
    """LTX-Video: the pipeline's packed tokens of patch 1, its grid given as num_frames, height and width."""
    model = LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12,
                                       cross_attention_dim=24, num_layers=2, caption_channels=16)
    f, h, w = 2, 16, 8
    return model, dict(hidden_states=torch.randn(B, f * h * w, 4), encoder_hidden_states=torch.randn(B, 5, 16),
                       timestep=torch.tensor([10.0, 900.0]), encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0],
                                                                                                  [1] * 5]),
                       num_frames=f, height=h, width=w, rope_interpolation_scale=(8 / 25, 32, 32))


def ltx2():
    """LTX-2: video tokens of patch 1, the grid given as num_frames, height and width; 5 audio tokens beside them."""
    f, h, w = 2, 16, 8
    return ltx2_transformer(), dict(
        hidden_states=torch.randn(B, f * h * w, 4), audio_hidden_states=torch.randn(B, 5, 4),
        encoder_hidden_states=torch.randn(B, 5, 32), audio_encoder_hidden_states=torch.randn(B, 5, 32),
        timestep=torch.tensor([10.0, 900.0]), encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
        num_frames=f, height=h, width=w, audio_num_frames=5)


def zimage(**config):
    model = ZImageTransformer2DModel(in_channels=4, dim=32, n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=16, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64], **config)
    # lists of one tensor per sample; prompts of their own lengths (padded to 32 and 64 tokens inside); 48 image
    # tokens at patch 2, which the backbone pads to 64 (a coarse size, to 32)
    return model, dict(x=list(torch.randn(B, 4, 1, 24, 8)), t=torch.tensor([0.01, 0.9]),
                       cap_feats=[torch.randn(5, 16), torch.randn(37, 16)])


def hunyuanvideo15(**config):  # patch 1, as its 16x video latents have; 9 channels in (latent, condition, mask)
    model = HunyuanVideo15Transformer3DModel(in_channels=9, out_channels=4, num_attention_heads=2,
                                             attention_head_dim=16, num_layers=2, num_refiner_layers=1,
                                             text_embed_dim=16, text_embed_2_dim=8, image_embed_dim=8,
                                             rope_axes_dim=(4, 6, 6), **config)
    return model, dict(hidden_states=torch.randn(B, 9, 2, 16, 8), timestep=torch.tensor([10.0, 900.0]),
                       encoder_hidden_states=torch.randn(B, 5, 16),
                       encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
                       encoder_hidden_states_2=torch.randn(B, 3, 8),
                       encoder_attention_mask_2=torch.tensor([[1, 1, 0], [1] * 3]),
                       image_embeds=torch.zeros(B, 4, 8))  # text-to-video: no image prompt


def hunyuanimage(**config):  # HunyuanImage 2.1: patch 1 on a 32x latent, Qwen2.5-VL and ByT5 text
    model = HunyuanImageTransformer2DModel(**{**dict(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16, num_layers=1, num_single_layers=1,
        num_refiner_layers=1, text_embed_dim=16, text_embed_2_dim=8, rope_axes_dim=(8, 8)), **config})
    return model, dict(hidden_states=torch.randn(B, 4, 16, 8), timestep=torch.tensor([10.0, 900.0]),
                       encoder_hidden_states=torch.randn(B, 5, 16),
                       encoder_attention_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]),
                       encoder_hidden_states_2=torch.randn(B, 3, 8),
                       encoder_attention_mask_2=torch.tensor([[1, 1, 0], [1] * 3]))


def hunyuanimage_refiner():
    """The refiner's layout: a 3-D patch on a one-frame 5-D latent, RoPE over (frame, row, column), guidance
    embedded, no ByT5."""
    model, inputs = hunyuanimage(patch_size=(1, 1, 1), rope_axes_dim=(4, 6, 6), guidance_embeds=True,
                                 text_embed_2_dim=None)
    return model, {**inputs, "hidden_states": torch.randn(B, 4, 1, 16, 8), "guidance": torch.tensor([3500.0] * B),
                   "encoder_hidden_states_2": None, "encoder_attention_mask_2": None}


def _references(ids: torch.Tensor, *grids: tuple[float, int, int]) -> torch.Tensor:
    """Flux-style ids with reference images' tokens after the latent's: (first id, rows, columns) per reference,
    placed as FluxKontextPipeline (first id 1) and Flux2Pipeline (10, 20...) place them."""
    parts = [ids]
    for first, h, w in grids:
        ref = _flux_ids(h, w)
        ref[:, 0] = first
        parts.append(torch.cat([ref, torch.zeros(h * w, ids.shape[1] - 3)], 1))
    return torch.cat(parts)


def flux_kontext():
    """A 6x4-token reference (a 12x8 latent, first id 1): 4 divides it, 8 does not, so a step at 8 runs it at 4."""
    model, inputs = flux()
    return model, {**inputs, "hidden_states": torch.randn(B, 32 + 24, 64), "img_ids": _references(inputs["img_ids"],
                                                                                                   (1, 6, 4))}


def flux2_references():
    """Two references: 8x8 tokens (coarse at every size), and 3x5 tokens that only the base size divides; ids with
    a batch dimension, as Flux2Pipeline passes them."""
    model, inputs = flux2()
    ids = _references(inputs["img_ids"], (10, 8, 8), (20, 3, 5))
    return model, {**inputs, "hidden_states": torch.randn(B, 32 + 64 + 15, 64), "img_ids": ids.expand(B, -1, -1),
                   "txt_ids": inputs["txt_ids"].expand(B, -1, -1)}


def chroma_reference():
    model, inputs = chroma()
    mask = torch.cat([inputs["attention_mask"], torch.ones(B, 24)], 1)
    return model, {**inputs, "hidden_states": torch.randn(B, 32 + 24, 64), "attention_mask": mask,
                   "img_ids": _references(inputs["img_ids"], (1, 6, 4))}


def qwenimage_edit(**config):
    """Qwen-Image-Edit: a 4x8-token reference image after the latent's, its shape the second in img_shapes."""
    model, inputs = qwenimage(**config)
    return model, {**inputs, "hidden_states": torch.randn(B, 32 + 32, 64), "img_shapes": [[(1, 8, 4), (1, 4, 8)]] * B}


def qwenimage_edit2511():
    """Edit-2511's zero_cond_t (references modulated as at t = 0), with a second, 3x4-token reference that only the
    base size divides."""
    model, inputs = qwenimage_edit(zero_cond_t=True)
    return model, {**inputs, "hidden_states": torch.randn(B, 32 + 32 + 12, 64),
                   "img_shapes": [[(1, 8, 4), (1, 4, 8), (1, 3, 4)]] * B}


FAMILIES = {"dit": dit, "pixart": pixart, "sana": sana, "sd3": sd3, "flux": flux, "flux2": flux2, "chroma": chroma,
            "qwenimage": qwenimage, "qwenimage21": qwenimage21, "flux3": flux3,
            "flux3_reference_flow_map": partial(flux3, condition=True, flow_map=True),
            "qwenimage21_edit": partial(qwenimage21, condition=(4, 6)), "wan": wan, "wan_i2v": wan_i2v,
            "skyreels": skyreels, "skyreels_df": skyreels_df, "hunyuanvideo15": hunyuanvideo15, "ltx": ltx,
            "ltx2": ltx2,
            "hunyuanimage": hunyuanimage, "hunyuanimage_refiner": hunyuanimage_refiner,
            "zimage": zimage, "flux_kontext": flux_kontext, "flux2_references": flux2_references,
            "chroma_reference": chroma_reference, "qwenimage_edit": qwenimage_edit,
            "qwenimage_edit2511": qwenimage_edit2511}
# attention q/k/v/out (self, and cross where there is one) + feed-forward in + out, per block;
# Flux's single blocks: q/k/v + proj_mlp + proj_out; FLUX.2's: the fused qkv-mlp projection and its output;
# Z-Image: attention q/k/v/out + its gated feed-forward's three, per main layer and per image refiner layer
LORA_LAYERS = {"dit": 2 * 6, "pixart": 2 * 10, "sana": 2 * 10, "sd3": 2 * 6, "flux": 6 + 5, "flux2": 6 + 2,
               "chroma": 2 * (6 + 5), "qwenimage": 2 * 6, "wan": 2 * 10, "wan_i2v": 2 * 10, "hunyuanvideo15": 2 * 6,
               "skyreels": 2 * 10, "skyreels_df": 2 * 10, "qwenimage21": 2 * 7, "qwenimage21_edit": 2 * 7,
               "flux3": 3 * 6, "flux3_reference_flow_map": 3 * 6,
               "ltx": 2 * 10, "ltx2": 2 * 10, "zimage": 3 * 7, "flux_kontext": 6 + 5, "flux2_references": 6 + 2,
               "chroma_reference": 2 * (6 + 5), "qwenimage_edit": 2 * 6, "qwenimage_edit2511": 2 * 6,
               "hunyuanimage": 6 + 5, "hunyuanimage_refiner": 6 + 5}


@pytest.fixture(params=FAMILIES, scope="module")
def family(request):
    torch.manual_seed(0)
    model, inputs = FAMILIES[request.param]()
    _randomize(model)
    with torch.no_grad():
        reference = as_batch(model(**inputs, return_dict=False)[0])
    return request.param, MultiPatchTransformer(model), inputs, reference


@torch.no_grad()
def test_base_size_calls_the_backbone_unchanged(family):
    _, model, inputs, reference = family
    for size in (None, model.base_patch_size):
        assert (as_batch(model(**inputs, patch_size=size, return_dict=False)[0]) - reference).abs().max() <= 1e-6


@torch.no_grad()
def test_every_size_gives_a_finite_output_of_the_backbone_shape(family):
    _, model, inputs, reference = family
    assert model.patch_sizes == tuple(model.base_patch_size * k for k in (1, 2, 4))
    for size in model.patch_sizes[1:]:
        out = as_batch(model(**inputs, patch_size=size).sample)
        assert out.shape == reference.shape and out.isfinite().all()


def test_lora_sits_on_every_block_attention_and_feed_forward(family):
    name, model, _, _ = family
    layers = [n for n, m in model.backbone.named_modules() if m in model._lora_layers]
    assert len(layers) == LORA_LAYERS[name]
    assert all(n.split(".")[0] in ("transformer_blocks", "single_transformer_blocks", "blocks", "layers",
                                   "noise_refiner", "mode_blocks") for n in layers)
    assert all(set(layer.lora_A) == {f"patch{s}" for s in model.patch_sizes[1:]} for layer in model._lora_layers)


@torch.no_grad()
def test_family_forward_with_the_base_layers_reproduces_the_backbone(family):
    """The spec's own forward, fed the backbone's own patch layers, is the backbone's computation."""
    _, model, inputs, reference = family
    given = model._signature.bind(**inputs, return_dict=False)
    given.apply_defaults()
    head = PatchHead(*model.spec.base_weights(), scale=1)
    x = model.spec.latent(given.arguments)
    out = as_batch(model._patched(head, model.base_patch_size, x, given.arguments)[0])
    assert out.shape == reference.shape
    assert (model.generated(out, **inputs) - model.generated(reference, **inputs)).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["dit", "pixart", "sd3"])
def test_coarse_sincos_is_the_fine_table_at_stride_k(name):
    model, inputs = FAMILIES[name]()
    pe, latent = model.pos_embed, torch.zeros_like(inputs["hidden_states"])
    h, w = latent.shape[-2] // 2, latent.shape[-1] // 2
    with torch.no_grad():  # what the backbone adds at its own patch size
        fine = (pe(latent) - pe.proj.bias).reshape(B, h, w, -1)[0]
    for k in (2, 4):
        coarse = sincos_positions(pe, (h // k, w // k), k).reshape(h // k, w // k, -1)
        assert torch.allclose(coarse, fine[::k, ::k], atol=1e-6)


@torch.no_grad()
def test_flux_repacks_and_places_coarse_ids_at_patch_centres():
    torch.manual_seed(0)
    backbone, inputs = flux()
    model = MultiPatchTransformer(_randomize(backbone))
    latent = torch.randn(B, 16, 16, 8)
    packed = latent.view(B, 16, 8, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, 32, 64)  # FluxPipeline's packing
    assert torch.equal(patchify(latent, (2, 2)), packed)
    assert torch.equal(unpatchify(packed, (2, 2), (8, 4)), latent)
    seen = []
    hook = backbone.pos_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model(**inputs, patch_size=8)
    finally:
        hook.remove()
    image_ids = seen[0][5:]  # after the 5 text ids
    s = 4  # an 8 x 8 patch spans 4 x 4 packed tokens
    rows, cols = torch.meshgrid(torch.arange(2) * s + (s - 1) / 2, torch.arange(1) * s + (s - 1) / 2, indexing="ij")
    assert torch.equal(image_ids, torch.stack([torch.zeros(2), rows.flatten(), cols.flatten()], -1))


@torch.no_grad()
def test_flux2_places_coarse_ids_at_patch_centres_on_its_four_axes():
    torch.manual_seed(0)
    backbone, inputs = flux2()
    model = MultiPatchTransformer(_randomize(backbone))
    seen = []
    hook = backbone.pos_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        model(**inputs, patch_size=8)
    finally:
        hook.remove()
    assert torch.equal(seen[0], inputs["txt_ids"])
    s = 4  # an 8 x 8 patch spans 4 x 4 packed tokens
    rows, cols = torch.meshgrid(torch.arange(2) * s + (s - 1) / 2, torch.arange(1) * s + (s - 1) / 2, indexing="ij")
    assert torch.equal(seen[1], torch.stack([torch.zeros(2), rows.flatten(), cols.flatten(), torch.zeros(2)], -1))


def test_wan_rope_keeps_frames_and_puts_coarse_patches_at_centres():
    backbone, inputs = wan()
    spec = spec_for(backbone)
    fine = backbone.rope(inputs["hidden_states"])
    assert all(torch.allclose(a, b) for a, b in zip(spec.rope((3, 8, 4), 1), fine))
    cos, _ = spec.rope((3, 4, 2), 2)
    rope = backbone.rope
    rows = cos[0, :, 0].reshape(3, 4, 2, -1)[0, :, 0, rope.t_dim:rope.t_dim + rope.h_dim]
    expected, _ = get_1d_rotary_pos_embed(rope.h_dim, torch.arange(4) * 2 + 0.5, 10000.0, use_real=True,
                                          repeat_interleave_real=True, freqs_dtype=torch.float64)
    assert torch.allclose(rows, expected.to(rows))
    frames = cos[0, :, 0].reshape(3, 4, 2, -1)[:, 0, 0, :rope.t_dim]
    assert torch.allclose(frames, fine[0][0, :, 0].reshape(3, 8, 4, -1)[:, 0, 0, :rope.t_dim])


@torch.no_grad()
@pytest.mark.parametrize("name", ["chroma", "qwenimage"])
def test_masked_text_tokens_do_not_reach_a_coarse_output(name):
    """The first sample's last two text tokens are padding under a boolean mask: changing them changes nothing,
    at a coarse size as at the base one (Chroma's mask also covers the image tokens it shortens)."""
    torch.manual_seed(0)
    backbone, inputs = FAMILIES[name]()
    if name == "chroma":
        inputs["attention_mask"] = inputs["attention_mask"].bool()
    model = MultiPatchTransformer(_randomize(backbone))
    text = inputs["encoder_hidden_states"].clone()
    text[0, 3:] = torch.randn(2, text.shape[-1])
    for size in (2, 4):
        out, changed = (model(**{**inputs, "encoder_hidden_states": t}, patch_size=size).sample
                        for t in (inputs["encoder_hidden_states"], text))
        assert torch.allclose(out[0], changed[0], atol=1e-5)
    text[0, 0] += 1  # a token under the mask does reach it
    assert not torch.allclose(model(**{**inputs, "encoder_hidden_states": text}, patch_size=4).sample[0], out[0])


@torch.no_grad()
def test_wan_i2v_image_tokens_reach_a_coarse_output():
    """Wan 2.1 I2V's CLIP image tokens go to every block's cross-attention at a coarse size too."""
    torch.manual_seed(0)
    backbone, inputs = wan_i2v()
    model = MultiPatchTransformer(_randomize(backbone))
    other = {**inputs, "encoder_hidden_states_image": torch.randn_like(inputs["encoder_hidden_states_image"])}
    for size in (4, 8):
        assert not torch.allclose(model(**inputs, patch_size=size).sample, model(**other, patch_size=size).sample)


@torch.no_grad()
def test_skyreels_diffusion_forcing_runs_each_sample_with_its_fps_and_keeps_frame_blocks_causal():
    """SkyReels-V2's stock forward adds the fps embedding to per-frame modulation for one sample only (a batch of
    two fails to broadcast); the spec gives each row its own, so a batch is its rows run alone, the backbone's own
    layers included (at the base size the adapter calls the stock forward, which fails as before). A
    coarse token attends to its own and earlier blocks of frames only, as a fine one does."""
    torch.manual_seed(0)
    backbone, inputs = skyreels_df(inject_sample_info=True)
    backbone = _randomize(backbone)
    model, inputs = MultiPatchTransformer(backbone), {**inputs, "fps": [0, 1]}
    alone = [{k: v[i:i + 1] for k, v in inputs.items() if k != "enable_diffusion_forcing"} for i in range(B)]
    for row in alone:
        row["enable_diffusion_forcing"] = True
    reference = torch.cat([backbone(**row).sample for row in alone])
    given = model._signature.bind(**inputs)
    given.apply_defaults()
    base = model._patched(PatchHead(*model.spec.base_weights(), scale=1), model.base_patch_size,
                          inputs["hidden_states"], given.arguments)[0]
    assert (base - reference).abs().max() <= 1e-5
    coarse = model(**inputs, patch_size=4).sample
    assert (coarse - torch.cat([model(**row, patch_size=4).sample for row in alone])).abs().max() <= 1e-5
    assert (model(**{**inputs, "fps": [1, 1]}, patch_size=4).sample[0] - coarse[0]).abs().max() > 1e-4  # it counts
    later = inputs["hidden_states"].clone()
    later[:, :, 2:] += 1  # the second block of two frames
    moved = model(**{**inputs, "hidden_states": later}, patch_size=4).sample
    assert (moved[:, :, :2] - coarse[:, :, :2]).abs().max() <= 1e-5 < (moved[:, :, 2:] - coarse[:, :, 2:]).abs().max()


@torch.no_grad()
def test_wan22_ti2v_per_token_timesteps_are_reproduced_and_run_coarse():
    """Wan 2.2 TI2V (expand_timesteps) gives every token its timestep, its first frame's at 0 in image-to-video:
    the spec reproduces the backbone with them, and at a coarse size one timestep shared by every token is the
    per-sample one."""
    torch.manual_seed(0)
    backbone, inputs = wan()
    model = MultiPatchTransformer(_randomize(backbone))
    per_token = torch.full((B, 3 * 8 * 4), 700.0)
    per_token[:, : 8 * 4] = 0.0  # the first frame: the conditioning image
    given = model._signature.bind(**{**inputs, "timestep": per_token}, return_dict=False)
    given.apply_defaults()
    head = PatchHead(*model.spec.base_weights(), scale=1)
    reference = backbone(**{**inputs, "timestep": per_token}, return_dict=False)[0]
    assert (model._patched(head, 2, model.spec.latent(given.arguments), given.arguments)[0] - reference).abs().max() \
        <= 1e-5
    assert model.spec.timestep(given.arguments).tolist() == [700.0, 700.0]  # the step's: the noisiest token's
    coarse = model(**{**inputs, "timestep": per_token}, patch_size=4).sample
    shared = model(**{**inputs, "timestep": torch.full((B, 96), 700.0)}, patch_size=4).sample
    assert coarse.isfinite().all() and not torch.allclose(coarse, shared, atol=1e-3)  # the first frame's t counts
    assert torch.allclose(shared, model(**{**inputs, "timestep": torch.full((B,), 700.0)}, patch_size=4).sample,
                          atol=1e-5)


def test_ltx_per_token_timesteps_are_reproduced_and_a_coarse_patch_takes_its_frames():
    """LTX image-to-video gives the conditioning frame's tokens t = 0: the spec's forward reproduces the backbone
    with them, and a coarse step matches one whose timestep is each frame's, given per sample."""
    torch.manual_seed(0)
    backbone, inputs = ltx()
    model = MultiPatchTransformer(_randomize(backbone))
    per_token = torch.full((B, 2 * 16 * 8), 700.0)
    per_token[:, : 16 * 8] = 0.0  # the first frame: the conditioning image
    given = model._signature.bind(**{**inputs, "timestep": per_token}, return_dict=False)
    given.apply_defaults()
    x = model.spec.latent(given.arguments)
    head = PatchHead(*model.spec.base_weights(), scale=1)
    reference = backbone(**{**inputs, "timestep": per_token}, return_dict=False)[0]
    assert (model._patched(head, 1, x, given.arguments)[0] - reference).abs().max() <= 1e-5
    assert model.spec.timestep(given.arguments).tolist() == [700.0, 700.0]  # the step's: the noisiest token's
    coarse = model.spec._coarse_timestep(given.arguments, (2, 4, 2), 4).reshape(B, -1)  # 8 coarse tokens a frame
    assert torch.equal(coarse, torch.tensor([[0.0] * 8 + [700.0] * 8] * B))
    assert model(**{**inputs, "timestep": per_token}, patch_size=4).sample.isfinite().all()
    for t in (torch.full((B, 1), 700.0), torch.full((B, 2 * 16 * 8, 1), 700.0)):  # other pipelines' shapes
        assert torch.allclose(model(**{**inputs, "timestep": t}, patch_size=4).sample,
                              model(**{**inputs, "timestep": torch.full((B,), 700.0)}, patch_size=4).sample,
                              atol=1e-5)
    with pytest.raises(ValueError, match="tokens are not the \\(None, 16, 8\\) grid the call names"):
        model(**{**inputs, "num_frames": None}, patch_size=4)


@torch.no_grad()
def test_sana_with_sincos_positions_reproduces_the_backbone_and_runs_coarse():
    """Sana has no positions unless its config names an interpolation scale; then they are the fine table's."""
    torch.manual_seed(0)
    backbone, inputs = sana(interpolation_scale=1)
    model = MultiPatchTransformer(_randomize(backbone))
    assert backbone.patch_embed.pos_embed is not None
    given = model._signature.bind(**inputs)
    given.apply_defaults()
    out = model._patched(PatchHead(*model.spec.base_weights(), scale=1), 1, model.spec.latent(given.arguments),
                         given.arguments)[0]
    assert (out - backbone(**inputs).sample).abs().max() <= 1e-5
    assert model(**inputs, patch_size=4).sample.isfinite().all()


def test_qwenimage_rope_puts_coarse_patches_at_the_centres_of_its_centred_positions():
    """RoPE is a phase linear in position, so a patch-centre token's phase, times the number of fine tokens it
    covers, is the sum of theirs: coarse ** (s * s) is the product of the patch's fine tokens. Text keeps the
    positions the backbone gives it at the fine grid."""
    backbone, inputs = qwenimage()
    spec = spec_for(backbone)
    fine = backbone.pos_embed._compute_video_freqs(1, 8, 4)
    assert torch.equal(spec._centre_rope((8, 4), 1), fine)
    for s in (2, 4):
        grid = (8 // s, 4 // s)
        patches = fine.reshape(grid[0], s, grid[1], s, -1).permute(0, 2, 1, 3, 4).reshape(grid[0] * grid[1], s * s, -1)
        assert torch.allclose(spec._centre_rope(grid, s) ** (s * s), patches.prod(1), atol=1e-4)
    seen = []
    for block in backbone.transformer_blocks:
        block.register_forward_pre_hook(lambda m, args, kw: seen.append(kw["image_rotary_emb"]), with_kwargs=True)
    model = MultiPatchTransformer(backbone)
    with torch.no_grad():
        for size in (2, 4):
            model(**inputs, patch_size=size)
    assert torch.equal(seen[0][1], seen[-1][1]) and len(seen[-1][0]) == 8 * 4 // 4  # text as at the fine grid


def test_qwenimage21_rope_puts_coarse_patches_at_centres_and_keeps_the_prefix():
    """As for Qwen-Image: a coarse target token's phase, to the power of the fine tokens it covers, is their
    product; text and a condition image keep the positions the backbone gives them."""
    backbone, inputs = qwenimage21(condition=(4, 6))
    seen = []
    backbone.transformer_blocks[0].register_forward_pre_hook(
        lambda m, args, kw: seen.append(kw["rotary_emb"]), with_kwargs=True)
    model = MultiPatchTransformer(backbone)
    with torch.no_grad():
        for size in (1, 2, 4):
            model(**inputs, patch_size=size)
    fine, prefix = seen[0][-64:], len(seen[0]) - 64
    for s, coarse in zip((2, 4), seen[1:]):
        grid = 8 // s
        patches = fine.reshape(grid, s, grid, s, -1).permute(0, 2, 1, 3, 4).reshape(grid * grid, s * s, -1)
        assert torch.equal(coarse[:prefix], seen[0][:prefix]) and len(coarse) == prefix + grid * grid
        assert torch.allclose(coarse[prefix:] ** (s * s), patches.prod(1), atol=1e-4)


def test_flux3_feature_caches_are_refused_before_any_step():
    """Its per-mode blocks run beside the block lists the caches stand in for: refused, naming the blocks."""
    from ddit.caches import TaylorSeer, TeaCache

    model = MultiPatchTransformer(flux3()[0])
    for cache in (TaylorSeer(), TeaCache(coefficients="flux1-dev")):
        with pytest.raises(ValueError, match="do not run on Flux3Transformer2DModel: its per-mode blocks"):
            cache.check(model)


@torch.no_grad()
def test_flux3_refuses_what_its_stock_forward_refuses_and_references_among_the_latents_tokens():
    backbone, inputs = flux3(flow_map=True)
    model = MultiPatchTransformer(backbone)
    with pytest.raises(ValueError, match="required by, and only by, a flow-map transformer"):
        model(**{**inputs, "target_timestep": None}, patch_size=4)
    with pytest.raises(ValueError, match="go together"):
        model(**inputs, image_cond_hidden_states=torch.randn(B, 16, 16), patch_size=4)
    ids = torch.cat([inputs["img_ids"][:16], inputs["img_ids"][16:] + torch.tensor([1.0, 0, 0, 0])])
    with pytest.raises(ValueError, match="takes reference images as image_cond_hidden_states"):
        model(**{**inputs, "img_ids": ids}, patch_size=4)


@torch.no_grad()
def test_qwenimage21_kv_cache_keeps_a_prefix_per_size_and_each_group_of_rows():
    """The pipeline's KV cache holds the prefix (text, condition image) from the first step. The prefix does not
    depend on the target (block-causal attention), but it does on the size's LoRA, which runs on every token: each
    size keeps its own, filled at its first call ("cached" then runs as "extract"); a batch run in groups fills
    its rows group by group (``CacheRows``). Outputs are those without a cache, with trained LoRA weights."""
    from diffusers.models.transformers.transformer_qwenimage21 import QwenImage21KVCache

    from ddit.backbones.qwenimage21 import CacheRows

    torch.manual_seed(0)
    backbone, inputs = qwenimage21(condition=(4, 6))
    model = MultiPatchTransformer(_randomize(backbone))
    for p in model.trainable_parameters():  # LoRA B starts at zero: as if trained
        torch.nn.init.normal_(p, std=0.05)
    full = {size: model.generated(model(**inputs, patch_size=size).sample, **inputs) for size in (1, 2, 4)}
    cache = QwenImage21KVCache(2)
    for step, size in enumerate((4, 1, 4, 2, 1, 2)):
        out = model(**inputs, patch_size=size, kv_cache=cache, kv_cache_mode="cached" if step else "extract").sample
        torch.testing.assert_close(model.generated(out, **inputs), full[size])
        assert out.shape[1] == (64 if step in (2, 4, 5) else 5 + 24 + 64)  # all tokens where a size fills its cache
    cache = QwenImage21KVCache(2)
    for row in (1, 0):
        alone = {k: [v[row]] if k == "img_shapes" else v[row:row + 1] for k, v in inputs.items()}
        model(**alone, patch_size=2, kv_cache=CacheRows(cache, torch.tensor([row]), B), kv_cache_mode="extract")
    cached = model(**inputs, patch_size=2, kv_cache=cache, kv_cache_mode="cached").sample
    assert cached.shape[1] == 64
    torch.testing.assert_close(cached, full[2])


def test_qwenimage_refuses_the_layered_model_and_images_of_several_frames():
    backbone, inputs = qwenimage()
    model = MultiPatchTransformer(backbone)
    with pytest.raises(ValueError, match="several frames"):
        model(**{**inputs, "img_shapes": [[(2, 4, 4)]] * B}, patch_size=4)
    with pytest.raises(ValueError, match="32 image tokens, but img_shapes names"):
        model(**{**inputs, "img_shapes": [[(1, 8, 4), (1, 8, 4)]] * B}, patch_size=4)
    with pytest.raises(TypeError, match="3D RoPE"):
        MultiPatchTransformer(qwenimage(use_layer3d_rope=True)[0])


@torch.no_grad()
def test_references_keep_their_own_grids_and_run_as_coarse_as_their_sizes_allow():
    """An edit pipeline's reference images follow the latent's tokens: the latent (what the policy reads) is the
    generated grid alone; each reference runs at the coarsest size up to the step's that divides it."""
    model = MultiPatchTransformer(flux2_references()[0])
    inputs = flux2_references()[1]
    assert model.spec.latent(inputs).shape == (B, 16, 16, 8)
    first, second = model.spec.references(inputs)
    assert (first.start, first.stop, first.grid, first.index) == (32, 96, (8, 8), 1)
    assert (second.start, second.stop, second.grid, second.index) == (96, 111, (3, 5), 2)
    assert [model.reference_size(first, s) for s in (2, 4, 8)] == [2, 4, 8]
    assert [model.reference_size(second, s) for s in (2, 4, 8)] == [2, 2, 2]  # 3 x 5 tokens: a 6 x 10 latent
    assert [model.reference_tokens(first, s) for s in (2, 4, 8)] == [64, 16, 4]
    backbone, inputs = flux_kontext()
    kontext = MultiPatchTransformer(backbone)
    reference, = kontext.spec.references(inputs)
    assert [kontext.reference_size(reference, s) for s in (2, 4, 8)] == [2, 4, 4]  # a 12 x 8 latent
    with pytest.raises(ValueError, match="56 image tokens, but img_ids places 32: pass the img_ids"):
        kontext(**{**inputs, "img_ids": inputs["img_ids"][:32]}, patch_size=4)  # the reference's ids left out


@torch.no_grad()
def test_kontext_references_sit_at_their_own_patch_centres_and_reach_the_coarse_output():
    torch.manual_seed(0)
    backbone, inputs = flux_kontext()
    model = MultiPatchTransformer(_randomize(backbone))
    seen = []
    hook = backbone.pos_embed.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        out = model(**inputs, patch_size=8).sample
    finally:
        hook.remove()
    image_ids = seen[0][5:]  # after the 5 text ids
    assert len(image_ids) == 2 + 6  # the latent's 2 x 1 patches of 4 x 4 tokens, the reference's 3 x 2 of 2 x 2
    rows, cols = torch.meshgrid(torch.arange(3) * 2 + 0.5, torch.arange(2) * 2 + 0.5, indexing="ij")
    assert torch.equal(image_ids[2:], torch.stack([torch.ones(6), rows.flatten(), cols.flatten()], -1))
    assert torch.equal(out[:, 32:], torch.zeros_like(out[:, 32:]))  # the pipeline drops the references' outputs


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux_kontext", "flux2_references", "chroma_reference", "qwenimage_edit",
                                  "qwenimage_edit2511"])
def test_reference_tokens_reach_the_coarse_output(name):
    torch.manual_seed(0)
    backbone, inputs = FAMILIES[name]()
    model = MultiPatchTransformer(_randomize(backbone))
    n = model.spec.references(inputs)[0].start
    other = inputs["hidden_states"].clone()
    other[:, n:] = torch.randn_like(other[:, n:])
    for size in (4, 8):
        out = model(**inputs, patch_size=size).sample[:, :n]
        assert not torch.allclose(model(**{**inputs, "hidden_states": other}, patch_size=size).sample[:, :n], out)


@torch.no_grad()
def test_qwenimage_edit_references_take_the_next_frames_and_edit_2511_modulates_them_as_at_t_0():
    backbone, inputs = qwenimage_edit2511()
    spec = spec_for(backbone)
    fine = backbone.pos_embed._compute_video_freqs(1, 4, 8, 1)  # the first reference's, at frame 1
    assert torch.equal(spec._centre_rope((4, 8), 1, frame=1), fine)
    patches = fine.reshape(2, 2, 4, 2, -1).permute(0, 2, 1, 3, 4).reshape(8, 4, -1)  # its 2 x 2 patches
    assert torch.allclose(spec._centre_rope((2, 4), 2, frame=1) ** 4, patches.prod(1), atol=1e-4)
    seen = []
    backbone.transformer_blocks[0].register_forward_pre_hook(lambda m, args, kw: seen.append(kw), with_kwargs=True)
    MultiPatchTransformer(_randomize(backbone))(**inputs, patch_size=8)
    index, (image_rope, _) = seen[0]["modulate_index"], seen[0]["image_rotary_emb"]
    # the latent's 2 x 1 patches, the first reference's 1 x 2 (coarse), the second's 3 x 4 tokens (fine)
    assert index.tolist() == [[0] * 2 + [1] * (2 + 12)] * B and len(image_rope) == 2 + 2 + 12
    assert torch.equal(image_rope[4:], backbone.pos_embed._compute_video_freqs(1, 3, 4, 2))


def test_distillation_compares_the_generated_tokens_only():
    """The teacher's outputs at the references' tokens are dropped by the pipeline; the coarse path's are zeros:
    the loss compares the generated grid's."""
    from ddit.distill import DistillationLoss
    torch.manual_seed(0)
    backbone, inputs = flux_kontext()
    model = MultiPatchTransformer(_randomize(backbone))
    z_t, kwargs = inputs["hidden_states"], {k: v for k, v in inputs.items() if k != "hidden_states"}
    losses = DistillationLoss(model, (4, 8))(z_t, kwargs)
    with torch.no_grad():
        teacher = model(**inputs).sample[:, :32]
        expected = [torch.nn.functional.mse_loss(model(**inputs, patch_size=s).sample[:, :32], teacher) for s in (4, 8)]
    assert torch.allclose(losses, torch.stack(expected))


def test_qwenimage_trains_on_text_positions_cached_in_an_inference_run():
    """diffusers caches the text RoPE per device; made under inference mode (a generation, a recording), it
    cannot be saved for backward: the coarse path copies it."""
    torch.manual_seed(0)
    backbone, inputs = qwenimage()
    model = MultiPatchTransformer(_randomize(backbone))
    cached = backbone.pos_embed._get_device_freqs
    with torch.inference_mode():
        frozen = tuple(f.clone() for f in cached(torch.device("cpu")))  # as .to("cuda") would make them there
    backbone.pos_embed._get_device_freqs = lambda device: frozen
    model(**inputs, patch_size=4).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.heads["4"].parameters())


def test_unsupported_backbone_lists_the_supported_ones():
    with pytest.raises(TypeError, match="Linear.*DiTTransformer2DModel.*FluxTransformer2DModel"):
        MultiPatchTransformer(torch.nn.Linear(2, 2))


def test_spec_is_chosen_by_class_including_subclasses_and_plugins(monkeypatch):
    class MyDiT(DiTTransformer2DModel):
        pass

    class LinearSpec(BackboneSpec):
        model_class = "Linear"

    subclass = MyDiT(num_attention_heads=1, attention_head_dim=8, num_layers=1, norm_num_groups=1)
    assert isinstance(spec_for(subclass), DiTSpec)
    monkeypatch.setattr(ddit.backbones.plugins, "collect", lambda hook: [LinearSpec])
    assert isinstance(spec_for(torch.nn.Linear(2, 2)), LinearSpec)


@torch.no_grad()
@pytest.mark.parametrize("name", ["flux", "sd3", "qwenimage"])
def test_a_lora_scale_is_taken_out_before_the_blocks_as_the_stock_forward_does(name, caplog):
    torch.manual_seed(0)
    backbone, inputs = FAMILIES[name]()
    model = MultiPatchTransformer(_randomize(backbone))
    key = "attention_kwargs" if name == "qwenimage" else "joint_attention_kwargs"
    plain = model(**inputs, patch_size=4).sample
    with caplog.at_level("WARNING"):
        scaled = model(**inputs, **{key: {"scale": 0.5}}, patch_size=4).sample
    assert torch.equal(scaled, plain) and "scale" not in caplog.text


def test_arguments_of_the_fine_grid_are_refused_at_coarse_sizes():
    backbone, inputs = flux2()  # FLUX.2 takes no IP-Adapter: its spec projects none
    model = MultiPatchTransformer(backbone)
    image_prompt = {"ip_adapter_image_embeds": [torch.zeros(B, 4)]}
    with pytest.raises(ValueError, match=r"ip_adapter_image_embeds'\] \(an IP-Adapter.*drop it from the attention"):
        model(**inputs, joint_attention_kwargs=image_prompt, patch_size=4)
    backbone, inputs = chroma()  # its forward takes a ControlNet's residuals, which no Chroma pipeline makes
    model = MultiPatchTransformer(backbone)
    with pytest.raises(ValueError, match="controlnet_block_samples cannot be used at a coarse patch size"):
        model(**inputs, controlnet_block_samples=[torch.zeros(B, 32, 32)], patch_size=4)
    backbone, inputs = flux2()
    model = MultiPatchTransformer(backbone)
    with pytest.raises(ValueError, match="kv_cache_mode cannot be used at a coarse patch size"):
        model(**inputs, kv_cache_mode="extract", num_ref_tokens=4, patch_size=4)


def test_zimage_rope_is_the_backbones_table_and_puts_coarse_patches_at_centres():
    """At integer positions the spec's RoPE is the backbone's own table, bit for bit; a coarse patch's phase,
    times the number of fine tokens it covers, is the sum of theirs (RoPE is linear in position). The image
    sits at frame L + 1 after a prompt padded to L tokens, its pad tokens at (0, 0, 0), as the backbone has it."""
    backbone, _ = zimage()
    spec = spec_for(backbone)
    rows, cols = torch.arange(8.0), torch.arange(4.0)
    ids = torch.stack(torch.meshgrid(torch.tensor([33]), torch.arange(8), torch.arange(4), indexing="ij"), -1)
    fine = backbone.rope_embedder(ids.reshape(-1, 3))
    assert torch.equal(spec._rope(torch.tensor([33.0]), rows, cols, "cpu")[0], fine)
    for s in (2, 4):
        grid = (8 // s, 4 // s)
        coarse = spec._image_rope(grid, s, 33, "cpu")
        assert len(coarse) == 32 and torch.equal(coarse[grid[0] * grid[1]:], fine[:1].new_ones(1).expand(
            32 - grid[0] * grid[1], len(fine[0])))  # pads at (0, 0, 0): a phase of 1
        image = coarse[: grid[0] * grid[1]]
        patches = fine.reshape(grid[0], s, grid[1], s, -1).permute(0, 2, 1, 3, 4).reshape(len(image), s * s, -1)
        assert torch.allclose(image ** (s * s), patches.prod(1), atol=1e-4)
        assert torch.equal(image[:, :2], fine[:1, :2].expand(len(image), -1))  # the frame axis: frame 33 as before


@torch.no_grad()
def test_zimage_samples_of_a_batch_do_not_see_each_others_prompts():
    """Prompts of different lengths are padded and masked: a sample's output at a coarse size is the same
    alone as beside a sample with a longer prompt."""
    torch.manual_seed(0)
    backbone, inputs = zimage()
    model = MultiPatchTransformer(_randomize(backbone))
    for size in (4, 8):
        both = model(**inputs, patch_size=size).sample
        alone = model(x=inputs["x"][:1], t=inputs["t"][:1], cap_feats=inputs["cap_feats"][:1], patch_size=size).sample
        assert torch.allclose(both[0], alone[0], atol=1e-5)
        longer = [inputs["cap_feats"][0], torch.randn(70, 16)]
        assert torch.allclose(model(**{**inputs, "cap_feats": longer}, patch_size=size).sample[0], both[0], atol=1e-5)


def test_zimage_refuses_omni_inputs_controlnet_frame_patches_and_distilling_on_clean_latents(tmp_path):
    from ddit.distill import distill

    backbone, inputs = zimage()
    model = MultiPatchTransformer(backbone)
    with pytest.raises(ValueError, match="omni inputs"):
        model(**{**inputs, "x": [[x] for x in inputs["x"]]}, patch_size=4)
    with pytest.raises(ValueError, match="controlnet_block_samples cannot be used"):
        model(**inputs, controlnet_block_samples={0: torch.zeros(1)}, patch_size=4)
    with pytest.raises(TypeError, match="frame patch of 2"):
        MultiPatchTransformer(zimage(all_f_patch_size=(2,))[0])
    with pytest.raises(ValueError, match=r"distil it from its pipeline \(ddit distill --pipeline DIR\)"):
        distill(model, [(torch.zeros(4, 24, 8), {})], tmp_path)
    assert not any(tmp_path.iterdir())  # refused before any work


@torch.no_grad()
def test_hunyuanimage_rope_puts_patches_at_centres_and_its_text_reaches_coarse_steps():
    torch.manual_seed(0)
    backbone, inputs = hunyuanimage()
    spec = spec_for(backbone)
    assert all(torch.equal(a, b) for a, b in zip(spec.rope((16, 8), 1, "cpu"), backbone.rope(inputs["hidden_states"])))
    coarse, _ = spec.rope((4, 2), 4, "cpu")
    rows = coarse.reshape(4, 2, -1)[:, 0, :backbone.rope.rope_dim[0]]
    expected, _ = get_1d_rotary_pos_embed(backbone.rope.rope_dim[0], torch.arange(4) * 4 + 1.5, backbone.rope.theta,
                                          use_real=True)
    assert torch.allclose(rows, expected)
    model = MultiPatchTransformer(_randomize(backbone))
    quoted = {**inputs, "encoder_hidden_states_2": torch.randn(B, 3, 8)}  # other ByT5 tokens (quoted text)
    assert not torch.allclose(model(**quoted, patch_size=4).sample, model(**inputs, patch_size=4).sample)


def test_hunyuanvideo15_rope_keeps_frames_puts_patches_at_centres_and_image_prompts_reach_coarse_steps():
    torch.manual_seed(0)
    backbone, inputs = hunyuanvideo15()
    spec = spec_for(backbone)
    cos, sin = backbone.rope(inputs["hidden_states"])
    assert all(torch.equal(a, b) for a, b in zip(spec.rope((2, 16, 8), 1, "cpu"), (cos, sin)))
    coarse, _ = spec.rope((2, 4, 2), 4, "cpu")
    t, h = backbone.rope.rope_dim[:2]
    rows = coarse.reshape(2, 4, 2, -1)[0, :, 0, t:t + h]
    expected, _ = get_1d_rotary_pos_embed(h, torch.arange(4) * 4 + 1.5, backbone.rope.theta, use_real=True)
    assert torch.allclose(rows, expected)
    assert torch.equal(coarse.reshape(2, 4, 2, -1)[:, 0, 0, :t], cos.reshape(2, 16, 8, -1)[:, 0, 0, :t])
    model = MultiPatchTransformer(_randomize(backbone))
    image_prompt = {**inputs, "image_embeds": torch.randn(B, 4, 8)}  # image-to-video's SigLIP tokens
    assert not torch.allclose(model(**image_prompt, patch_size=4).sample, model(**inputs, patch_size=4).sample)


@torch.no_grad()
def test_hunyuanvideo15_image_prompts_and_meanflow_timesteps_reproduce_the_backbone():
    """Image-to-video (SigLIP tokens, valid) and the distilled models' second timestep (meanflow) take the
    backbone's own paths in the spec's forward too."""
    torch.manual_seed(0)
    backbone, inputs = hunyuanvideo15(use_meanflow=True)
    model = MultiPatchTransformer(_randomize(backbone))
    inputs.update(image_embeds=torch.randn(B, 4, 8), timestep_r=torch.tensor([5.0, 700.0]))
    given = model._signature.bind(**inputs)
    given.apply_defaults()
    out = model._patched(PatchHead(*model.spec.base_weights(), scale=1), 1, model.spec.latent(given.arguments),
                         given.arguments)[0]
    assert (out - backbone(**inputs).sample).abs().max() <= 1e-5


def test_clean_latent_distillation_is_refused_where_the_pipeline_appends_condition_channels(tmp_path):
    from ddit.distill import distill

    model = MultiPatchTransformer(hunyuanvideo15()[0])
    with pytest.raises(ValueError, match="takes 9 channels and returns 4: its pipeline appends condition"):
        distill(model, [(torch.zeros(9, 2, 16, 8), {})], tmp_path)
    assert not any(tmp_path.iterdir())


@torch.no_grad()
def test_teacache_watches_what_the_first_blocks_attention_receives(family):
    """TeaCache's signal (``ddit.caches.teacache.modulated_input``) is the first block's input as the block
    modulates it for its (self-)attention: per row (each row has its own timestep here), at the base size and on
    the coarse path's arguments, references and Edit-2511's ``modulate_index`` included. Wan watches the timestep
    projection instead (tests/test_pipelines.py)."""
    from ddit.caches.stack import StackRun, blocks_of
    from ddit.caches.teacache import modulated_input, watched_spec

    name, model, inputs, _ = family
    if name.startswith(("wan", "skyreels")):
        pytest.skip("Wan and SkyReels-V2: the timestep projection, not an attention input")
    if model.spec.caches_refused:  # FLUX.3, LTX-2: tested where they are refused
        pytest.skip(f"ddit's caches are refused on {name}: {model.spec.caches_refused}")
    spec, block = watched_spec(model), blocks_of(model)[0]
    attention = next(getattr(block, n) for n in ("attn1", "attn", "attention") if hasattr(block, n))
    signature, watched, received = inspect.signature(block.forward), [], []
    hooks = [block.register_forward_pre_hook(lambda m, a, k: watched.append(modulated_input(
                 StackRun(m, dict(signature.bind(*a, **k).arguments), ()), spec)), with_kwargs=True),
             attention.register_forward_pre_hook(
                 lambda m, a, k: received.append(k.get("hidden_states", a[0] if a else None)), with_kwargs=True)]
    try:
        for size in (None, 2 * model.base_patch_size):
            model(**inputs, patch_size=size)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(watched) == len(received) == 2
    for seen, given in zip(watched, received):
        assert seen.shape == given.shape and len(seen) == B
        torch.testing.assert_close(seen, given)
