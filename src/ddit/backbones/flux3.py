"""FLUX.3: Flux's packed tokens and 4-axis ids (t, h, w, l); per-mode blocks, then joint blocks.

The latent, packing and coarse ids (patch centres in fine units) are Flux's (``FluxSpec``).
Image, reference-image and text tokens first run their own blocks apart, then join. Modulation is
per token: the image's at its timestep, the references' and the text's at t = 0. Reference images
come as their own argument (``image_cond_hidden_states``, with their own embedder and ids): they
keep their grid at every size. ddit's feature caches are refused (the per-mode blocks run beside
the block lists they read). diffusers 0.42 runs FLUX.3 in modular pipelines only (``Flux3ModularPipeline``,
one transformer call per CFG branch), which ``ddit.enable`` takes (docs/pipelines.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .flux import FluxSpec


class Flux3Spec(FluxSpec):
    model_class = "Flux3Transformer2DModel"
    unsupported = ()
    unbatched = ("img_ids", "txt_ids", "image_cond_ids")
    caches_refused = "its per-mode blocks run beside the block lists ddit's feature caches stand in for"
    # the image's own blocks and the joint blocks: attention and feed-forward
    lora_target = (r"(mode_blocks\.image|single_transformer_blocks)\.\d+\."
                   r"(attn\.(to_q|to_k|to_v|to_out\.0)|ff\.(linear_in|linear_out))")

    def base_layers(self):
        return self.model.x_embedders["image"], self.model.proj_out

    def references(self, args):
        """None among the latent's tokens: FLUX.3 takes reference images as ``image_cond_hidden_states``."""
        if super().references(args):
            raise ValueError("img_ids place several images among hidden_states; FLUX.3 takes reference images as "
                             "image_cond_hidden_states (with image_cond_ids), as its pipelines pass them")
        return []

    def forward(self, tokens, grid, scale, args, references=()):
        m, dtype, (b, n) = self.model, tokens.dtype, tokens.shape[:2]
        if (args["target_timestep"] is not None) != bool(m.config.flow_map):  # the stock forward's own checks
            raise ValueError("`target_timestep` is required by, and only by, a flow-map transformer (`flow_map=True`).")
        if (args["image_cond_hidden_states"] is None) != (args["image_cond_ids"] is None):
            raise ValueError("`image_cond_hidden_states` and `image_cond_ids` go together.")
        time = self._embedding(args["timestep"].to(dtype) * 1000, dtype)
        rest = self._embedding(tokens.new_zeros(b), dtype)
        if args["target_timestep"] is not None:  # a flow map: the step's target, added to every mode's embedding
            target = m.target_timestep_embedder(m.time_proj(args["target_timestep"].to(dtype) * 1000).to(dtype))
            time, rest = time + target[:, None], rest + target[:, None]
        time, rest = time.expand(b, n, -1), F.silu(rest)
        text = args["encoder_hidden_states"]
        text_mod = rest.expand(b, text.shape[1], -1)
        modes = [("txt", m.context_embedder(text), text_mod, m.pos_embed(args["txt_ids"]), m.txt_mode_blocks),
                 ("image", tokens, F.silu(time), m.pos_embed(self.positions(args, grid, scale)),
                  m.mode_blocks["image"])]
        cond = args["image_cond_hidden_states"]
        if cond is not None:
            modes.append(("image_cond", m.x_embedders["image_cond"](cond), rest.expand(b, cond.shape[1], -1),
                          m.pos_embed(args["image_cond_ids"]), m.mode_blocks["image_cond"]))
        states, single, ropes = [], [], []
        for name, hidden, act, rope, blocks in modes:
            early = m.early_stream_modulations[name](act)
            for block in blocks:
                hidden = self.block(block, hidden, early, rope)
            states.append(hidden)
            single.append(m.single_stream_modulations[name](act))
            ropes.append(rope)
        context, content = states[0], torch.cat(states[1:], 1)
        content_mod = torch.cat(single[1:], 1)
        rope = tuple(torch.cat(parts) for parts in zip(*ropes))
        for block in m.single_transformer_blocks:
            context, content = self.block(block, hidden_states=content, encoder_hidden_states=context,
                                          temb_mod=content_mod, temb_mod_context=single[0], image_rotary_emb=rope)
        return m.norm_out(content[:, :n], time)

    def _embedding(self, timestep, dtype):
        """The per-sample timestep embedding (B, 1, D), as the backbone makes it."""
        m = self.model
        return m.timestep_embedder(m.time_proj(timestep).to(dtype))[:, None, :]
