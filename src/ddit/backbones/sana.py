"""Sana: a patch-1 embedding (on a 32x deep-compression latent), linear self-attention, and a convolutional
feed-forward that folds the tokens back into their (height, width) grid: the blocks are given the coarse grid.

Positions: none by default (the convolution places the tokens), or the backbone's sincos table at stride k
when the model has an ``interpolation_scale``. A ControlNet's residuals (SanaControlNetPipeline) are averaged over
the fine tokens a coarse token covers.
"""

from __future__ import annotations

from .base import BackboneSpec, sincos_positions


class SanaSpec(BackboneSpec):
    model_class = "SanaTransformer2DModel"
    # self- and cross-attention, and the 1x1 convolutions in and out of the convolutional feed-forward
    lora_target = r"transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.(conv_inverted|conv_point))"
    unsupported = ("attention_mask",)  # an image-token input, of the fine grid
    residuals = ("controlnet_block_samples",)
    teacache_blocks = ("SanaTransformerBlock",)

    def teacache_input(self, block, hidden, arguments):
        """adaLN-single, as PixArt's."""
        modulation = block.scale_shift_table[None] + arguments["timestep"].reshape(len(hidden), 6, -1)
        shift, scale = modulation.chunk(6, dim=1)[:2]
        return (block.norm1(hidden) * (1 + scale) + shift).to(hidden.dtype)

    def base_layers(self):
        return self.model.patch_embed.proj, self.model.proj_out

    def forward(self, tokens, grid, scale, args):
        m, batch = self.model, tokens.shape[0]
        x = tokens
        if m.patch_embed.pos_embed is not None:
            x = x + sincos_positions(m.patch_embed, grid, scale).to(x)
        mask = args["encoder_attention_mask"]
        if mask is not None and mask.ndim == 2:  # keep/discard -> additive bias, as the backbone does
            mask = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        if args["guidance"] is None:
            t, embedded_t = m.time_embed(args["timestep"], batch_size=batch, hidden_dtype=x.dtype)
        else:
            t, embedded_t = m.time_embed(args["timestep"], guidance=args["guidance"], hidden_dtype=x.dtype)
        context = m.caption_norm(m.caption_projection(args["encoder_hidden_states"]).view(batch, -1, x.shape[-1]))
        control = args["controlnet_block_samples"]
        for i, block in enumerate(m.transformer_blocks):
            x = self.block(block, x, None, context, mask, t, *grid)
            # a ControlNet's residual, where the stock forward adds it: after the second block onwards
            if control is not None and 0 < i <= len(control):
                x = x + control[i - 1]
        return m.norm_out(x, embedded_t, m.scale_shift_table)
