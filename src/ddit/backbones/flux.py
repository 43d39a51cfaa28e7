"""FLUX.1: the pipeline packs 2x2 latent patches into tokens; positions are RoPE of ``img_ids``.

The adapter is called exactly as the backbone is, with packed tokens and fine
``img_ids``; it unpacks them to the latent, which the adapter then patchifies
at the coarse size, and packs the output back, so a stock FluxPipeline can
call it. Coarse ids are the centres of the coarse patches in fine units.

Kontext appends a reference image's tokens to the latent's, told apart by
their first id (1; FLUX.2's references: 10, 20...): each reference keeps its
own grid and ids, coarsened as far as its size allows (``Reference``), and the
signal and outputs that matter are the generated grid's alone.

A ControlNet's residuals (FluxControlNetPipeline) come on the fine tokens: a coarse step adds
each averaged over the fine tokens a coarse token covers. An IP-Adapter's image prompt is projected as
the backbone projects it; its attention reads it from every image token, coarse or fine.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .base import IP_ADAPTER, BackboneSpec, Reference, controlnet_sample, patchify, unpatchify

PACK = (2, 2)


class FluxSpec(BackboneSpec):
    model_class = "FluxTransformer2DModel"
    unembed_channels_last = False  # packed features are (C, 2, 2)
    residuals = ("controlnet_block_samples", "controlnet_single_block_samples")
    image_prompt = True
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
        (rows, cols), _ = self._layout(args)
        tokens, placed = args["hidden_states"], args["img_ids"].shape[-2]
        if tokens.shape[1] != placed:
            raise ValueError(f"{tokens.shape[1]} image tokens, but img_ids places {placed}: pass the img_ids of these "
                             "latents (and of their reference images)")
        return unpatchify(tokens[:, :rows * cols], PACK, (rows, cols))

    def references(self, args):
        return self._layout(args)[1]

    def _layout(self, args) -> tuple[tuple[int, int], list[Reference]]:
        """The generated grid (rows, columns) and the references that follow it, each a run of tokens with one
        first id; read once per ids tensor (text-to-image pipelines pass the same one at every step), from one
        copy to the CPU."""
        if args["img_ids"] is not self._ids:
            ids = _image_ids(args).cpu()
            first = ids[:, 0]
            starts = [0, *(torch.nonzero(first[1:] != first[:-1]).flatten() + 1).tolist(), len(ids)]
            grids = [_grid(ids[a:b]) for a, b in zip(starts, starts[1:])]
            if grids[0] is None:
                raise ValueError(f"the first {starts[1]} image tokens (first id {first[0].item():g}) do not form one "
                                 "grid in row-major order: pass the img_ids the pipeline made for these latents")
            runs = zip(starts[1:], starts[2:], grids[1:])
            references = [Reference(a, b, g, i) for i, (a, b, g) in enumerate(runs, 1)]
            self._ids, self._layout_of_ids = args["img_ids"], (grids[0], references)
        return self._layout_of_ids

    def positions(self, args, grid, scale, references=()) -> torch.Tensor:
        """The image ids the blocks see: the grid's at ``scale``, then each reference's at its own scale."""
        ids = _image_ids(args).float()
        parts = [_centres(ids[:math.prod(grid) * scale**2], grid, scale)]
        for reference, _, s in references:
            rows, cols = reference.grid or (0, 0)
            parts.append(_centres(ids[reference.start:reference.stop], (rows // s, cols // s), s))
        return torch.cat(parts)

    def pack(self, output, args):
        return patchify(output, PACK)

    def forward(self, tokens, grid, scale, args, references=()):
        m, dtype, n = self.model, tokens.dtype, tokens.shape[1]
        text_ids = args["txt_ids"][0] if args["txt_ids"].ndim == 3 else args["txt_ids"]
        rope = m.pos_embed(torch.cat((text_ids, self.positions(args, grid, scale, references))))
        timestep, guidance = args["timestep"].to(dtype) * 1000, args["guidance"]
        if guidance is None:
            temb = m.time_text_embed(timestep, args["pooled_projections"])
        else:
            temb = m.time_text_embed(timestep, guidance.to(dtype) * 1000, args["pooled_projections"])
        context = m.context_embedder(args["encoder_hidden_states"])
        tokens, kwargs = with_references(tokens, references), with_image_prompt(args["joint_attention_kwargs"], m)
        # a ControlNet's residuals, as the stock forward adds them (XLabs' repeat: the joint blocks' alone)
        for blocks, control, repeat in ((m.transformer_blocks, args["controlnet_block_samples"],
                                         args["controlnet_blocks_repeat"]),
                                        (m.single_transformer_blocks, args["controlnet_single_block_samples"], False)):
            for i, block in enumerate(blocks):
                context, tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context, temb=temb,
                                             image_rotary_emb=rope, joint_attention_kwargs=kwargs)
                if control is not None:
                    tokens = tokens + controlnet_sample(control, i, len(blocks), repeat)
        return m.norm_out(tokens[:, :n], temb)


def with_image_prompt(kwargs: dict | None, model: nn.Module) -> dict | None:
    """Attention kwargs with an IP-Adapter's image prompt replaced by its projection (``ip_hidden_states``), as
    FLUX.1's and Chroma's forwards replace it; in a copy, so that the caller's dict keeps it."""
    if not kwargs or IP_ADAPTER not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    kwargs["ip_hidden_states"] = model.encoder_hid_proj(kwargs.pop(IP_ADAPTER))
    return kwargs


def with_references(tokens: torch.Tensor, references) -> torch.Tensor:
    """The grid's tokens followed by the references', as the pipeline orders them."""
    return torch.cat([tokens, *(t for _, t, _ in references)], 1) if references else tokens


def _centres(ids: torch.Tensor, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """The ids of a ``grid`` of patches ``scale`` fine tokens wide: the mean of the fine ids each covers, its
    centre in fine units."""
    if scale == 1:
        return ids
    return ids.reshape(grid[0], scale, grid[1], scale, -1).mean((1, 3)).flatten(0, 1)


def _grid(ids: torch.Tensor) -> tuple[int, int] | None:
    """(rows, columns) of tokens whose ids (.., row, column, ..) lie on one grid in row-major order, else None."""
    rows = int((ids[:, 2] == ids[0, 2]).sum())  # tokens in the first column
    cols = len(ids) // rows
    if len(ids) % rows:
        return None
    grid = ids[:, 1:3].reshape(rows, cols, 2)
    if not ((grid[..., 1] == grid[0, :, 1]).all() and (grid[..., 0] == grid[:, :1, 0]).all()):
        return None
    return rows, cols


def _image_ids(args: dict) -> torch.Tensor:
    """``img_ids`` as (tokens, 3); a batch dimension (deprecated in diffusers) is dropped."""
    ids = args["img_ids"]
    return ids[0] if ids.ndim == 3 else ids
