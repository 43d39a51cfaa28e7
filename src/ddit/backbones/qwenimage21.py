"""Qwen-Image 2.1: one single-stream sequence of text, condition images and the target image, in that order.

The pipeline passes the VAE latent unpatched (patch 1): the target image's tokens come last in
``hidden_states``, after the condition images', and the joint sequence places them at the slots
``img_mask`` marks, each slot standing for four tokens. A coarse step coarsens the target alone (its
slots shrink with it): text and condition images are the prefix that the pipeline's KV cache keeps
from the first step, which attention makes independent of the target (it is block-causal). RoPE
centres the target's rows and columns (row r of h at r - ceil(h / 2)); a coarse patch sits at the mean
of the fine positions it covers.
"""

from __future__ import annotations

import math

import torch
from diffusers.models.transformers import transformer_qwenimage21 as qwen21

from .base import BackboneSpec, patchify, unpatchify

SLOT = 4  # tokens per image slot of the joint sequence (qwen21._IMG_TOKENS_PER_SLOT)


class QwenImage21Spec(BackboneSpec):
    model_class = "QwenImage21Transformer2DModel"
    lora_target = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.(proj|gate_layer|out))"
    batched_cfg = False  # true CFG calls once per branch
    per_sample_lists = ("img_shapes",)
    teacache_blocks = ("QwenImage21TransformerBlock",)

    @property
    def base_patch_size(self):
        return self.model.config.patch_size

    def base_layers(self):
        return self.model.img_in, self.model.proj_out

    def check_sizes(self, dims, sizes):
        rows, cols = dims[-2:]
        base = self.base_patch_size
        unfilled = [s for s in sizes if (rows // s) * (cols // s) % SLOT]
        if unfilled:
            raise ValueError(f"a {rows}x{cols} latent gives a target of {rows // unfilled[0]}x{cols // unfilled[0]} "
                             f"tokens at patch size {unfilled[0]}, which does not fill Qwen-Image 2.1's slots of "
                             f"{SLOT} tokens: use latent sides that are multiples of {2 * max(sizes) // base} (image "
                             "sides in multiples of that times the VAE's 16 pixels), or leave that patch size out")

    def teacache_input(self, block, hidden, arguments):
        """The first norm's output modulated by the block's own ``_modulate`` (the text and condition images as at
        t = 0, the target at its timestep)."""
        modulation = arguments["modulation"].chunk(2, dim=-1)[0]
        return block._modulate(block.img_norm1(hidden), modulation, arguments.get("target_token_mask"))[0]

    def sized(self, arguments, size):
        """Each patch size keeps its own cache of the prefix: the size's LoRA runs on the prefix too, so its keys and
        values differ by size. The first call of a size for rows whose prefix it holds none of fills it
        ("extract": the backbone then returns the whole sequence's outputs, of which the pipeline keeps the
        target's, as ever)."""
        cache = arguments.get("kv_cache")
        if cache is None:
            return {}
        if not isinstance(cache, CacheRows):
            cache = CacheRows(cache, None, len(arguments["hidden_states"]))
        cache, held = cache.at_size(size)
        mode = arguments.get("kv_cache_mode")
        return {"kv_cache": cache, "kv_cache_mode": "extract" if mode == "cached" and not held else mode}

    def cut(self, name, value, idx, rows):
        """The pipeline's KV cache, cut to the rows of a group (``CacheRows``)."""
        if name == "kv_cache" and value is not None:
            return CacheRows(value, idx, rows)
        return super().cut(name, value, idx, rows)

    def latent(self, args):
        shapes = _shapes(args["img_shapes"])
        _, rows, cols = shapes[-1]
        tokens = args["hidden_states"]
        if tokens.shape[1] != sum(math.prod(shape) for shape in shapes):
            raise ValueError(f"{tokens.shape[1]} image tokens, but img_shapes names {shapes}: pass the img_shapes "
                             "of these latents")
        return unpatchify(tokens[:, -rows * cols:], self.patch(self.base_patch_size), (rows, cols))

    def generated(self, output, args):
        """The target image's outputs: the last tokens (the pipeline drops the text's and condition images')."""
        _, rows, cols = _shapes(args["img_shapes"])[-1]
        return output[:, -rows * cols:]

    def pack(self, output, args):
        """Target tokens (B, tokens, C), after zeros where the backbone returns the prefix's outputs (all but in
        the KV cache's "cached" mode), which the pipeline drops."""
        tokens = patchify(output, self.patch(self.base_patch_size))
        if args["kv_cache_mode"] == "cached":
            return tokens
        prefix = _joint_length(args["img_mask"]) - _target_tokens(args)
        return torch.cat([tokens.new_zeros(len(tokens), prefix, tokens.shape[2]), tokens], 1)

    def forward(self, tokens, grid, scale, args):
        m, n, mode, cache = self.model, tokens.shape[1], args["kv_cache_mode"], args["kv_cache"]
        if n % SLOT:
            raise ValueError(f"a coarse Qwen-Image 2.1 target of {grid[0]}x{grid[1]} tokens does not fill its slots "
                             f"of {SLOT} tokens: use a resolution whose latent sides are multiples of {2 * scale}")
        shapes, fine = _shapes(args["img_shapes"]), _target_tokens(args)
        shapes[-1] = (1, *grid)
        img_mask = args["img_mask"][:, :args["img_mask"].shape[1] - (fine - n) // SLOT]  # fewer target slots
        condition = args["hidden_states"][:, :-fine]
        hidden = torch.cat([m.img_in(condition), tokens], 1)
        text = m.txt_in(args["encoder_hidden_states"])
        b = len(tokens)
        repeats = torch.where(img_mask, SLOT, 1)[0]
        image = torch.repeat_interleave(img_mask[0], repeats)
        joint = torch.cat([text, text.new_zeros(b, n // SLOT, text.shape[2])], 1).repeat_interleave(repeats, 1)
        joint[:, image] = hidden
        rope = m.pos_embed(shapes, image, device=tokens.device)
        rope[-n:] = self._target_rope(rope[-n], grid, scale)
        image_ids, target = m.build_token_metadata(image, shapes)
        timestep = args["timestep"].to(hidden.dtype)
        modulation_mask = None
        if m.config.causal_condition:  # text and condition images modulated as at t = 0
            timestep, modulation_mask = torch.cat([timestep, timestep.new_zeros(1)]), target
        temb = m.time_text_embed(timestep, hidden)
        modulation = m.modulation(temb)
        valid = _key_valid(args["encoder_hidden_states_mask"], img_mask, image, b)
        prefix = int((~target).sum())
        attend = dict(cache_write_slice=None, segments=None, key_valid=None)
        if mode == "cached":  # the prefix's keys and values come from the cache: only the target runs
            joint, rope, modulation_mask = joint[:, prefix:], rope[prefix:], _after(modulation_mask, prefix)
            mask = None if valid is None else valid[:, None, None, :]
        else:
            processors = [block.attn.processor for block in m.transformer_blocks]
            flex = [isinstance(p, qwen21.QwenImage21FlexAttnProcessor) for p in processors]
            mask = qwen21.build_qwenimage21_block_causal_mask(image_ids, valid, b, tokens.device) if any(flex) else None
            attend = dict(cache_write_slice=slice(0, prefix) if mode == "extract" else None, key_valid=valid,
                          segments=None if all(flex) else qwen21._qwenimage21_prefix_segments(image_ids, prefix))
        for i, block in enumerate(m.transformer_blocks):
            joint = self.block(block, hidden_states=joint, modulation=modulation, rotary_emb=rope, attention_mask=mask,
                               target_token_mask=modulation_mask, kv_cache_mode=mode,
                               layer_cache=cache.get_layer(i) if cache is not None else None, **attend)
        return m.norm_out(joint, temb, modulation_mask)[:, -n:]

    def _target_rope(self, first, grid, scale):
        """Complex RoPE (tokens, head_dim / 2) of the coarse target: its frame position as the backbone gives it
        (``first``, its first token's), rows and columns at the centres of the fine positions a patch covers."""
        rope, (rows, cols) = self.model.pos_embed, grid
        dims = rope.axes_dim
        axes = []
        for count, dim in zip(grid, dims[1:]):
            fine = count * scale
            centres = (torch.arange(fine, dtype=torch.float32) - (fine - fine // 2)).reshape(count, scale).mean(1)
            axes.append(rope.rope_params(centres, dim, rope.theta).to(first.device))
        frame = first[:dims[0] // 2]
        return torch.cat([frame.expand(rows, cols, -1), axes[0][:, None].expand(rows, cols, -1),
                          axes[1][None].expand(rows, cols, -1)], -1).reshape(rows * cols, -1)


class CacheRows:
    """Rows ``idx`` (None: all) of a pipeline's ``QwenImage21KVCache`` of ``rows`` rows: a group of samples that
    runs apart from the others, at another patch size, stores and reads its own rows."""

    def __init__(self, cache, idx: torch.Tensor | None, rows: int):
        self.cache, self.idx, self.rows = cache, idx, rows

    def get_layer(self, index: int) -> "_LayerRows":
        return _LayerRows(self.cache.get_layer(index), self.idx, self.rows)

    def at_size(self, size: int) -> tuple["CacheRows", bool]:
        """These rows of the cache that patch ``size`` keeps beside the pipeline's (made at its first use), and
        whether they hold the prefix already; they are taken as held from now on (the call about to run fills
        them if not)."""
        sizes = vars(self.cache).setdefault("ddit_sizes", {})
        if size not in sizes:
            layers = len(self.cache.layer_caches)
            sizes[size] = qwen21.QwenImage21KVCache(layers), torch.zeros(self.rows, dtype=torch.bool)
        cache, held = sizes[size]
        rows = slice(None) if self.idx is None else self.idx
        filled = bool(held[rows].all())
        held[rows] = True
        return CacheRows(cache, self.idx, self.rows), filled


class _LayerRows:
    def __init__(self, layer, idx: torch.Tensor | None, rows: int):
        self.layer, self.idx, self.rows = layer, idx, rows

    def store(self, k: torch.Tensor, v: torch.Tensor) -> None:
        layer = self.layer
        if self.idx is None:
            layer.store(k, v)
            return
        if layer.k is None or layer.k.shape != (self.rows, *k.shape[1:]):
            layer.k, layer.v = k.new_zeros(self.rows, *k.shape[1:]), v.new_zeros(self.rows, *v.shape[1:])
        idx = self.idx.to(k.device)
        layer.k[idx], layer.v[idx] = k, v

    def get(self) -> tuple[torch.Tensor, torch.Tensor]:
        k, v = self.layer.get()
        return (k, v) if self.idx is None else (k[self.idx.to(k.device)], v[self.idx.to(v.device)])


def _after(mask: torch.Tensor | None, start: int) -> torch.Tensor | None:
    return None if mask is None else mask[start:]


def _shapes(img_shapes) -> list[tuple[int, int, int]]:
    """(frame, rows, columns) of each image of the first sample (the backbone reads that one): condition images
    first, the target last."""
    shapes = [tuple(int(n) for n in shape) for shape in img_shapes[0]]
    if any(frames != 1 for frames, _, _ in shapes):
        raise ValueError(f"img_shapes {shapes} has an image of several frames, which ddit cannot coarsen")
    return shapes


def _target_tokens(args) -> int:
    return math.prod(_shapes(args["img_shapes"])[-1])


def _joint_length(img_mask: torch.Tensor) -> int:
    return int(torch.where(img_mask[0], SLOT, 1).sum())


def _key_valid(text_mask, img_mask, image, batch) -> torch.Tensor | None:
    """Which keys of the joint sequence may be attended to: not the text's right padding (as the backbone
    computes it)."""
    if text_mask is None:
        return None
    valid = torch.ones(batch, image.shape[0], dtype=torch.bool, device=image.device)
    valid[:, (~image).nonzero(as_tuple=True)[0]] = text_mask.bool()[:, ~img_mask[0][:text_mask.shape[1]]]
    return valid
