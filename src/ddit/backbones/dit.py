"""DiT (facebook/DiT-XL-2, the testbed): class-conditional, adaLN, sincos positions."""

from __future__ import annotations

import torch.nn.functional as F

from .base import BackboneSpec, sincos_positions


class DiTSpec(BackboneSpec):
    model_class = "DiTTransformer2DModel"
    square_only = True  # its forward unpatchifies with height = width = sqrt(tokens)

    def base_layers(self):
        return self.model.pos_embed.proj, self.model.proj_out_2

    def forward(self, tokens, grid, scale, args):
        m, t, y = self.model, args["timestep"], args["class_labels"]
        x = tokens + sincos_positions(m.pos_embed, grid, scale).to(tokens)
        for block in m.transformer_blocks:
            x = self.block(block, x, timestep=t, class_labels=y, cross_attention_kwargs=args["cross_attention_kwargs"])
        # the output head is conditioned by the first block's embedder, as in the backbone's forward
        condition = m.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=x.dtype)
        shift, gain = m.proj_out_1(F.silu(condition)).chunk(2, dim=1)
        return m.norm_out(x) * (1 + gain[:, None]) + shift[:, None]
