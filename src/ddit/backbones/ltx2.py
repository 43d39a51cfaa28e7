"""LTX-2: one transformer denoises a video and its audio together; only the video changes patch size.

The pipeline packs the video latent into tokens of patch (1, 1, 1), as LTX-Video does, and passes the audio
latent's tokens beside them; every block runs both streams and their cross-attention, and the forward returns
both outputs. A coarse step coarsens the video alone: the audio keeps its tokens and its positions, and its
output is what the backbone computes beside the coarse video.

The forward is the backbone's own, with its video patch embedding and output projection bypassed (the adapter's
heads stand in for them): it is long and varies between LTX-2.0 and 2.3 (prompt modulation, cross-timestep
gates, STG, modality isolation), and copying it would drift from diffusers. A coarse video token's RoPE bounds
cover the fine tokens it holds (so its position is their centre); its timestep is theirs, which the pipeline
gives per token in image-to-video (the first frame at t = 0; a coarse patch lies within one frame). ddit's
feature caches stand in for both streams: the audio is a side stream, finished at its own output norm.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from diffusers.models.transformers.transformer_ltx2 import AudioVisualModelOutput
from torch import nn

from .base import BackboneSpec, patchify, unpatchify


class LTX2Spec(BackboneSpec):
    model_class = "LTX2VideoTransformer3DModel"
    unembed_channels_last = False  # the pipeline packs a token's features as (C, t, p, p)
    # the video's own attention LoRA'd (attn1, attn2) and its feed-forward; the audio's layers stay as they are
    lora_target = r"transformer_blocks\.\d+\.(attn\d\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))"
    unsupported = ("video_self_attention_mask", "video_keyframes_mask")  # one value per fine token (pair)
    unbatched = ("fps",)
    output_class = AudioVisualModelOutput
    output_fields = ("sample", "audio_sample")
    single_stream = False  # each block returns the video and the audio; a cache stands in for both
    block_outputs = {"LTX2VideoTransformerBlock": ("hidden_states", "audio_hidden_states")}
    side_streams = {"audio_hidden_states": "audio_norm_out"}
    teacache_blocks = ("LTX2VideoTransformerBlock",)

    def __init__(self, model):
        super().__init__(model)
        if (model.config.patch_size, model.config.patch_size_t) != (1, 1):
            raise TypeError("ddit's LTX-2 spec takes patch 1 in space and time, as LTX-2's configs do, not "
                            f"{model.config.patch_size}x{model.config.patch_size_t}")
        self._identities = nn.Identity(), nn.Identity()  # the same modules every call: nothing new to guard on

    def patch(self, size):
        return (1, size, size)

    def base_layers(self):
        return self.model.proj_in, self.model.proj_out

    def teacache_input(self, block, hidden, arguments):
        """The video's norm1 output shifted and scaled by the block's share of the (per-token) timestep
        modulation, as its self-attention receives it."""
        shift, scale = block.get_mod_params(block.scale_shift_table, arguments["temb"], len(hidden))[:2]
        return block.norm1(hidden) * (1 + scale) + shift

    def side_tokens(self, args):
        return args["audio_hidden_states"].shape[1]

    def latent(self, args):
        return unpatchify(args["hidden_states"], (1, 1, 1), self._grid(args))

    def timestep(self, args):
        """The step's timestep: the noisiest token's, where tokens have their own (the conditioning frame's 0)."""
        t = args["timestep"]
        return t.reshape(len(t), -1).amax(1) if t.ndim > 1 else t

    def pack(self, output, args):
        return patchify(output, (1, 1, 1))

    def forward(self, tokens, grid, scale, args):
        """The backbone's forward on embedded video ``tokens``: returns them before the output projection, and
        the audio output."""
        m = self.model
        fine = args["video_coords"]
        if fine is None:
            fine = m.rope.prepare_video_coords(len(tokens), *self._grid(args), tokens.device, fps=args["fps"])
        t = args["timestep"]
        if t[0].numel() == math.prod(grid) * scale * scale:  # one per fine token: one per coarse token
            t = self._coarse(t.reshape(len(t), -1, 1).float(), grid, scale)[..., 0].to(t.dtype)
        coarse = dict(args, hidden_states=tokens, video_coords=self._coarse_bounds(fine, grid, scale), timestep=t,
                      audio_timestep=args["timestep"] if args["audio_timestep"] is None else args["audio_timestep"],
                      return_dict=False)
        with self._bypassed():
            return type(m).forward(m, **coarse)

    @contextmanager
    def _bypassed(self):
        """The video's patch embedding and output projection as identities, as the adapter's heads run them; and
        the backbone's gradient checkpointing through ``block``, whose recomputation runs the LoRA of the size
        that ran it. The backbone is changed while inside: one thread at a time (as its LoRA's active size is)."""
        m = self.model
        saved = m.proj_in, m.proj_out, m.__dict__.get("_gradient_checkpointing_func")  # diffusers sets one (None)
        try:
            m.proj_in, m.proj_out = self._identities
            m._gradient_checkpointing_func = self.block
            yield
        finally:
            m.proj_in, m.proj_out, m._gradient_checkpointing_func = saved

    def _grid(self, args) -> tuple[int, int, int]:
        """The fine token grid (frames, rows, columns) the call names, checked against its tokens."""
        grid = args.get("num_frames"), args.get("height"), args.get("width")  # a bound call's: given or not
        tokens = args["hidden_states"].shape[1]
        if None in grid or grid[0] * grid[1] * grid[2] != tokens:
            raise ValueError(f"the {tokens} video tokens are not the {grid} grid the call names as num_frames, "
                             "height and width (an LTX-2 pipeline that appends conditioning or reference tokens "
                             "to the video's, or names no grid: condition, IC-LoRA, keyframes): LTX-2 runs dynamic "
                             "patches where the video's tokens are its latent grid (LTX2Pipeline, "
                             "LTX2ImageToVideoPipeline)")
        return grid

    def _coarse_bounds(self, fine: torch.Tensor, grid: tuple[int, int, int], scale: int) -> torch.Tensor:
        """(B, 3, fine tokens, 2) [start, end) bounds -> the coarse tokens': from their first fine token's start to
        their last's end."""
        f, h, w = grid
        b, dims = fine.shape[:2]
        fine = fine.reshape(b, dims, f, h, scale, w, scale, 2)
        return torch.stack([fine[..., 0].amin((4, 6)), fine[..., 1].amax((4, 6))], -1).flatten(2, 4)

    def _coarse(self, fine: torch.Tensor, grid: tuple[int, int, int], scale: int) -> torch.Tensor:
        """(B, fine tokens, D) -> (B, coarse tokens, D): the mean over each coarse patch's fine tokens (image-to-video's
        timesteps are one per frame, and a coarse patch lies within one)."""
        f, h, w = grid
        return fine.reshape(len(fine), f, h, scale, w, scale, -1).mean((3, 5)).flatten(1, 3)
