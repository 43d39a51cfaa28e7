"""Z-Image: image and text in one stream; latents and prompts arrive as lists, one tensor per sample.

The pipeline passes each sample's latent (C, 1, H, W) and its prompt's embeddings (the prompt's own
length) as lists, and takes a list back. Image tokens pass the noise refiner, text tokens the
context refiner, then [image, text] runs through the main layers as one sequence. The backbone pads
each part to a multiple of 32 tokens with a learnt pad token; the coarse path pads the same way.
RoPE is (frame, row, column): text at frames 1..L, the image at frame L + 1; a coarse patch sits at
the mean of the fine rows and columns it covers, so its frequencies are computed for that fractional
position. Omni inputs (reference images, SigLIP features) and ControlNet are refused.
"""

from __future__ import annotations

import torch
from torch.nn.utils.rnn import pad_sequence

from .base import BackboneSpec

SEQ_MULTIPLE = 32  # diffusers' SEQ_MULTI_OF: every part of the sequence is padded to it


class ZImageSpec(BackboneSpec):
    model_class = "ZImageTransformer2DModel"
    # the image tokens' refiner and the main layers: attention and feed-forward (the text refiner sees no image)
    lora_target = r"(layers|noise_refiner)\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))"
    embed_channels_last = True  # a Linear over (1, p, p, C) features
    unsupported = ("controlnet_block_samples", "siglip_feats", "image_noise_mask")
    per_sample_lists = ("x", "cap_feats")
    teacache_blocks = ("ZImageTransformerBlock",)

    def __init__(self, model):
        super().__init__(model)
        if tuple(model.config.all_f_patch_size)[0] != 1:
            raise TypeError(f"a frame patch of {model.config.all_f_patch_size[0]}: ddit runs Z-Image models whose "
                            "first patch covers one frame (all_f_patch_size[0] == 1), as the released ones do")
        self.key = f"{self.base_patch_size}-1"  # the backbone's own embedder and final layer
        self._ropes = {}

    @property
    def base_patch_size(self):
        return self.model.config.all_patch_size[0]

    def base_layers(self):
        return self.model.all_x_embedder[self.key], self.model.all_final_layer[self.key].linear

    def teacache_input(self, block, hidden, arguments):
        """The main layers' first attention input: norm1's output scaled by its timestep modulation (Z-Image shifts
        nothing), over the image and caption tokens the layers run on together."""
        scale = block.adaLN_modulation(arguments["adaln_input"]).unsqueeze(1).chunk(4, dim=2)[0]
        return block.attention_norm1(hidden) * (1 + scale)

    def latent(self, args):
        x = args["x"]
        if isinstance(x[0], list):
            raise ValueError("Z-Image's omni inputs (a list of images per sample) cannot run under dynamic "
                             "patches; use the text-to-image, img2img or inpaint pipeline")
        x = torch.stack(list(x))
        if x.shape[2] != 1:
            raise ValueError(f"{x.shape[2]} frames per latent; Z-Image's pipelines pass one")
        return x[:, :, 0]

    def pack(self, output, args):
        return list(output.unsqueeze(2).unbind(0))

    def timestep(self, args):
        return args["t"]

    def forward(self, tokens, grid, scale, args):
        m, batch, n = self.model, len(tokens), tokens.shape[1]
        adaln = m.t_embedder(args["t"] * m.t_scale).type_as(tokens)
        caps = [m.cap_embedder(c) for c in args["cap_feats"]]
        lengths = [_padded(len(c)) for c in caps]
        caps = [torch.cat([c, m.cap_pad_token.to(c.dtype).expand(k - len(c), -1)]) for c, k in zip(caps, lengths)]
        cap_rope = self._memo(("text", max(lengths), tokens.device), lambda: self._rope(
            torch.arange(1, max(lengths) + 1), torch.zeros(1), torch.zeros(1), tokens.device))
        cap, cap_mask = pad_sequence(caps, batch_first=True), _mask(lengths, tokens.device)
        for layer in m.context_refiner:
            cap = self.block(layer, cap, cap_mask, cap_rope.expand(batch, -1, -1))

        x = torch.cat([tokens, m.x_pad_token.to(tokens.dtype).expand(batch, _padded(n) - n, -1)], 1)
        x_rope = torch.stack([self._memo((grid, scale, k + 1, tokens.device),
                                         lambda: self._image_rope(grid, scale, k + 1, tokens.device))
                              for k in lengths])
        for layer in m.noise_refiner:
            x = self.block(layer, x, None, x_rope, adaln)

        unified = pad_sequence([torch.cat([x[i], cap[i, :k]]) for i, k in enumerate(lengths)], batch_first=True)
        rope = pad_sequence([torch.cat([x_rope[i], cap_rope[0, :k]]) for i, k in enumerate(lengths)],
                            batch_first=True)
        mask = _mask([x.shape[1] + k for k in lengths], tokens.device)
        for layer in m.layers:
            unified = self.block(layer, unified, mask, rope, adaln)
        final = m.all_final_layer[self.key]
        return final.norm_final(unified[:, :n]) * (1 + final.adaLN_modulation(adaln)).unsqueeze(1)

    def _memo(self, key, make):
        """A RoPE table made once per key (outside inference mode, so that training can use it too)."""
        if key not in self._ropes:
            with torch.inference_mode(False):
                self._ropes[key] = make()
        return self._ropes[key]

    def _image_rope(self, grid, scale, frame, device):
        """RoPE of a coarse grid at ``frame``: rows and columns at the mean of the fine ones a patch covers;
        the pad tokens after it sit at (0, 0, 0), as the backbone puts them."""
        rows, cols = ((torch.arange(g * scale, dtype=torch.float64).reshape(g, scale).mean(1)) for g in grid)
        image = self._rope(torch.tensor([float(frame)]), rows, cols, device)[0]
        n = len(image)
        pads = self._rope(torch.zeros(1), torch.zeros(1), torch.zeros(1), device)[0].expand(_padded(n) - n, -1)
        return torch.cat([image, pads])

    def _rope(self, frames, rows, cols, device):
        """Complex RoPE (1, tokens, head_dim / 2) of the grid frames x rows x cols, computed as the backbone's
        table is (float64 angles, complex64), at any real position."""
        embedder = self.model.rope_embedder
        parts = []
        for axis, (positions, dim) in enumerate(zip((frames, rows, cols), embedder.axes_dims)):
            freqs = 1.0 / (embedder.theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
            angles = torch.outer(positions.to(torch.float64), freqs).float()
            shape = [1, 1, 1, -1]
            shape[axis] = len(positions)
            parts.append(torch.polar(torch.ones_like(angles), angles).reshape(shape))
        table = torch.cat([p.expand(len(frames), len(rows), len(cols), -1) for p in parts], -1)
        return table.reshape(1, -1, table.shape[-1]).to(device)


def _padded(n: int) -> int:
    return n + (-n) % SEQ_MULTIPLE


def _mask(lengths: list[int], device) -> torch.Tensor | None:
    """The batch's key mask (True: a token), None when every row is full, as the backbone passes it."""
    if len(set(lengths)) == 1:
        return None
    return torch.arange(max(lengths), device=device)[None] < torch.tensor(lengths, device=device)[:, None]
