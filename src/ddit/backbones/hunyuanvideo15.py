"""HunyuanVideo 1.5: a Conv3d patch (1, 1, 1) on a 16x video latent, dual-stream blocks, RoPE over
(frame, row, column).

Frames keep their positions; a coarse patch sits at the centre of the fine positions it covers
(fractional), as in Wan. The text side is the backbone's own: its Qwen2.5-VL tokens through the
token refiner, ByT5 tokens, and the image-prompt tokens (all masked out in text-to-video),
reordered so that valid tokens come first; none of it depends on the patch size.
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import get_1d_rotary_pos_embed

from .base import BackboneSpec


class HunyuanVideo15Spec(BackboneSpec):
    model_class = "HunyuanVideo15Transformer3DModel"
    unembed_channels_last = False  # the output projection's features are (C, t, p, p)
    single_stream = False
    block_outputs = {"HunyuanVideo15TransformerBlock": ("hidden_states", "encoder_hidden_states")}

    def patch(self, size):
        return (self.model.config.patch_size_t, size, size)

    def base_layers(self):
        return self.model.x_embedder.proj, self.model.proj_out

    def forward(self, tokens, grid, scale, args):
        m = self.model
        temb = m.time_embed(args["timestep"], timestep_r=args["timestep_r"])
        context, mask = self._context(args)
        rope = self.rope(grid, scale, tokens.device)
        for block in m.transformer_blocks:
            tokens, context = self.block(block, tokens, context, temb, mask, rope)
        return m.norm_out(tokens, temb)

    def _context(self, args):
        """The backbone's context tokens and mask: [valid image, valid ByT5, valid Qwen, invalid ...]."""
        m, x = self.model, args["hidden_states"]
        text = m.context_embedder(args["encoder_hidden_states"], args["timestep"], args["encoder_attention_mask"])
        text = text + m.cond_type_embed(torch.zeros_like(text[:, :, 0], dtype=torch.long))
        text_2 = m.context_embedder_2(args["encoder_hidden_states_2"])
        text_2 = text_2 + m.cond_type_embed(torch.ones_like(text_2[:, :, 0], dtype=torch.long))
        image = m.image_embedder(args["image_embeds"])
        text_to_video = bool(torch.all(args["image_embeds"] == 0))
        if text_to_video:
            image = image * 0.0
        image_mask = torch.full(image.shape[:2], not text_to_video, dtype=torch.bool, device=x.device)
        image = image + m.cond_type_embed(2 * torch.ones_like(image[:, :, 0], dtype=torch.long))
        mask, mask_2 = args["encoder_attention_mask"].bool(), args["encoder_attention_mask_2"].bool()
        rows, masks = [], []
        for t, tm, t2, tm2, im, imm in zip(text, mask, text_2, mask_2, image, image_mask):
            rows.append(torch.cat([im[imm], t2[tm2], t[tm], im[~imm], torch.zeros_like(t2[~tm2]),
                                   torch.zeros_like(t[~tm])]))
            masks.append(torch.cat([imm[imm], tm2[tm2], tm[tm], imm[~imm], tm2[~tm2], tm[~tm]]))
        return torch.stack(rows), torch.stack(masks)

    def rope(self, grid, scale, device):
        """RoPE (cos, sin), each (tokens, head_dim), of a coarse (frames, rows, cols) grid: frames at their own
        positions, rows and columns at the centres of the fine positions a patch covers."""
        table = self.model.rope
        f, h, w = grid
        axes = (torch.arange(f, dtype=torch.float32, device=device),
                *(torch.arange(n, dtype=torch.float32, device=device) * scale + (scale - 1) / 2 for n in (h, w)))
        coords = torch.meshgrid(*axes, indexing="ij")
        freqs = [get_1d_rotary_pos_embed(dim, c.reshape(-1), table.theta, use_real=True)
                 for dim, c in zip(table.rope_dim, coords)]
        return torch.cat([f[0] for f in freqs], dim=1), torch.cat([f[1] for f in freqs], dim=1)
