"""What the multi-patch adapter needs to know about a family of transformers.

Every family is described in the same canonical layout, so that the adapter
can treat them alike: a latent is (B, C, *dims); a patch has one size per dim;
the features of a patch are ordered (C, *patch), as in a Conv kernel; tokens
follow the patch grid in row-major order.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from itertools import chain

import torch
import torch.utils.checkpoint
from diffusers.models.embeddings import PatchEmbed, get_2d_sincos_pos_embed
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from torch import nn

from ..quantized import float_weight


#: The attention-kwargs key of an IP-Adapter's image prompt, which the backbone's own forward projects before its
#: blocks (FLUX.1, Chroma, SD3).
IP_ADAPTER = "ip_adapter_image_embeds"


@dataclass(frozen=True)
class Reference:
    """A reference image's tokens beside the generated grid's (FLUX Kontext, FLUX.2 ``image=``, Qwen-Image-Edit):
    the pipeline appends them to the latent's tokens and drops their outputs. Packed tokens ``start:stop`` of the
    hidden states; ``grid`` (rows, columns) in those tokens, or None where they do not form one (they then run at
    the backbone's own patch); ``index`` is the image's place among the call's images, the generated one being 0."""

    start: int
    stop: int
    grid: tuple[int, int] | None
    index: int


class BackboneSpec:
    """One family of diffusers transformers; a subclass per family, bound to one model.

    A subclass names its model class, points at the layers where the backbone
    patchifies (``base_layers``) and runs the backbone's own blocks on tokens
    that the adapter embedded at a coarser patch (``forward``).
    """

    #: Class name of the model (a subclass of it matches too).
    model_class: str = ""
    #: LoRA targets, matched by peft against full module names: block attention and feed-forward only.
    lora_target: str = (
        r"(transformer_blocks|single_transformer_blocks|blocks)\.\d+\."
        r"(attn\d?\.(to_q|to_k|to_v|to_out\.0)|ffn?\.net\.(0\.proj|2)|proj_mlp|proj_out)"
    )
    #: Whether the backbone's own forward only handles square latents.
    square_only: bool = False
    #: Whether the output projection orders a patch's features (*patch, C) (else (C, *patch)).
    unembed_channels_last: bool = True
    #: Whether the patch embedding does (a Linear over (*patch, C), as Z-Image's; else (C, *patch), as a Conv).
    embed_channels_last: bool = False
    #: Forward arguments that only make sense at the fine grid (refused at coarse sizes).
    unsupported: tuple[str, ...] = ()
    #: Forward arguments holding a ControlNet's residuals, a list of (B, tokens, D) tensors on the latent's fine
    #: tokens that ``forward`` adds between blocks as the backbone does: a coarse step takes each averaged over the
    #: fine tokens a coarse token covers (``pool_tokens``).
    residuals: tuple[str, ...] = ()
    #: Whether ``forward`` projects an IP-Adapter's image prompt (``IP_ADAPTER`` in the attention kwargs) as the
    #: backbone does; where it does not, one is refused (a coarse step would drop it).
    image_prompt: bool = False
    #: Forward arguments shared by every row of a batch (never cut when a batch runs in groups).
    unbatched: tuple[str, ...] = ()
    #: Whether every block maps hidden states to hidden states; if not (dual-stream), ddit's feature caches read
    #: what each block returns from diffusers' ``TransformerBlockRegistry``, or from ``block_outputs``.
    single_stream: bool = True
    #: Block class name -> the arguments its forward returns, in order, for blocks diffusers' registry lacks.
    block_outputs: dict[str, tuple[str, ...]] = {}
    #: Dual-stream block arguments besides the image tokens whose stack output the model keeps (LTX-2's audio),
    #: each with the module that norms it after the blocks: ddit's feature caches finish that stream there.
    side_streams: dict[str, str] = {}
    #: Block class names whose TeaCache signal ``teacache_input`` computes, where their norm1 is no adaLN-zero norm
    #: (whose output TeaCache reads itself); a stack starting with another block refuses TeaCache.
    teacache_blocks: tuple[str, ...] = ()
    #: Why ddit's feature caches cannot run on this family, if they cannot (refused before any step).
    caches_refused: str = ""
    #: Whether this family's stock pipelines may batch CFG branches in one call; the packed-token families'
    #: pipelines (FLUX, Chroma, Qwen-Image) call once per branch, even where they say they guide (Chroma).
    batched_cfg: bool = True
    #: Forward arguments that are lists of one entry per sample (Z-Image's latents and prompts, Qwen-Image's
    #: img_shapes): a batch run in groups cuts them by row. A backbone whose latent is such a list returns a list too.
    per_sample_lists: tuple[str, ...] = ()
    #: Forward arguments that may hold several consecutive rows per sample (Wan's first-and-last-frame video: two
    #: images each): a batch run in groups cuts them by block of rows.
    row_blocks: tuple[str, ...] = ()

    #: The backbone's output class and its fields, in the order of its tuple output: the first is the latent's
    #: prediction; any others (LTX-2's audio) ``forward`` returns after the latent's tokens, finished.
    output_class: type = Transformer2DModelOutput
    output_fields: tuple[str, ...] = ("sample",)

    def __init_subclass__(cls, **kwargs):
        """A subclass with a forward of its own takes no ControlNet residuals nor image prompt unless it says so:
        its parent's forward added them, and its own would drop them silently."""
        super().__init_subclass__(**kwargs)
        if "forward" in vars(cls):
            for name, none in (("residuals", ()), ("image_prompt", False)):
                if name not in vars(cls):
                    setattr(cls, name, none)

    def __init__(self, model: nn.Module):
        self.model = model
        #: Called as a block runs checkpointed: the context its recomputation in the backward runs in (the
        #: adapter's gives the LoRA of the size that ran it, which a later size's forward has since replaced).
        self.recompute: Callable[[], AbstractContextManager] = nullcontext

    @property
    def base_patch_size(self) -> int:
        """The backbone's own spatial patch, in latent pixels."""
        return self.model.config.patch_size

    def patch(self, size: int) -> tuple[int, ...]:
        """The full patch for a spatial ``size``."""
        return (size, size)

    def base_layers(self) -> tuple[nn.Module, nn.Linear]:
        """The backbone's patch embedding (Conv or Linear) and its output projection."""
        raise NotImplementedError

    def base_weights(self) -> tuple[torch.Tensor, ...]:
        """The base layers in canonical layout: (D, C, *patch), (D,), (D, C_out, *patch), (C_out, *patch)."""
        embed, unembed = self.base_layers()
        patch = self.patch(self.base_patch_size)
        w_in, w_out, b_out = float_weight(embed), float_weight(unembed).T, _bias(unembed)
        dim = w_in.shape[0]
        if self.embed_channels_last:
            w_in = w_in.reshape(dim, *patch, -1).movedim(-1, 1)
        else:
            w_in = w_in.reshape(dim, -1, *patch)
        if self.unembed_channels_last:
            w_out, b_out = w_out.reshape(dim, *patch, -1).movedim(-1, 1), b_out.reshape(*patch, -1).movedim(-1, 0)
        else:
            w_out, b_out = w_out.reshape(dim, -1, *patch), b_out.reshape(-1, *patch)
        return w_in, _bias(embed), w_out, b_out

    def teacache_input(self, block: nn.Module, hidden: torch.Tensor, arguments: dict) -> torch.Tensor:
        """What TeaCache watches at ``block`` (one of ``teacache_blocks``) as the first block of a pass: its
        timestep-modulated input, one row per row of ``hidden``, computed as the block computes it from its forward
        ``arguments`` (by name)."""
        raise NotImplementedError(f"{type(self).__name__} lists teacache_blocks but computes no teacache_input")

    def check_sizes(self, dims: tuple[int, ...], sizes: tuple[int, ...]) -> None:
        """Refuse, at a pipeline's first call, a latent of ``dims`` that one of ``sizes`` cannot run (beyond their
        dividing it, which the runtime checks)."""

    def sized(self, arguments: dict, size: int) -> dict:
        """Forward arguments (by name) that a call at patch ``size`` takes in place of the ones given: a state the
        backbone keeps across calls that depends on the size (Qwen-Image 2.1's KV cache). None by default."""
        return {}

    def cut(self, name: str, value, idx: torch.Tensor, rows: int):
        """Forward argument ``name`` for rows ``idx`` of ``rows``, where a batch runs in groups of one patch size;
        ``NotImplemented``: cut as tensors, and the lists and blocks this spec names, are cut."""
        return NotImplemented

    def latent(self, args: dict) -> torch.Tensor:
        """The latent (B, C, *dims) among the bound forward arguments."""
        return args["hidden_states"]

    def timestep(self, args: dict) -> torch.Tensor:
        """The timestep among the bound forward arguments."""
        return args["timestep"]

    def pack(self, output: torch.Tensor, args: dict) -> torch.Tensor:
        """The output latent in the form the backbone returns it."""
        return output

    def output(self, outputs: tuple, return_dict: bool):
        """What the backbone's forward returns, from its ``outputs`` in ``output_fields`` order."""
        return self.output_class(**dict(zip(self.output_fields, outputs))) if return_dict else tuple(outputs)

    def side_tokens(self, args: dict) -> int:
        """Tokens that run beside the latent's at every size (LTX-2's audio): part of what a step saw, which
        coarse steps do not shrink. None by default: text tokens are counted nowhere."""
        return 0

    def references(self, args: dict) -> list[Reference]:
        """The reference images' tokens that follow the generated grid's (none, but in edit pipelines)."""
        return []

    def reference_tokens(self, args: dict, reference: Reference) -> torch.Tensor:
        """A reference's packed tokens (B, n, features), as the backbone's own patch embedding takes them."""
        return args["hidden_states"][:, reference.start:reference.stop]

    def generated(self, output: torch.Tensor, args: dict) -> torch.Tensor:
        """The part of an output that a pipeline keeps: the generated grid's tokens, not its references'."""
        references = self.references(args)
        return output[:, :references[0].start] if references else output

    def block(self, block: nn.Module, *args, **kwargs):
        """Run one of the backbone's blocks, checkpointed when the backbone has gradient checkpointing on."""
        if torch.is_grad_enabled() and getattr(self.model, "gradient_checkpointing", False):
            again = self.recompute()
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False,
                                                     context_fn=lambda: (nullcontext(), again), **kwargs)
        return block(*args, **kwargs)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, ...], scale: int, args: dict) -> torch.Tensor:
        """Run the backbone on embedded ``tokens`` of a ``grid`` ``scale`` times coarser than its own.

        Adds positions, conditions, runs the blocks and the output norm: returns
        the tokens that the output projection would see (followed by the
        backbone's other outputs, as a tuple, where ``output_fields`` names more). ``args`` are the
        backbone's forward arguments by name. A family with ``references`` also
        takes ``references``: (reference, its embedded tokens, its scale) for
        each, to run beside the grid's tokens at their own positions.
        """
        raise NotImplementedError


