"""Chroma: FLUX.1's packing, ids and blocks, with every block's modulation read from one approximator
output (no pooled text, no guidance), and an attention mask over the text and image tokens.

The latent, packing and coarse ids (patch centres in fine units) are Flux's (``FluxSpec``). The
pipeline's mask is the prompt's padding mask followed by ones for the image tokens: at a coarse
size its text part is kept and the image part shortened to the coarse tokens (and references').
"""

from __future__ import annotations

import torch

from .flux import FluxSpec, with_image_prompt, with_references


class ChromaSpec(FluxSpec):
    model_class = "ChromaTransformer2DModel"
    unsupported = ("controlnet_block_samples", "controlnet_single_block_samples")  # no Chroma pipeline makes them
    image_prompt = True
    block_outputs = {"ChromaTransformerBlock": ("encoder_hidden_states", "hidden_states"),
                     "ChromaSingleTransformerBlock": ("hidden_states",)}  # on the joined tokens
    teacache_blocks = ("ChromaTransformerBlock",)

    def teacache_input(self, block, hidden, arguments):
        """The adaLN-zero output of the image stream, from the block's six rows of the model's approximator."""
        return block.norm1(hidden, emb=arguments["temb"][:, :6])[0]

    def forward(self, tokens, grid, scale, args, references=()):
        m, dtype, n = self.model, tokens.dtype, tokens.shape[1]
        text_ids = args["txt_ids"][0] if args["txt_ids"].ndim == 3 else args["txt_ids"]
        rope = m.pos_embed(torch.cat((text_ids, self.positions(args, grid, scale, references))))
        tokens = with_references(tokens, references)
        modulations = m.distilled_guidance_layer(m.time_text_embed(args["timestep"].to(dtype) * 1000))
        context = m.context_embedder(args["encoder_hidden_states"])
        text, mask = context.shape[1], args["attention_mask"]
        if mask is not None:
            mask = torch.cat([mask[:, :text], mask.new_ones(len(mask), tokens.shape[1])], dim=1)
        kwargs = dict(image_rotary_emb=rope, attention_mask=mask,
                      joint_attention_kwargs=with_image_prompt(args["joint_attention_kwargs"], m))
        doubles, singles = len(m.transformer_blocks), len(m.single_transformer_blocks)
        for i, block in enumerate(m.transformer_blocks):  # (image, text) modulations of block i, as the backbone
            image_at, text_at = 3 * singles + 6 * i, 3 * singles + 6 * doubles + 6 * i
            temb = torch.cat((modulations[:, image_at:image_at + 6], modulations[:, text_at:text_at + 6]), dim=1)
            context, tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                         **kwargs)
        joined = torch.cat([context, tokens], dim=1)
        for i, block in enumerate(m.single_transformer_blocks):
            joined = self.block(block, hidden_states=joined, temb=modulations[:, 3 * i:3 * i + 3], **kwargs)
        return m.norm_out(joined[:, text:text + n], modulations[:, -2:])
