"""SkyReels-V2 (video): Wan 2.1's patches, positions and blocks, with three things of its own.

- Diffusion forcing: a timestep per latent frame, (B, frames), which a coarse patch keeps,
  since it lies within one frame.
- Causal blocks of frames (``num_frame_per_block``): a token attends to its own block of
  frames and the earlier ones, on the coarse grid as on the fine one.
- An fps embedding (``inject_sample_info``) added to every block's modulation.
"""

from __future__ import annotations

import torch

from .wan import WanSpec


class SkyReelsV2Spec(WanSpec):
    model_class = "SkyReelsV2Transformer3DModel"
    teacache_blocks = ("SkyReelsV2TransformerBlock",)
    per_sample_lists = ("fps",)  # the pipelines give one fps flag per sample

    def timestep(self, args):
        """The step's timestep, which a pipeline's frames must share: the policies pick one size per sample and
        step, and the runtime tells steps apart by the timestep."""
        t = args["timestep"]
        if t.ndim > 1 and (t != t[:, :1]).any():
            raise ValueError("dynamic patches need the frames of a diffusion forcing call at one noise level, not "
                             f"{t[0].tolist()}: call SkyReelsV2DiffusionForcingPipeline with ar_step=0 (synchronous) "
                             "and num_frames <= base_num_frames, without a prefix video")
        return t[:, 0] if t.ndim > 1 else t

    def forward(self, tokens, grid, scale, args):
        m = self.model
        f, h, w = grid
        rope = self.rope(grid, scale)
        t, forcing = args["timestep"], args["enable_diffusion_forcing"]
        if forcing and (t.ndim != 2 or t.shape[1] != f):
            raise ValueError(f"diffusion forcing takes one timestep per latent frame ({f}), not a timestep of shape "
                             f"{tuple(t.shape)}")
        temb, timestep_proj, context, image_context = m.condition_embedder(
            t, args["encoder_hidden_states"], args["encoder_hidden_states_image"])
        timestep_proj = timestep_proj.unflatten(-1, (6, -1))
        if image_context is not None:
            context = torch.cat([image_context, context], dim=1)
        if m.config.inject_sample_info:
            fps = m.fps_projection(m.fps_embedding(torch.tensor(args["fps"], dtype=torch.long, device=tokens.device)))
            fps = fps.unflatten(1, (6, -1))
            timestep_proj = timestep_proj + (fps.unsqueeze(1) if forcing else fps)
        if forcing:  # per frame -> per token: (B, 6, tokens, D) for the blocks, (B, tokens, D) for the output norm
            temb = temb.repeat_interleave(h * w, dim=1)
            timestep_proj = timestep_proj.repeat_interleave(h * w, dim=1).transpose(1, 2).contiguous()
        mask = self.causal_mask(grid, tokens.device)
        for block in m.blocks:
            tokens = self.block(block, tokens, context, timestep_proj, rope, mask)
        if forcing:
            shift, gain = (m.scale_shift_table.unsqueeze(2) + temb.unsqueeze(1)).chunk(2, dim=1)
            shift, gain = shift.squeeze(1), gain.squeeze(1)
        else:
            shift, gain = (m.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        return (m.norm_out(tokens.float()) * (1 + gain) + shift.to(tokens.device)).type_as(tokens)

    def causal_mask(self, grid, device) -> torch.Tensor | None:
        """(1, 1, tokens, tokens): which tokens each token attends to, with causal blocks of frames; else None."""
        frames_per_block = self.model.config.num_frame_per_block
        if frames_per_block <= 1:
            return None
        f, h, w = grid
        block = torch.arange(f // frames_per_block, device=device).repeat_interleave(frames_per_block)
        block = block.repeat_interleave(h * w)
        return (block[None, :] <= block[:, None])[None, None]
