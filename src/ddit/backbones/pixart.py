"""PixArt-alpha/sigma: text cross-attention, one shared adaLN, sincos positions."""

from __future__ import annotations

from .base import BackboneSpec, sincos_positions


class PixArtSpec(BackboneSpec):
    model_class = "PixArtTransformer2DModel"
    unsupported = ("attention_mask",)  # a mask over the fine image tokens
    teacache_blocks = ("BasicTransformerBlock",)

    def teacache_input(self, block, hidden, arguments):
        """adaLN-single: norm1's output shifted and scaled by the block's share of the timestep modulation."""
        modulation = block.scale_shift_table[None] + arguments["timestep"].reshape(len(hidden), 6, -1)
        shift, scale = modulation.chunk(6, dim=1)[:2]
        return block.norm1(hidden) * (1 + scale) + shift

    def base_layers(self):
        return self.model.pos_embed.proj, self.model.proj_out

    def forward(self, tokens, grid, scale, args):
        m, batch = self.model, tokens.shape[0]
        x = tokens + sincos_positions(m.pos_embed, grid, scale).to(tokens)
        mask = args["encoder_attention_mask"]
        if mask is not None and mask.ndim == 2:  # keep/discard -> additive bias, as the backbone does
            mask = ((1 - mask.to(x.dtype)) * -10000.0).unsqueeze(1)
        t, embedded_t = m.adaln_single(args["timestep"], args["added_cond_kwargs"], batch_size=batch,
                                       hidden_dtype=x.dtype)
        context = args["encoder_hidden_states"]
        if m.caption_projection is not None:
            context = m.caption_projection(context).view(batch, -1, x.shape[-1])
        for block in m.transformer_blocks:
            x = self.block(block, x, encoder_hidden_states=context, encoder_attention_mask=mask, timestep=t,
                           cross_attention_kwargs=args["cross_attention_kwargs"])
        shift, gain = (m.scale_shift_table[None] + embedded_t[:, None]).chunk(2, dim=1)
        return m.norm_out(x) * (1 + gain) + shift
