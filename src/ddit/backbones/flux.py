"""FLUX.1: the pipeline packs 2x2 latent patches into tokens; positions are RoPE of ``img_ids``.

The adapter is called exactly as the backbone is, with packed tokens and fine
``img_ids``; it unpacks them to the latent, which the adapter then patchifies
at the coarse size, and packs the output back, so a stock FluxPipeline can
call it. Coarse ids are the centres of the coarse patches in fine units.
"""

from __future__ import annotations

import torch

from .base import BackboneSpec, patchify, unpatchify

PACK = (2, 2)


class FluxSpec(BackboneSpec):
    model_class = "FluxTransformer2DModel"
    unembed_channels_last = False  # packed features are (C, 2, 2)
    unsupported = ("controlnet_block_samples", "controlnet_single_block_samples")
    unbatched = ("img_ids", "txt_ids")
    single_stream = False  # joint blocks return (text, image) tokens
    batched_cfg = False  # true CFG (and Chroma's) calls once per branch
    _ids = None

    @property
    def base_patch_size(self):
        return PACK[0]  # the pipeline's packing; config.patch_size is 1

    def base_layers(self):
        return self.model.x_embedder, self.model.proj_out

    def latent(self, args):
        ids = _image_ids(args)
        if ids is not self._ids:  # pipelines pass the same ids at every step: count the rows once
            rows = int((ids[:, 2] == ids[0, 2]).sum())  # tokens in the first column
            cols = len(ids) // rows
            if len(ids) % rows or not (ids[:, 2].reshape(rows, cols) == ids[:cols, 2]).all():  # rows alike
                raise ValueError(f"the {len(ids)} image tokens do not form one grid of {rows} rows: reference "
                                 "images of another size than the output (FLUX Kontext, FLUX.2 image=) cannot "
                                 "run under dynamic patches; give them the output's width")
            self._ids, self._rows = ids, rows
        return unpatchify(args["hidden_states"], PACK, (self._rows, len(ids) // self._rows))

    def pack(self, output, args):
        return patchify(output, PACK)

    def forward(self, tokens, grid, scale, args):
        m, dtype = self.model, tokens.dtype
        # the mean of the fine ids a coarse patch covers: its centre, in fine units
        ids = _image_ids(args).reshape(grid[0], scale, grid[1], scale, -1).mean((1, 3)).flatten(0, 1)
        text_ids = args["txt_ids"][0] if args["txt_ids"].ndim == 3 else args["txt_ids"]
        rope = m.pos_embed(torch.cat((text_ids, ids)))
        timestep, guidance = args["timestep"].to(dtype) * 1000, args["guidance"]
        if guidance is None:
            temb = m.time_text_embed(timestep, args["pooled_projections"])
        else:
            temb = m.time_text_embed(timestep, guidance.to(dtype) * 1000, args["pooled_projections"])
        context = m.context_embedder(args["encoder_hidden_states"])
        for block in (*m.transformer_blocks, *m.single_transformer_blocks):
            context, tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                         image_rotary_emb=rope,
                                         joint_attention_kwargs=args["joint_attention_kwargs"])
        return m.norm_out(tokens, temb)


def _image_ids(args: dict) -> torch.Tensor:
    """``img_ids`` as (tokens, 3); a batch dimension (deprecated in diffusers) is dropped."""
    ids = args["img_ids"]
    return ids[0] if ids.ndim == 3 else ids
