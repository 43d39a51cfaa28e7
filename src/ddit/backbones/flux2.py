"""FLUX.2: Flux's packed tokens and id-based RoPE, with 4-axis ids (t, h, w, l), modulations computed once
per call for all blocks, and single-stream blocks on the joined text and image tokens.

The latent, packing and coarse ids (patch centres in fine units) are Flux's (``FluxSpec``).
Reference images passed as tokens beside the latent's run as Kontext's do (``FluxSpec``);
their cached keys and values (``kv_cache``) belong to the fine grid: refused at coarse sizes.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

from .flux import FluxSpec, with_references


class Flux2Spec(FluxSpec):
    model_class = "Flux2Transformer2DModel"
    unsupported = ("kv_cache", "kv_cache_mode")
    # image-stream attention and feed-forward of the double blocks; the single blocks' fused projections
    lora_target = (r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.(linear_in|linear_out))"
                   r"|single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)")
    teacache_blocks = ("Flux2TransformerBlock",)

    def teacache_input(self, block, hidden, arguments):
        """The image stream's norm1 output, shifted and scaled by the model's shared modulation of double blocks."""
        (shift, scale, _), _ = Flux2Modulation.split(arguments["temb_mod_img"], 2)
        return (1 + scale) * block.norm1(hidden) + shift

    def forward(self, tokens, grid, scale, args, references=()):
        m, dtype, n = self.model, tokens.dtype, tokens.shape[1]
        ids = self.positions(args, grid, scale, references)  # floats: a coarse patch's centre falls between ids
        text_ids = args["txt_ids"][0] if args["txt_ids"].ndim == 3 else args["txt_ids"]
        rope = tuple(torch.cat(parts) for parts in zip(m.pos_embed(text_ids), m.pos_embed(ids)))
        guidance = args["guidance"]
        temb = m.time_guidance_embed(args["timestep"].to(dtype) * 1000,
                                     None if guidance is None else guidance.to(dtype) * 1000)
        mod_img, mod_txt = m.double_stream_modulation_img(temb), m.double_stream_modulation_txt(temb)
        mod_single = m.single_stream_modulation(temb)
        context = m.context_embedder(args["encoder_hidden_states"])
        kwargs = args["joint_attention_kwargs"]
        tokens = with_references(tokens, references)
        for block in m.transformer_blocks:
            context, tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context,
                                         temb_mod_img=mod_img, temb_mod_txt=mod_txt, image_rotary_emb=rope,
                                         joint_attention_kwargs=kwargs)
        joined = torch.cat([context, tokens], dim=1)
        for block in m.single_transformer_blocks:
            joined = self.block(block, hidden_states=joined, encoder_hidden_states=None, temb_mod=mod_single,
                                image_rotary_emb=rope, joint_attention_kwargs=kwargs)
        return m.norm_out(joined[:, context.shape[1]:context.shape[1] + n], temb)
