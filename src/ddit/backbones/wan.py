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
    row_blocks = ("encoder_hidden_states_image",)  # first-and-last-frame video: two images per sample
    teacache_blocks = ("WanTransformerBlock",)

    def __init__(self, model):
        super().__init__(model)
        self._ropes = {}

    @property
    def base_patch_size(self):
        return self.model.config.patch_size[-1]

    def patch(self, size):
        return (self.model.config.patch_size[0], size, size)

    def base_layers(self):
        return self.model.patch_embedding, self.model.proj_out

    def teacache_input(self, block, hidden, arguments):
        """The timestep projection the blocks take (``temb``), which TeaCache's Wan code watches."""
        return arguments["temb"]

    def timestep(self, args):
        """The step's timestep: the noisiest token's, where tokens have their own (Wan 2.2 TI2V: its first frame
        at 0 in image-to-video)."""
        t = args["timestep"]
        return t.amax(1) if t.ndim > 1 else t

    def forward(self, tokens, grid, scale, args):
        m = self.model
        rope = self.rope(grid, scale)
        t, per_token = args["timestep"], args["timestep"].ndim == 2
        if per_token:  # Wan 2.2 TI2V: a coarse patch lies within one frame, whose tokens share one timestep
            if t.shape[1] != grid[0] * grid[1] * grid[2] * scale * scale:
                raise ValueError(f"a timestep of {t.shape[1]} values per sample is neither one per sample nor one "
                                 "per token")
            f, h, w = grid
            t = t.reshape(len(t), f, h, scale, w, scale).float().mean((3, 5)).flatten(1).to(t.dtype)
        temb, timestep_proj, context, image_context = m.condition_embedder(
            t.flatten(), args["encoder_hidden_states"], args["encoder_hidden_states_image"],
            timestep_seq_len=t.shape[1] if per_token else None)
        timestep_proj = timestep_proj.unflatten(2 if per_token else 1, (6, -1))
        if image_context is not None:
            context = torch.cat([image_context, context], dim=1)
        for block in m.blocks:
            tokens = self.block(block, tokens, context, timestep_proj, rope)
        if per_token:  # (B, tokens, D): a shift and a gain per token
            shift, gain = (m.scale_shift_table.unsqueeze(0) + temb.unsqueeze(2)).chunk(2, dim=2)
            shift, gain = shift.squeeze(2), gain.squeeze(2)
        else:
            shift, gain = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        return (m.norm_out(tokens.float()) * (1 + gain) + shift).type_as(tokens)

    def rope(self, grid, scale):
        """RoPE (cos, sin), each (1, tokens, 1, head_dim), of a coarse (frames, rows, cols) grid: computed once
        per grid and kept on the model's device (a 75k-token grid takes 0.15 s on a CPU)."""
        table = self.model.rope
        key = (*grid, scale, table.freqs_cos.device, table.freqs_cos.dtype)
        if key not in self._ropes:
            if len(self._ropes) == 8:  # a few resolutions at a few sizes
                del self._ropes[next(iter(self._ropes))]
            f, h, w = grid
            coords = torch.stack(torch.meshgrid(torch.arange(f, dtype=torch.float32), _centres(h, scale),
                                                _centres(w, scale), indexing="ij"), -1)
            embed = FluxPosEmbed(ROPE_THETA, [table.t_dim, table.h_dim, table.w_dim])
            with torch.inference_mode(False):  # kept across calls: usable in training too
                self._ropes[key] = tuple(part[None, :, None].to(table.freqs_cos)
                                         for part in embed(coords.reshape(-1, 3)))
        return self._ropes[key]


def _centres(n: int, scale: int) -> torch.Tensor:
    """Centres of ``n`` coarse patches along an axis, in fine patch units."""
    return torch.arange(n) * scale + (scale - 1) / 2
