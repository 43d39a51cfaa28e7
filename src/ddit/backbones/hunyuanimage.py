"""HunyuanImage 2.1 (and its refiner): a Conv patch on a 32x image latent (the refiner's on a 5-D latent of one
frame), dual- then single-stream blocks, RoPE over (row, column) (the refiner's: (frame, row, column)).

As in HunyuanVideo 1.5: frames keep their positions, a coarse patch sits at the centre of the fine positions
it covers (fractional), and the text side is the backbone's own: its Qwen2.5-VL tokens through the token
refiner and, where the model has them, ByT5 tokens, reordered so that valid tokens come first.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from .base import BackboneSpec


class HunyuanImageSpec(BackboneSpec):
    model_class = "HunyuanImageTransformer2DModel"
    unembed_channels_last = False  # the output projection's features are (C, *patch)
    single_stream = False  # dual- and single-stream blocks return (image, text) tokens

    @property
    def base_patch_size(self):
        return self.model.config.patch_size[-1]

    def patch(self, size):
        return (*self.model.config.patch_size[:-2], size, size)

    def base_layers(self):
        return self.model.x_embedder.proj, self.model.proj_out

    def forward(self, tokens, grid, scale, args):
        m = self.model
        temb = m.time_guidance_embed(args["timestep"], guidance=args["guidance"], timestep_r=args["timestep_r"])
        context, mask = self._context(args)
        mask = torch.nn.functional.pad(mask, (tokens.shape[1], 0), value=True)[:, None, None]
        rope = self.rope(grid, scale, tokens.device)
        for block in (*m.transformer_blocks, *m.single_transformer_blocks):
            tokens, context = self.block(block, tokens, context, temb, attention_mask=mask, image_rotary_emb=rope)
        return m.norm_out(tokens, temb)

    def _context(self, args):
        """The backbone's text tokens and mask: with ByT5, [valid ByT5, valid Qwen, invalid ByT5, invalid Qwen]."""
        m = self.model
        mask = args["encoder_attention_mask"].bool()
        text = m.context_embedder(args["encoder_hidden_states"], args["timestep"], mask)
        if m.context_embedder_2 is None or args["encoder_hidden_states_2"] is None:
            return text, mask
        text_2, mask_2 = m.context_embedder_2(args["encoder_hidden_states_2"]), args["encoder_attention_mask_2"].bool()
        rows = [torch.cat([t2[k2], t[k], t2[~k2], t[~k]]) for t, k, t2, k2 in zip(text, mask, text_2, mask_2)]
        masks = [torch.cat([k2[k2], k[k], k2[~k2], k[~k]]) for k, k2 in zip(mask, mask_2)]
        return torch.stack(rows), torch.stack(masks)

    def rope(self, grid, scale, device):
        """RoPE (cos, sin), each (tokens, head_dim), of a coarse grid: frames at their own positions, rows and
        columns at the centres of the fine positions a patch covers."""
        table = self.model.rope
        *frames, h, w = grid
        axes = (*(torch.arange(f, dtype=torch.float32, device=device) for f in frames),
                *(torch.arange(n, dtype=torch.float32, device=device) * scale + (scale - 1) / 2 for n in (h, w)))
        coords = torch.meshgrid(*axes, indexing="ij")
        freqs = [get_1d_rotary_pos_embed(dim, c.reshape(-1), table.theta, use_real=True)
                 for dim, c in zip(table.rope_dim, coords)]
        return torch.cat([f[0] for f in freqs], dim=1), torch.cat([f[1] for f in freqs], dim=1)
