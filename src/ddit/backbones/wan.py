"""Wan 2.1 (video): a Conv3d patch (t, 2, 2); the spatial patch grows, frames keep theirs.

Positions are RoPE over (frame, row, column): frames stay at their own
positions, coarse patches sit at their centres in fine units.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_flux import FluxPosEmbed

from .base import BackboneSpec

ROPE_THETA = 10000.0  # WanRotaryPosEmbed's default, which WanTransformer3DModel uses


class WanSpec(BackboneSpec):
    model_class = "WanTransformer3DModel"

    @property
    def base_patch_size(self):
        return self.model.config.patch_size[-1]

    def patch(self, size):
        return (self.model.config.patch_size[0], size, size)

    def base_layers(self):
        return self.model.patch_embedding, self.model.proj_out

    def forward(self, tokens, grid, scale, args):
        m = self.model
        if args["timestep"].ndim != 1:
            raise ValueError("per-token timesteps (Wan 2.2 TI2V) are not supported at coarse patch sizes")
        rope = self.rope(grid, scale)
        temb, timestep_proj, context, image_context = m.condition_embedder(
            args["timestep"], args["encoder_hidden_states"], args["encoder_hidden_states_image"])
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        if image_context is not None:
            context = torch.cat([image_context, context], dim=1)
        for block in m.blocks:
            tokens = self.block(block, tokens, context, timestep_proj, rope)
        shift, gain = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        return (m.norm_out(tokens.float()) * (1 + gain) + shift).type_as(tokens)

    def rope(self, grid, scale):
        """RoPE (cos, sin), each (1, tokens, 1, head_dim), of a coarse (frames, rows, cols) grid."""
        table = self.model.rope
        f, h, w = grid
        coords = torch.stack(torch.meshgrid(torch.arange(f, dtype=torch.float32), _centres(h, scale),
                                            _centres(w, scale), indexing="ij"), -1)
        embed = FluxPosEmbed(ROPE_THETA, [table.t_dim, table.h_dim, table.w_dim])
        return tuple(part[None, :, None].to(table.freqs_cos) for part in embed(coords.reshape(-1, 3)))


def _centres(n: int, scale: int) -> torch.Tensor:
    """Centres of ``n`` coarse patches along an axis, in fine patch units."""
    return torch.arange(n) * scale + (scale - 1) / 2
