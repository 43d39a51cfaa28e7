"""LTX-Video (0.9.x): the pipeline packs the video latent into tokens of patch (1, 1, 1), a Linear embeds
them; RoPE over (frame, row, column) with coordinates the backbone scales itself.

Frames keep their positions; a coarse patch sits at the mean of the fine coordinates it covers,
its centre. Image-to-video gives each token its own timestep (the conditioning frame's tokens run
at t = 0): a coarse patch lies within one frame, so its fine tokens share one timestep, which it
takes. ``LTXConditionPipeline`` and the long multi-prompt pipeline pass their own ``video_coords``
for token sequences that are not one grid (extra conditioning tokens, windows): refused.
"""

from __future__ import annotations

import torch

from .base import BackboneSpec, patchify, unpatchify


class LTXVideoSpec(BackboneSpec):
    model_class = "LTXVideoTransformer3DModel"
    unembed_channels_last = False  # the pipeline unpacks a token's features as (C, t, p, p)
    unsupported = ("video_coords",)
    unbatched = ("rope_interpolation_scale",)  # three scales, not one per row, even as a tensor
    teacache_blocks = ("LTXVideoTransformerBlock",)

    def __init__(self, model):
        super().__init__(model)
        if (model.config.patch_size, model.config.patch_size_t) != (1, 1):
            raise TypeError("ddit's LTX-Video spec takes patch 1 in space and time, as LTX-Video 0.9's "
                            f"configs and its RoPE do, not {model.config.patch_size}x{model.config.patch_size_t}")

    def patch(self, size):
        return (1, size, size)

    def base_layers(self):
        return self.model.proj_in, self.model.proj_out

    def teacache_input(self, block, hidden, arguments):
        """norm1's output shifted and scaled by the block's share of the (per-token) timestep modulation."""
        temb = arguments["temb"]
        ada = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(
            len(hidden), temb.size(1), len(block.scale_shift_table), -1)
        shift, scale = ada.unbind(dim=2)[:2]
        return block.norm1(hidden) * (1 + scale) + shift

    def latent(self, args):
        return unpatchify(args["hidden_states"], (1, 1, 1), self._grid(args))

    def timestep(self, args):
        """The step's timestep: the noisiest token's, where tokens have their own (the conditioning frame's 0)."""
        t = args["timestep"]
        return t.reshape(len(t), -1).amax(1) if t.ndim > 1 else t

    def pack(self, output, args):
        return patchify(output, (1, 1, 1))

    def forward(self, tokens, grid, scale, args):
        m, b = self.model, len(tokens)
        x = args["hidden_states"]
        fine = m.rope._prepare_video_coords(len(x), *self._grid(args), args["rope_interpolation_scale"], x.device)
        base = torch.tensor([m.rope.base_num_frames, m.rope.base_height, m.rope.base_width], device=x.device)
        rope = m.rope(tokens, video_coords=(self._coarse(fine, grid, scale) * base).movedim(-1, 1))
        mask = args["encoder_attention_mask"]
        if mask is not None and mask.ndim == 2:  # as the backbone turns it into a bias
            mask = ((1 - mask.to(tokens.dtype)) * -10000.0).unsqueeze(1)
        temb, embedded = m.time_embed(self._coarse_timestep(args, grid, scale), batch_size=b,
                                      hidden_dtype=tokens.dtype)
        temb, embedded = temb.view(b, -1, temb.size(-1)), embedded.view(b, -1, embedded.size(-1))
        context = m.caption_projection(args["encoder_hidden_states"]).view(b, -1, tokens.size(-1))
        for block in m.transformer_blocks:
            tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                image_rotary_emb=rope, encoder_attention_mask=mask)
        shift, gain = (m.scale_shift_table[None, None] + embedded[:, :, None]).unbind(2)
        return m.norm_out(tokens) * (1 + gain) + shift

    def _grid(self, args) -> tuple[int, int, int]:
        """The fine token grid (frames, rows, columns) the pipeline gives, checked against its tokens."""
        grid = args["num_frames"], args["height"], args["width"]
        tokens = args["hidden_states"].shape[1]
        if None in grid or grid[0] * grid[1] * grid[2] != tokens:
            raise ValueError(f"the {tokens} tokens are not the {grid} grid the call names (LTXConditionPipeline's "
                             "conditioning tokens, or a windowed pipeline): LTX-Video runs dynamic patches in "
                             "LTXPipeline and LTXImageToVideoPipeline")
        return grid

    def _coarse_timestep(self, args, grid, scale) -> torch.Tensor:
        """The timestep the backbone's embedding takes, flat: one per sample, or one per coarse token."""
        t = args["timestep"]
        t = t.reshape(len(t), -1) if t.ndim > 1 else t[:, None]
        if t.shape[1] == 1:
            return t.flatten()
        if t.shape[1] != grid[0] * grid[1] * grid[2] * scale * scale:
            raise ValueError(f"a timestep of {t.shape[1]} values per sample is neither one per sample nor one per "
                             "token")
        return self._coarse(t[..., None], grid, scale).flatten()

    def _coarse(self, fine: torch.Tensor, grid: tuple[int, int, int], scale: int) -> torch.Tensor:
        """(B, fine tokens, D) -> (B, coarse tokens, D): the mean over each coarse patch's fine tokens."""
        f, h, w = grid
        return fine.reshape(len(fine), f, h, scale, w, scale, -1).mean((3, 5)).flatten(1, 3)