def as_batch(output) -> torch.Tensor:
    """A transformer's output as one tensor (B, ...): Z-Image returns a list of per-sample tensors."""
    return torch.stack(list(output)) if isinstance(output, (list, tuple)) else output


def pool_tokens(tokens: torch.Tensor, grid: tuple[int, ...], factor: tuple[int, ...]) -> torch.Tensor:
    """Tokens (B, prod(grid), D) of a fine ``grid`` averaged over each coarse patch of ``factor`` fine tokens a side:
    (B, tokens of the coarse grid, D), in its row-major order. A coarse token starts as the mean of the fine tokens
    it covers (``PatchHead``), so what is added to the fine ones adds so to it."""
    b, _, d = tokens.shape
    x = tokens.reshape(b, *chain.from_iterable((g // f, f) for g, f in zip(grid, factor)), d)
    return x.mean(dim=tuple(range(2, 2 + 2 * len(grid), 2))).reshape(b, -1, d)


def controlnet_sample(samples, index: int, blocks: int, repeat: bool = False) -> torch.Tensor:
    """The ControlNet residual that FLUX's and Qwen-Image's forwards add after block ``index`` of ``blocks``: each
    sample serves ceil(blocks / samples) consecutive blocks, or, with ``repeat`` (XLabs' ControlNets), every
    len(samples)-th block."""
    if repeat:
        return samples[index % len(samples)]
    return samples[index // math.ceil(blocks / len(samples))]


def _bias(layer: nn.Module) -> torch.Tensor:
    """A layer's bias, zeros where it has none (FLUX.2's projections): the coarse heads keep one."""
    if layer.bias is not None:
        return layer.bias
    weight = float_weight(layer)  # a quantized weight's own shape is its packed storage's
    return torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> torch.Tensor:
    """(B, C, *dims) -> (B, tokens, C * prod(patch)); for (2, 2) this is Flux's packing."""
    b, c, *dims = x.shape
    grid = [d // p for d, p in zip(dims, patch)]
    n = len(dims)
    x = x.reshape(b, c, *chain.from_iterable(zip(grid, patch)))
    x = x.permute(0, *range(2, 2 + 2 * n, 2), 1, *range(3, 3 + 2 * n, 2))
    return x.reshape(b, math.prod(grid), -1)


def unpatchify(tokens: torch.Tensor, patch: tuple[int, ...], grid: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``patchify``: (B, prod(grid), C * prod(patch)) -> (B, C, *grid * patch)."""
    n = len(grid)
    x = tokens.reshape(tokens.shape[0], *grid, -1, *patch)
    x = x.permute(0, n + 1, *chain.from_iterable((1 + i, n + 2 + i) for i in range(n)))
    return x.reshape(tokens.shape[0], -1, *(g * p for g, p in zip(grid, patch)))


def sincos_positions(pos_embed: PatchEmbed, grid: tuple[int, int], scale: int) -> torch.Tensor:
    """Sincos positions (1, tokens, D) of a coarse ``grid``: the backbone's fine table at stride ``scale``.

    A coarse patch sits where its top-left fine patch sat. The fine table is
    the one ``pos_embed`` itself adds: a centre crop of a stored table (SD3), or
    one recomputed with the backbone's ``base_size`` (DiT, PixArt), whose rows
    at stride ``scale`` are the table of the coarse grid itself with the same
    ``base_size`` (a position is its index times base_size / grid): computed so,
    on the model's device. Another base size would misplace every patch.
    """
    h, w = grid[0] * scale, grid[1] * scale
    if pos_embed.pos_embed_max_size:
        table = pos_embed.cropped_pos_embed(h * pos_embed.patch_size, w * pos_embed.patch_size)
        return table.float().reshape(1, h, w, -1)[:, ::scale, ::scale].flatten(1, 2)
    table = get_2d_sincos_pos_embed(pos_embed.pos_embed.shape[-1], grid, base_size=pos_embed.base_size,
                                    interpolation_scale=pos_embed.interpolation_scale,
                                    device=pos_embed.proj.weight.device, output_type="pt")
    return table.float().unsqueeze(0)
