"""Qwen-Image: Flux's packing (2x2 latent patches as tokens), dual-stream blocks, RoPE over centred positions.

The pipeline passes the grid as ``img_shapes`` (frame, rows, columns) rather than as ids. Its RoPE
centres the rows and columns (row r of h sits at r - ceil(h / 2)); a coarse patch sits at the mean of
the fine positions it covers, so its frequencies are computed for that fractional position. Text
positions follow the fine grid's, as the backbone places them. Edit pipelines' reference images (a
second shape per sample, and the ``zero_cond_t`` conditioning of Qwen-Image-Edit-2511) and the layered
model's 3D RoPE are refused.
"""

from __future__ import annotations

import torch
from diffusers.models.transformers.transformer_qwenimage import compute_text_seq_len_from_mask

from .base import BackboneSpec, unpatchify
from .flux import PACK, FluxSpec


class QwenImageSpec(BackboneSpec):
    model_class = "QwenImageTransformer2DModel"
    # image-stream attention and feed-forward of every block
    lora_target = r"transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0)|img_mlp\.net\.(0\.proj|2))"
    unembed_channels_last = False  # packed features are (C, 2, 2)
    unsupported = ("controlnet_block_samples", "guidance")  # guidance: the stock forward cannot take it either
    unbatched = ("img_shapes",)
    single_stream = False
    batched_cfg = False  # true CFG calls once per branch
    pack = FluxSpec.pack

    def __init__(self, model):
        super().__init__(model)
        if model.config.get("use_layer3d_rope"):
            raise TypeError("Qwen-Image-Layered's 3D RoPE places layers, not patches: ddit cannot coarsen it; "
                            "use a Qwen-Image model with use_layer3d_rope=False")
        if model.config.get("zero_cond_t"):
            raise TypeError("zero_cond_t conditions the reference images of Qwen-Image-Edit-2511, which dynamic "
                            "patches cannot run; use a text-to-image Qwen-Image model (zero_cond_t=False)")
        self._ropes = {}

    @property
    def base_patch_size(self):
        return PACK[0]  # the pipeline's packing, which config.patch_size also names

    def base_layers(self):
        return self.model.img_in, self.model.proj_out

    def latent(self, args):
        _, rows, cols = _shape(args["img_shapes"])
        tokens = args["hidden_states"]
        if tokens.shape[1] != rows * cols:
            raise ValueError(f"{tokens.shape[1]} image tokens, but img_shapes names a {rows}x{cols} grid: pass "
                             "the img_shapes of these latents")
        return unpatchify(tokens, PACK, (rows, cols))

    def forward(self, tokens, grid, scale, args):
        m, dtype = self.model, tokens.dtype
        context = m.txt_in(m.txt_norm(args["encoder_hidden_states"]))
        text_len, _, mask = compute_text_seq_len_from_mask(context, args["encoder_hidden_states_mask"])
        temb = m.time_text_embed(args["timestep"].to(dtype), tokens, args["additional_t_cond"])
        _, text_rope = m.pos_embed(args["img_shapes"], max_txt_seq_len=text_len, device=tokens.device)
        if text_rope.is_inference() and not torch.is_inference_mode_enabled():
            text_rope = text_rope.clone()  # diffusers caches it; made in an inference run, backward cannot save it
        rope = (self._coarse_rope(grid, scale, tokens.device), text_rope)
        for block in m.transformer_blocks:
            context, tokens = self.block(block, hidden_states=tokens, encoder_hidden_states=context,
                                         encoder_hidden_states_mask=mask, temb=temb, image_rotary_emb=rope,
                                         joint_attention_kwargs=args["attention_kwargs"])
        return m.norm_out(tokens, temb)

    def _coarse_rope(self, grid, scale, device):
        """Complex RoPE (tokens, head_dim / 2) of the coarse patches' centres, in the backbone's centred units;
        made once per grid and device (outside inference mode, so that training can use it too)."""
        key = (*grid, scale, device)
        if key not in self._ropes:
            with torch.inference_mode(False):
                self._ropes[key] = self._centre_rope(grid, scale).to(device)
        return self._ropes[key]

    def _centre_rope(self, grid, scale):
        """Frame 0; rows and columns at the mean of the fine positions r - ceil(n / 2) that a patch covers."""
        rope = self.model.pos_embed
        dims = rope.axes_dim
        axes = []
        for n in grid:
            fine = n * scale
            centres = (torch.arange(fine, dtype=torch.float32) - (fine - fine // 2)).reshape(n, scale).mean(1)
            axes.append(rope.rope_params(centres, dims[len(axes) + 1], rope.theta))
        frame = rope.rope_params(torch.zeros(1), dims[0], rope.theta)
        rows, cols = grid
        return torch.cat([frame.expand(rows, cols, -1), axes[0][:, None].expand(rows, cols, -1),
                          axes[1][None].expand(rows, cols, -1)], -1).reshape(rows * cols, -1)


def _shape(img_shapes) -> tuple[int, int, int]:
    """(frame, rows, columns) of the latent, read as the backbone reads ``img_shapes``; a second image per
    sample (Qwen-Image-Edit's reference) is refused."""
    first = img_shapes[0] if isinstance(img_shapes, list) else img_shapes
    shapes = first if isinstance(first, list) else [first]
    if len(shapes) != 1 or int(shapes[0][0]) != 1:
        raise ValueError(f"img_shapes {shapes} is not one image per sample: the reference images of "
                         "Qwen-Image-Edit cannot run under dynamic patches; use the text-to-image, img2img or "
                         "inpaint pipeline")
    return tuple(int(n) for n in shapes[0])
