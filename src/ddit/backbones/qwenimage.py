"""Qwen-Image: Flux's packing (2x2 latent patches as tokens), dual-stream blocks, RoPE over centred positions.

The pipeline passes the grid as ``img_shapes`` (frame, rows, columns) rather than as ids. Its RoPE
centres the rows and columns (row r of h sits at r - ceil(h / 2)); a coarse patch sits at the mean of
the fine positions it covers, so its frequencies are computed for that fractional position. Text
positions follow the fine grid's, as the backbone places them. Edit pipelines' reference images (a
second shape per sample onwards, each at the next frame position) keep their own grids and positions,
coarsened as far as their sizes allow (``Reference``); Qwen-Image-Edit-2511's ``zero_cond_t`` gives their
tokens the modulation of t = 0, at every size. The layered model's 3D RoPE is refused. A ControlNet's
residuals (QwenImageControlNetPipeline) are averaged over the fine tokens a coarse token covers.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

from .base import BackboneSpec, Reference, controlnet_sample, unpatchify
from .flux import PACK, FluxSpec, with_references


class QwenImageSpec(BackboneSpec):
    model_class = "QwenImageTransformer2DModel"
    # image-stream attention and feed-forward of every block
    lora_target = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.net\.(0\.proj|2))"
    unembed_channels_last = False  # packed features are (C, 2, 2)
    unsupported = ("guidance",)  # the stock forward cannot take it either
    residuals = ("controlnet_block_samples",)
    single_stream = False
    batched_cfg = False  # true CFG calls once per branch
    per_sample_lists = ("img_shapes",)  # one entry per sample (Edit-2511's stock forward counts them)
    teacache_blocks = ("QwenImageTransformerBlock",)
    pack = FluxSpec.pack

    def __init__(self, model):
        super().__init__(model)
        if model.config.get("use_layer3d_rope"):
            raise TypeError("Qwen-Image-Layered's 3D RoPE places layers, not patches: ddit cannot coarsen it; "
                            "use a Qwen-Image model with use_layer3d_rope=False")
        self._ropes = {}

    @property
    def base_patch_size(self):
        return PACK[0]  # the pipeline's packing, which config.patch_size also names

    def base_layers(self):
        return self.model.img_in, self.model.proj_out

    def teacache_input(self, block, hidden, arguments):
        """The image stream's modulated norm1 output, by the block's own ``_modulate`` (Edit-2511 modulates the
        reference's tokens apart: ``modulate_index``)."""
        modulation = block.img_mod(arguments["temb"]).chunk(2, dim=-1)[0]
        return block._modulate(block.img_norm1(hidden), modulation, arguments.get("modulate_index"))[0]

    def latent(self, args):
        shapes = _shapes(args["img_shapes"])
        tokens = args["hidden_states"]
        if tokens.shape[1] != sum(rows * cols for _, rows, cols in shapes):
            raise ValueError(f"{tokens.shape[1]} image tokens, but img_shapes names {shapes}: pass the img_shapes "
                             "of these latents")
        _, rows, cols = shapes[0]
        return unpatchify(tokens[:, :rows * cols], PACK, (rows, cols))

    def references(self, args):
        shapes = _shapes(args["img_shapes"])
        starts = [0]
        for _, rows, cols in shapes:
            starts.append(starts[-1] + rows * cols)
        return [Reference(starts[i], starts[i + 1], shapes[i][1:], i) for i in range(1, len(shapes))]

    def forward(self, tokens, grid, scale, args, references=()):
        m, dtype, n = self.model, tokens.dtype, tokens.shape[1]
        context = m.txt_in(m.txt_norm(args["encoder_hidden_states"]))
        text_len, _, mask = compute_text_seq_len_from_mask(context, args["encoder_hidden_states_mask"])
        timestep, zero_cond_t, modulated = args["timestep"].to(dtype), getattr(m, "zero_cond_t", False), {}
        if zero_cond_t:  # Qwen-Image-Edit-2511: the references' tokens are modulated as at t = 0
            timestep = torch.cat([timestep, timestep * 0])
            beside = sum(t.shape[1] for _, t, _ in references)
            index = torch.cat([tokens.new_zeros(n, dtype=torch.int), tokens.new_ones(beside, dtype=torch.int)])
            modulated = {"modulate_index": index.expand(len(tokens), -1)}
        temb = m.time_text_embed(timestep, tokens, args["additional_t_cond"])
        _, text_rope = m.pos_embed(args["img_shapes"], max_txt_seq_len=text_len, device=tokens.device)
        if text_rope.is_inference() and not torch.is_inference_mode_enabled():
            text_rope = text_rope.clone()  # diffusers caches it; made in an inference run, backward cannot save it
        image_rope = torch.cat([self._coarse_rope(grid, scale, tokens.device), *(
            self._coarse_rope((r.grid[0] // s, r.grid[1] // s), s, tokens.device, r.index) for r, _, s in references)])
        tokens, control = with_references(tokens, references), args["controlnet_block_samples"]
        for i, block in enumerate(m.transformer_blocks):
            context, tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context,
                                         encoder_hidden_states_mask=mask, temb=temb,
                                         image_rotary_emb=(image_rope, text_rope),
                                         joint_attention_kwargs=args["attention_kwargs"], **modulated)
            if control is not None:  # a ControlNet's residual, as the stock forward adds it
                tokens = tokens + controlnet_sample(control, i, len(m.transformer_blocks))
        return m.norm_out(tokens[:, :n], temb.chunk(2)[0] if zero_cond_t else temb)

    def _coarse_rope(self, grid, scale, device, frame: int = 0):
        """Complex RoPE (tokens, head_dim / 2) of the coarse patches' centres, in the backbone's centred units, at
        the image's ``frame`` position; made once per grid and device (outside inference mode, so that training
        can use it too)."""
        key = (*grid, scale, device, frame)
        if key not in self._ropes:
            if len(self._ropes) == 16:  # edits bring references of many sizes: keep the latest few
                del self._ropes[next(iter(self._ropes))]
            with torch.inference_mode(False):
                self._ropes[key] = self._centre_rope(grid, scale, frame).to(device)
        return self._ropes[key]

    def _centre_rope(self, grid, scale, frame: int = 0):
        """Rows and columns at the mean of the fine positions r - ceil(n / 2) that a patch covers."""
        rope = self.model.pos_embed
        dims = rope.axes_dim
        axes = []
        for n in grid:
            fine = n * scale
            centres = (torch.arange(fine, dtype=torch.float32) - (fine - fine // 2)).reshape(n, scale).mean(1)
            axes.append(rope.rope_params(centres, dims[len(axes) + 1], rope.theta))
        frames = rope.rope_params(torch.tensor([frame]), dims[0], rope.theta)
        rows, cols = grid
        return torch.cat([frames.expand(rows, cols, -1), axes[0][:, None].expand(rows, cols, -1),
                          axes[1][None].expand(rows, cols, -1)], -1).reshape(rows * cols, -1)


def _shapes(img_shapes) -> list[tuple[int, int, int]]:
    """(frame, rows, columns) of each image of a sample, the generated one first, read as the backbone reads
    ``img_shapes`` (the first sample's)."""
    first = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
    shapes = [tuple(int(n) for n in shape) for shape in (first if isinstance(first, list) else [first])]
    if any(frames != 1 for frames, _, _ in shapes):
        raise ValueError(f"img_shapes {shapes} has an image of several frames, which ddit cannot coarsen; pass one "
                         "frame per image")
    return shapes
