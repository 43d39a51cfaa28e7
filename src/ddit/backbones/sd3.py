"""Stable Diffusion 3 / 3.5 (MMDiT): joint text-image blocks, a cropped sincos table; a ControlNet's residuals
averaged over the fine tokens a coarse token covers, and an IP-Adapter's image prompt projected as the backbone
projects it."""

from __future__ import annotations

import torch
from torch import nn

from .base import IP_ADAPTER, BackboneSpec, sincos_positions


class SD3Spec(BackboneSpec):
    model_class = "SD3Transformer2DModel"
    residuals = ("block_controlnet_hidden_states",)
    image_prompt = True
    single_stream = False  # joint blocks return (text, image) tokens
    teacache_blocks = ("JointTransformerBlock",)  # SD3.5 Medium's dual-attention first block (SD3's is adaLN-zero)

    def teacache_input(self, block, hidden, arguments):
        """The first of SD3.5 Medium's two modulations of norm1's output (its self-attention's input)."""
        return block.norm1(hidden, emb=arguments["temb"])[0]

    def base_layers(self):
        return self.model.pos_embed.proj, self.model.proj_out

    def forward(self, tokens, grid, scale, args):
        m = self.model
        x = tokens + sincos_positions(m.pos_embed, grid, scale).to(tokens)
        temb = m.time_text_embed(args["timestep"], args["pooled_projections"])
        context = m.context_embedder(args["encoder_hidden_states"])
        skip, control = args["skip_layers"] or (), args["block_controlnet_hidden_states"]
        kwargs = with_timed_image_prompt(args["joint_attention_kwargs"], m, args["timestep"])
        for i, block in enumerate(m.transformer_blocks):
            if i not in skip:
                context, x = self.block(block, hidden_states=x, encoder_hidden_states=context, temb=temb,
                                        joint_attention_kwargs=kwargs)
            # a ControlNet's residual, where the stock forward adds it (its interval is not FLUX's ceil: no
            # controlnet_sample)
            if control is not None and block.context_pre_only is False:
                x = x + control[int(i / (len(m.transformer_blocks) / len(control)))]
        return m.norm_out(x, temb)


def with_timed_image_prompt(kwargs: dict | None, model: nn.Module, timestep: torch.Tensor) -> dict | None:
    """Attention kwargs with an IP-Adapter's image prompt replaced by its timestep-aware projection
    (``ip_hidden_states`` and the ``temb`` its attention norms it by), as SD3's forward replaces it; in a copy, so
    that the caller's dict keeps it."""
    if not kwargs or IP_ADAPTER not in kwargs:
        return kwargs
    kwargs = dict(kwargs)
    ip_hidden_states, ip_temb = model.image_proj(kwargs.pop(IP_ADAPTER), timestep)
    kwargs.update(ip_hidden_states=ip_hidden_states, temb=ip_temb)
    return kwargs
