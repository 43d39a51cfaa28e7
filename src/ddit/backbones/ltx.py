"""LTX-Video (0.9.x): the pipeline packs the video latent into tokens of patch (1, 1, 1), a Linear embeds
them; RoPE over (frame, row, column) with coordinates the backbone scales itself.

Frames keep their positions; a coarse patch sits at the mean of the fine coordinates it covers,
its centre. Image-to-video and conditioned pipelines give each token its own timestep (the
conditioning frames' tokens run at t = 0): a coarse patch lies within one frame, so its fine
tokens share one timestep, which it takes.
"""

from __future__ import annotations

import torch

from .base import BackboneSpec, patchify, unpatchify


class LTXVideoSpec(BackboneSpec):
    model_class = "LTXVideoTransformer3DModel"
    unembed_channels_last = False  # the pipeline unpacks a token's features as (C, t, p, p)

    def patch(self, size):
        return (self.model.config.patch_size_t, size, size)

    def base_layers(self):
        return self.model.proj_in, self.model.proj_out

    def latent(self, args):
        return unpatchify(args["hidden_states"], self.patch(self.base_patch_size), self._grid(args))

    def timestep(self, args):
        """The step's timestep: the noisiest token's, where tokens have their own (conditioning frames' are 0)."""
        t = args["timestep"]
        return t.amax(dim=1) if t.ndim == 2 else t

    def pack(self, output, args):
        return patchify(output, self.patch(self.base_patch_size))

    def forward(self, tokens, grid, scale, args):
        m, b = self.model, len(tokens)
        rope = m.rope(tokens, video_coords=self._coarse(self._fine_coords(args), grid, scale).movedim(-1, 1))
        mask = args["encoder_attention_mask"]
        if mask is not None and mask.ndim == 2:  # as the backbone turns it into a bias
            mask = ((1 - mask.to(tokens.dtype)) * -10000.0).unsqueeze(1)
        timestep = args["timestep"]
        if timestep.ndim == 2:  # one per token: the coarse token's is its fine tokens' (one frame, one value)
            timestep = self._coarse(timestep.unsqueeze(-1), grid, scale).squeeze(-1)
        temb, embedded = m.time_embed(timestep.flatten(), batch_size=b, hidden_dtype=tokens.dtype)
        temb, embedded = temb.view(b, -1, temb.size(-1)), embedded.view(b, -1, embedded.size(-1))
        context = m.caption_projection(args["encoder_hidden_states"]).view(b, -1, tokens.size(-1))
        for block in m.transformer_blocks:
            tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                image_rotary_emb=rope, encoder_attention_mask=mask)
        shift, gain = (m.scale_shift_table[None, None] + embedded[:, :, None]).unbind(2)
        return m.norm_out(tokens) * (1 + gain) + shift

    def _grid(self, args) -> tuple[int, int, int]:
        """The fine token grid (frames, rows, columns), as the pipeline gives it."""
        return args["num_frames"], args["height"], args["width"]

    def _fine_coords(self, args) -> torch.Tensor:
        """(B, tokens, 3) fine coordinates in the units the RoPE's ``video_coords`` take: the pipeline's own, or
        the grid the backbone would make from ``rope_interpolation_scale``."""
        rope, x = self.model.rope, args["hidden_states"]
        if args["video_coords"] is not None:
            return args["video_coords"].movedim(1, -1).float()
        grid = rope._prepare_video_coords(len(x), *self._grid(args), args["rope_interpolation_scale"], x.device)
        return grid * torch.tensor([rope.base_num_frames, rope.base_height, rope.base_width], device=x.device)

    def _coarse(self, fine: torch.Tensor, grid: tuple[int, int, int], scale: int) -> torch.Tensor:
        """(B, fine tokens, D) -> (B, coarse tokens, D): the mean over each coarse patch's fine tokens."""
        f, h, w = grid
        return fine.reshape(len(fine), f, h, scale, w, scale, -1).mean((3, 5)).flatten(1, 3)
