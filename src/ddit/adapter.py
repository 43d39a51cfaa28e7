"""The multi-patch adapter: one pretrained transformer, several patch sizes (DDiT, section 2.1).

The backbone object stays as it is (its class and config untouched): the
adapter owns the coarse patchify / unpatchify and calls the backbone's own
blocks from its forward, through a per-family ``BackboneSpec``. The blocks get
a LoRA branch through peft, active only at coarse sizes.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

import torch
from diffusers.hooks.layerwise_casting import _is_layerwise_casting_active
from diffusers.models.attention_processor import Attention
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from safetensors.torch import save_file
from torch import nn

from .backbones import IP_ADAPTER, BackboneSpec, Reference, patchify, pool_tokens, spec_for, unpatchify
from .checkpoint import CheckpointError
from .quantized import float_weight
from .sharding import sharded_like, whole
from .weights import REPO_ID, load_safetensors, local_or_hub

CONFIG_NAME = "multipatch_config.json"
WEIGHTS_NAME = "multipatch.safetensors"
#: The files ``save_pretrained`` writes (the LoRA's config is peft's): all a Hub download of an adapter fetches.
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, "adapter_config.json")
#: What accelerate's and diffusers' hooks attach to the one module they hook: a wrapper that lent them
#: from the module inside it would look hooked when it is not (and removing them would fail).
HOOK_ATTRIBUTES = frozenset({"_hf_hook", "_old_forward", "_diffusers_hook"})
_PARALLEL = ("split the transformer by plans written for its own forward, which coarse steps do not take: not "
             "supported with ddit; run one pipeline per GPU on different prompts (accelerate) instead")
_LORA_CHANGE = ("LoRA layers cannot be loaded, fused or removed on the transformer while ddit's adapter shares "
                "them: load and unload LoRAs through the pipeline that ddit.enable was called on "
                "(pipe.load_lora_weights, pipe.unload_lora_weights: ddit builds its adapter again around them; a "
                "pipeline made from it with from_pipe does not reach ddit); to fuse one, ddit.disable(pipe) first, "
                "then pipe.fuse_lora() and pipe.unload_lora_weights(), and ddit.enable again")


def image_prompts(given: dict, spec: BackboneSpec) -> list[str]:
    """The forward arguments (by name) that carry an IP-Adapter's image prompt that ``spec`` cannot run at a coarse
    size (it would be dropped silently), named for an error message."""
    if spec.image_prompt:
        return []
    return [f"{name}['{IP_ADAPTER}'] (an IP-Adapter's image prompt, which only FLUX.1's, Chroma's and SD3's specs "
            "project: drop it from the attention kwargs)"
            for name, value in given.items() if isinstance(value, dict) and IP_ADAPTER in value]


#: diffusers' calls on a transformer that switch or weight its loaded LoRAs (a style LoRA): they run on the stock
#: backbone, ddit's LoRA taken out of it for the moment, and ddit's coarse steps then follow what they set.
STYLE_CALLS = frozenset({"set_adapter", "set_adapters", "enable_adapters", "disable_adapters", "enable_lora",
                         "disable_lora", "active_adapters"})
#: What diffusers can do to a transformer that would load into, remove, bypass or split the LoRA layers
#: ddit's adapter lives in: refused while the adapter is on the backbone, saying what to do instead.
REFUSED_CALLS = {
    **dict.fromkeys(("load_lora_adapter", "add_adapter", "delete_adapters", "fuse_lora", "unfuse_lora",
                     "unload_lora", "enable_lora_hotswap"), _LORA_CHANGE),
    "fuse_qkv_projections": "a fused q/k/v projection would bypass the LoRA layers ddit's adapter puts on to_q, "
                            "to_k and to_v: run unfused (fuse after ddit.disable(pipe) if you need it)",
    "enable_parallelism": f"context and tensor parallelism {_PARALLEL}",
}


class PatchHead(nn.Module):
    """Patch embedding, de-embedding and residual of one coarse patch size.

    Initialised from the backbone's layers as in PPFlow, so the coarse path is
    roughly right before distillation: a coarse token starts as the mean of the
    fine tokens it covers (kernel tiled over the sub-patches, divided by their
    number, bias copied), and its output as the fine output repeated over those
    sub-patches. The residual is a 1x1 channel map from the latent to the
    output, pixel by pixel (DDiT's connection from before the embedding to
    after the de-embedding): it carries the detail inside a patch that one
    token cannot hold (at high noise the prediction is largely the latent
    itself). It starts at zero, which keeps the PPFlow start exactly.
    """

    def __init__(self, w_in, b_in, w_out, b_out, scale: int):
        super().__init__()
        c_in, c_out = w_in.shape[1], w_out.shape[1]

        def tile(w):  # repeat over the sub-patches: the spatial dims are last in the canonical layout
            return w.detach().float().repeat(*[1] * (w.ndim - 2), scale, scale)

        w_in, w_out, b_out = tile(w_in).flatten(1) / scale**2, tile(w_out).flatten(1).T, tile(b_out).flatten()
        self.embed = nn.Linear(w_in.shape[1], w_in.shape[0])
        self.unembed = nn.Linear(w_out.shape[1], w_out.shape[0])
        self.residual = nn.Linear(c_in, c_out, bias=False)
        with torch.no_grad():
            self.embed.weight.copy_(w_in)
            self.embed.bias.copy_(b_in)
            self.unembed.weight.copy_(w_out)
            self.unembed.bias.copy_(b_out)
            self.residual.weight.zero_()

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The residual of a latent (B, C_in, *dims): (B, C_out, *dims)."""
        return self.residual(x.movedim(1, -1)).movedim(-1, 1)


def config_hash(model: nn.Module) -> str:
    """A short hash of a diffusers model's config, ignoring bookkeeping keys (``_name_or_path``...) and how its
    weights are stored (``quantization_config``): an adapter made on the bf16 model runs on its quantized copy."""
    config = {k: v for k, v in model.config.items() if not k.startswith("_") and k != "quantization_config"}
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


class MultiPatchTransformer(nn.Module):
    """A pretrained diffusers transformer that also runs at coarser patch sizes.

    Called with exactly the backbone's forward arguments plus ``patch_size`` (in
    latent pixels; ``None`` or the base size calls the backbone itself, LoRA
    off, so its output is unchanged). Each coarse size owns a ``PatchHead`` and
    a LoRA adapter on the blocks' attention and feed-forward.

    One LoRA adapter per size by default: a 4p token averages four times the
    pixels of a 2p token, so each size may need its own correction; per size it
    costs only a few LoRA parameters and the same compute at inference (one
    adapter is active per call), and a size can be trained or added without
    disturbing the others. ``shared_lora=True`` trains one adapter for every
    coarse size instead (docs/adapter.md compares the two on the testbed).

    ``rank`` sets the LoRA rank (alpha = rank); ``lora_config`` replaces the
    whole LoRA config (``from_pretrained`` passes the saved one). Wrapping
    freezes the backbone's own weights (peft does) and injects the LoRA layers
    into it; its class and config stay as they are.
    """

    def __init__(self, backbone: nn.Module, patch_sizes: Sequence[int] | None = None, rank: int = 8,
                 lora_config: LoraConfig | None = None, shared_lora: bool = False):
        super().__init__()
        self.backbone = backbone
        self.spec = spec_for(backbone)
        self.base_patch_size = base = self.spec.base_patch_size
        self.patch_sizes, names = self.check_backbone(backbone, patch_sizes, shared_lora)
        sizes = self.patch_sizes
        self.shared_lora = shared_lora
        weights = self.spec.base_weights()
        self.heads = nn.ModuleDict({str(s): PatchHead(*weights, scale=s // base) for s in sizes[1:]})
        self.heads.to(device=backbone.device, dtype=backbone.dtype)
        self.lora_config = lora_config or LoraConfig(r=rank, lora_alpha=rank, target_modules=self.spec.lora_target)
        # a style LoRA's layers, loaded before, with what they run: peft's injection activates ddit's adapters
        styled = {id(m): (m, m.active_adapters, m.disable_adapters) for m in backbone.modules()
                  if isinstance(m, LoraLayer)}
        _inject(backbone, self.lora_config, names, styled)
        for layer, active, disabled in styled.values():
            layer._active_adapter, layer._disable_adapters = active, disabled
        self._configs = {name: backbone.peft_config[name] for name in names}
        self._named_lora_layers = [(name, m) for name, m in backbone.named_modules()
                                   if isinstance(m, LoraLayer) and names[0] in m.lora_A]
        places = [(backbone.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2], m)
                  for name, m in self._named_lora_layers]
        # ddit's own layers leave the backbone whole (detach, lean base calls); in a style LoRA's layers ddit's
        # adapters sit beside the style's, and only they leave (``_stash``)
        self._lora_places = [place for place in places if id(place[2]) not in styled]
        self._shared_places = [place for place in places if id(place[2]) in styled]
        self._lora_layers = [layer for _, _, layer in places]
        self._stashed: list[dict] = []
        self._lora_in = True  # whether ddit's own LoRA layers sit in the backbone right now
        self._lora_active: int | None | str = "unset"  # the size whose LoRA the layers' flags select
        self.attached = True  # False after detach(): the backbone belongs to someone else until attach()
        self._lean = False
        for p in self.trainable_parameters():
            p.requires_grad_(True)  # peft leaves only the last injected adapter trainable
        self._signature = inspect.signature(backbone.forward)
        self._read_styles()
        self._use_lora(None)
        self.spec.recompute = lambda: self._lora_of(self._lora_active)

    @staticmethod
    def check_backbone(backbone: nn.Module, patch_sizes: Sequence[int] | None = None,
                       shared_lora: bool = False) -> tuple[tuple[int, ...], tuple[str, ...]]:
        """Refuse what an adapter cannot be built over (patch sizes, patch layers it cannot copy, LoRAs it cannot
        run beside), before any work; return its sizes, the base first, and its LoRA adapters' names."""
        spec = spec_for(backbone)
        base = spec.base_patch_size
        sizes = sorted({base, *(patch_sizes or (2 * base, 4 * base))})
        bad = [s for s in sizes if s <= 0 or s % base]
        if bad:
            raise ValueError(f"patch sizes must be multiples of the base patch size {base}, not {bad}")
        names = tuple(dict.fromkeys(lora_name(size, shared_lora) for size in sizes[1:]))
        _check_copyable(backbone, spec.base_layers())
        _check_extendable(backbone, names, spec.base_layers())
        return tuple(sizes), names

    # -- what a pipeline reads from its transformer
    @property
    def config(self):
        return self.backbone.config

    @property
    def dtype(self) -> torch.dtype:
        return self.backbone.dtype

    @property
    def device(self) -> torch.device:
        return self.backbone.device

    def cache_context(self, name: str, **kwargs):
        """The backbone's cache context (stock Flux / Wan pipelines enter one per branch)."""
        return self.backbone.cache_context(name, **kwargs)

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """What diffusers calls after each pipeline call: resets the backbone's cache hooks, if it has any."""
        reset = getattr(self.backbone, "_reset_stateful_cache", None)
        if reset is not None:
            reset(recurse=recurse)

    def __getattr__(self, name: str):
        """Whatever else a pipeline or a user asks of a transformer (attention processors, cache hooks,
        gradient checkpointing...) is the backbone's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            backbone = self.__dict__["_modules"].get("backbone")
            if backbone is None or name.startswith("__") or name in HOOK_ATTRIBUTES:
                raise
            if name in REFUSED_CALLS:
                return _refused(name)
            if name in STYLE_CALLS:
                return self._on_stock_backbone(getattr(backbone, name))
            return getattr(backbone, name)

    def get_memory_footprint(self) -> int:
        """Bytes of the backbone, the heads and the LoRA layers, wherever these sit (a components manager's
        offload strategy sizes what to move by it; the backbone's own would leave the adapter out). The LoRA layers
        are not in ``parameters()`` while out of the backbone."""
        tensors = {id(t): t for t in (*self.parameters(), *self.buffers(), *self._adapter_parameters().values())}
        return sum(t.numel() * t.element_size() for t in tensors.values())

    # -- the LoRA layers in the backbone
    def detach(self) -> nn.Module:
        """Take the LoRA layers out of the backbone: it is the stock model again (to save it, or to give it
        back to a pipeline), a style LoRA loaded before included; ``attach`` puts them back, weights and all.
        Calls refuse until then."""
        if self.attached:
            self._use_lora(None)  # a style LoRA's layers as they were found: its adapters alone active
            self._place_lora(False)
            self._stashed = [_stash(layer, self._configs) for _, _, layer in self._shared_places]
            self.attached = False
        return self.backbone

    def attach(self) -> None:
        """Put the LoRA layers that ``detach`` took out back into the backbone (on its device); refuses if a LoRA
        was loaded into ddit's own layers, or if their places changed while detached (a LoRA loaded, fused or
        unloaded there)."""
        loaded = self.changed()
        if loaded:
            raise ValueError(f"the layers ddit's adapter put its LoRA on changed since it was built or detached "
                             f"({type(self.backbone).__name__}.{loaded[0]}"
                             f"{f' and {len(loaded) - 1} more' if len(loaded) > 1 else ''}: a LoRA loaded, fused or "
                             "unloaded there): load LoRAs before building the adapter, and build it again over the "
                             "transformer as it is now (ddit.enable(pipe, adapter_folder), or "
                             "MultiPatchTransformer.from_pretrained; adapter.save_pretrained(folder) first if unsaved)")
        if not self.attached:
            _check_extendable(self.backbone, tuple(self._configs), self.spec.base_layers())
            for (_, _, layer), stashed in zip(self._shared_places, self._stashed):
                _unstash(layer, stashed)
            self._stashed = []
            self._read_styles()
            self._lora_active = "unset"
            self.attached = True
            self.to(self.backbone.device)  # a pipe.to(...) while detached moved the backbone only
        self._place_lora(True)
        self._use_lora(None)

    def changed(self) -> list[str]:
        """The layers ddit's LoRA is on that changed since the adapter was built or detached: a LoRA loaded into
        ddit's own layers, or, while detached, a place that no longer holds what ``detach`` left there."""
        own = {id(layer) for _, _, layer in self._lora_places}
        changed = [name for name, layer in self._named_lora_layers
                   if id(layer) in own and set(layer.lora_A) - set(self._configs)]
        if not self.attached:
            left = {id(layer): layer.get_base_layer() for _, _, layer in self._lora_places}
            left |= {id(layer): layer for _, _, layer in self._shared_places}
            places = {id(layer): (parent, name) for parent, name, layer in (*self._lora_places, *self._shared_places)}
            changed += [name for name, layer in self._named_lora_layers
                        if getattr(*places[id(layer)]) is not left[id(layer)]]
        return changed

    def check_rebuildable(self) -> None:
        """Refuse, as building an adapter over the backbone would, what ``rebuilt`` could not run on (layerwise
        casting, quantized patch layers)."""
        _check_copyable(self.backbone, self.spec.base_layers())

    def rebuilt(self) -> "MultiPatchTransformer":
        """This detached adapter again, over its backbone as it is now (LoRAs loaded into it or removed since the
        detach): the same sizes, LoRA config and weights; refuses as building one does."""
        model = type(self)(self.backbone, self.patch_sizes, lora_config=self.lora_config, shared_lora=self.shared_lora)
        try:
            model.load_adapter_state_dict(self.adapter_state_dict())
        except Exception:
            model.detach()
            raise
        model.set_lean_base(self.lean_base)
        return model

    def _read_styles(self) -> None:
        """What the style LoRA's layers run at base-size steps (their active adapters and whether they are
        disabled), and the layers a LoRA scale reaches: kept when ddit's LoRA goes in, read again after a
        ``set_adapters`` (or the like) changed them. Their parameters stay frozen."""
        self._styles = [([a for a in layer.active_adapters if a not in self._configs], layer.disable_adapters)
                        for _, _, layer in self._shared_places]
        self._style_layers = [m for m in self.backbone.modules()
                              if isinstance(m, LoraLayer) and set(m.lora_A) - set(self._configs)]
        for layer in self._style_layers:  # peft's set_adapter turns them on; distillation trains ddit's only
            for name in layer.adapter_layer_names:
                for key, value in getattr(layer, name).items():
                    for p in [value] if isinstance(value, nn.Parameter) else value.parameters():
                        p.requires_grad_(key in self._configs and p.requires_grad)

    def _on_stock_backbone(self, method: Callable) -> Callable:
        """A diffusers LoRA call that switches or weights the style LoRAs (``STYLE_CALLS``), run on the stock
        backbone: ddit's LoRA leaves for the call and comes back after it, reading what the call set."""
        def call(*args, **kwargs):
            if not self.attached:
                return method(*args, **kwargs)
            self.detach()
            try:
                return method(*args, **kwargs)
            finally:
                self.attach()
        return call

    @property
    def lean_base(self) -> bool:
        return self._lean

    def set_lean_base(self, on: bool) -> None:
        """With ``on``, base-size calls run the bare backbone: the LoRA layers leave it for a base-size call
        and come back for a coarse one. A disabled peft layer still costs a Python call per layer per
        forward, which is visible on small models (benchmarks/test_runtime_overhead.py); a size switch
        costs one attribute swap per layer. For inference (``ddit.enable`` and the sampler turn it on):
        while the layers are out, ``parameters()`` does not list them. Off puts them back."""
        self._lean = on
        if not on and self.attached:
            self._place_lora(True)

    def _place_lora(self, inside: bool) -> None:
        """ddit's own LoRA layers in (``inside``) or out of the backbone, with their peft configs."""
        if inside != self._lora_in:
            for parent, name, layer in self._lora_places:
                setattr(parent, name, layer if inside else layer.get_base_layer())
            others = {k: v for k, v in getattr(self.backbone, "peft_config", {}).items() if k not in self._configs}
            if inside or others:
                self.backbone.peft_config = {**others, **self._configs} if inside else others
            else:
                del self.backbone.peft_config
            self._lora_in = inside

    def _apply(self, fn, recurse=True):
        """``to``, ``half``, ``cuda``... reach the LoRA layers even while they are out of the backbone."""
        if not self._lora_in:
            for _, _, layer in self._lora_places:
                for name in layer.adapter_layer_names:
                    getattr(layer, name)._apply(fn, recurse)
        for stashed in self._stashed:
            for entries in stashed.values():
                for value in entries.values():
                    if isinstance(value, nn.Module):
                        value._apply(fn, recurse)
        return super()._apply(fn, recurse)

    # -- forward
    def forward(self, *args, patch_size: int | None = None, **kwargs):
        """The backbone's forward (same arguments, same output), run at ``patch_size`` (None: the backbone's)."""
        if not self.attached:
            raise RuntimeError("this adapter's LoRA layers were detached from its backbone: call attach() first")
        base = patch_size is None or patch_size == self.base_patch_size
        self._place_lora(not (base and self._lean))
        if self.spec.square_only:
            h, w = self.spec.latent(self._signature.bind(*args, **kwargs).arguments).shape[-2:]
            if h != w:
                raise ValueError(f"{type(self.backbone).__name__} needs a square latent, not {h}x{w}")
        if base:
            self._use_lora(None)
            if type(self.spec).sized is not BackboneSpec.sized:
                given = self._signature.bind(*args, **kwargs)
                given.arguments.update(self.spec.sized(given.arguments, self.base_patch_size))
                args, kwargs = given.args, given.kwargs
            return self.backbone(*args, **kwargs)

        given = self._signature.bind(*args, **kwargs)
        given.apply_defaults()
        given = given.arguments
        given.update(self.spec.sized(given, patch_size))
        refused = [name for name in self.spec.unsupported if given.get(name) is not None]
        refused += image_prompts(given, self.spec)
        if refused:
            raise ValueError(f"{', '.join(refused)} cannot be used at a coarse patch size")
        lora_scale = 1.0
        for name in ("joint_attention_kwargs", "attention_kwargs"):
            if isinstance(given.get(name), dict) and "scale" in given[name]:
                # a LoRA scale: the stock forward's @apply_lora_scale takes it out before the blocks, which warn
                lora_scale = given[name]["scale"]
                given[name] = {k: v for k, v in given[name].items() if k != "scale"}
        x = self.spec.latent(given)
        self._check(patch_size, x.shape[-2:])
        given.update(self._pooled(given, x, patch_size))
        self._use_lora(patch_size)
        with self._style_scaled(lora_scale):
            outputs = self._patched(self.heads[str(patch_size)], patch_size, x, given)
        return self.spec.output(outputs, given["return_dict"])

    @contextmanager
    def _style_scaled(self, scale: float) -> Iterator[None]:
        """A LoRA scale on the style LoRA's active adapters for one call, as the stock forward's
        ``@apply_lora_scale`` puts it on a base-size call; ddit's own LoRA is not scaled, at any size."""
        scaled = {(layer, a): layer.scaling[a] for layer in self._style_layers for a in layer.active_adapters
                  if a in layer.scaling and a not in self._configs} if scale != 1 else {}
        for (layer, a), value in scaled.items():
            layer.scaling[a] = value * scale
        try:
            yield
        finally:
            for (layer, a), value in scaled.items():
                layer.scaling[a] = value

    def _patched(self, head: PatchHead, size: int, x: torch.Tensor, given: dict) -> tuple[torch.Tensor, ...]:
        """The backbone's computation on latent ``x`` with ``head`` as its patchify and unpatchify: its outputs,
        the latent's first."""
        patch = self.spec.patch(size)
        grid = tuple(d // p for d, p in zip(x.shape[2:], patch))
        references = self.spec.references(given)
        beside = {"references": [self._embedded(r, size, given) for r in references]} if references else {}
        tokens = self.spec.forward(head.embed(patchify(x, patch)), grid, size // self.base_patch_size, given, **beside)
        tokens, *others = tokens if isinstance(tokens, tuple) else (tokens,)
        out = self.spec.pack(unpatchify(head.unembed(tokens), patch, grid) + head.skip(x), given)
        if references:  # the pipeline drops the references' outputs: zeros keep the backbone's output shape
            out = torch.cat([out, out.new_zeros(len(out), references[-1].stop - out.shape[1], *out.shape[2:])], 1)
        return (out, *others)

    def check_residuals(self, given: dict, x: torch.Tensor) -> tuple[int, ...]:
        """Refuse a ControlNet's residuals (``BackboneSpec.residuals``, among the bound arguments ``given``) that are
        not on the fine tokens of latent ``x``, which a coarse step averages; return that token grid."""
        grid = tuple(d // p for d, p in zip(x.shape[2:], self.spec.patch(self.base_patch_size)))
        tokens = math.prod(grid)
        for name in self.spec.residuals:
            residuals = given.get(name)
            if residuals is None:
                continue
            if self.spec.references(given):
                raise ValueError(f"{name} (a ControlNet's residuals) cannot be used with dynamic patches beside "
                                 "reference images' tokens (an edit pipeline's): the backbone adds them to the "
                                 "latent's tokens alone")
            if torch.is_tensor(residuals):
                raise ValueError(f"{name} is one tensor, not a list of one residual per ControlNet block")
            wrong = [tuple(r.shape) for r in residuals if r.ndim != 3 or r.shape[1] != tokens]
            if wrong:
                raise ValueError(f"{name} holds a tensor of shape {wrong[0]}, not (batch, {tokens}, dim): dynamic "
                                 f"patches take ControlNet residuals on the latent's {tokens} tokens alone (none of a "
                                 "reference image's), which a coarse step averages")
        return grid

    def _pooled(self, given: dict, x: torch.Tensor, size: int) -> dict:
        """A ControlNet's residuals for a step at ``size`` on latent ``x``, each averaged over the fine tokens a
        coarse token covers (``pool_tokens``)."""
        grid = self.check_residuals(given, x)
        factor = tuple(c // b for c, b in zip(self.spec.patch(size), self.spec.patch(self.base_patch_size)))
        return {name: type(given[name])(pool_tokens(r, grid, factor) for r in given[name])
                for name in self.spec.residuals if given.get(name) is not None}

    def reference_size(self, reference: Reference, size: int) -> int:
        """The patch size a reference image runs at in a step at ``size``: the coarsest of this adapter's sizes up
        to ``size`` that divides the reference's grid, so that a reference of any size runs (at worst at the
        backbone's own patch, where the pipeline resized it to an odd number of tokens)."""
        if reference.grid is None:
            return self.base_patch_size
        dims = [n * self.base_patch_size for n in reference.grid]
        return max(s for s in self.patch_sizes if s <= size and all(d % s == 0 for d in dims))

    def reference_tokens(self, reference: Reference, size: int) -> int:
        """How many tokens a reference runs on in a step at ``size``."""
        scale = self.reference_size(reference, size) // self.base_patch_size
        return (reference.stop - reference.start) // scale**2

    def generated(self, output: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The part of ``output``, of a call with these arguments, that a pipeline keeps (an edit pipeline drops
        its reference images' tokens): what distillation compares."""
        return self.spec.generated(output, self._signature.bind(*args, **kwargs).arguments)

    def _embedded(self, reference: Reference, size: int, given: dict) -> tuple[Reference, torch.Tensor, int]:
        """A reference's tokens embedded at its size (``reference_size``), and that size's scale."""
        size, base = self.reference_size(reference, size), self.base_patch_size
        tokens = self.spec.reference_tokens(given, reference)
        if size == base:
            return reference, self.spec.base_layers()[0](tokens), 1
        latent = unpatchify(tokens, self.spec.patch(base), reference.grid)
        return reference, self.heads[str(size)].embed(patchify(latent, self.spec.patch(size))), size // base

    def _check(self, size: int, hw: tuple[int, int]) -> None:
        sizes = ", ".join(map(str, self.patch_sizes))
        if size % self.base_patch_size:
            raise ValueError(f"patch size {size} is not a multiple of the base patch size {self.base_patch_size}; "
                             f"this adapter runs at {sizes}")
        if size not in self.patch_sizes:
            raise ValueError(f"patch size {size} is not one this adapter was built for; it runs at {sizes}")
        if hw[0] % size or hw[1] % size:
            fits = [s for s in self.patch_sizes if hw[0] % s == 0 and hw[1] % s == 0]
            raise ValueError(f"patch size {size} does not divide the {hw[0]}x{hw[1]} latent; "
                             f"sizes that do: {', '.join(map(str, fits))}")

    def _use_lora(self, size: int | None) -> None:
        """Activate ``size``'s LoRA adapter, or none (the base path).

        Sets peft's per-layer flags directly on a kept list of layers, not through peft's public
        ``set_adapter`` / ``enable_adapters``: those also set ``requires_grad`` (on for the active
        adapter, off for the others), and a leaf whose ``requires_grad`` is turned off after the
        forward that used it gets no gradient. Distillation sums the losses of several sizes before
        one backward (``distill.py``), so switching to the next size would silently drop the
        gradient of the previous one (``tests/test_adapter.py`` guards this). Never fused. A style LoRA's
        layers keep its active adapters (``_styles``) beside ddit's.
        """
        off = size is None or size == self.base_patch_size
        if self._lora_active == (None if off else size):
            return
        self._lora_active = None if off else size
        name = None if off else self._lora_name(size)
        for _, _, layer in self._lora_places:  # in the backbone or not: the flags travel with the layer
            layer._disable_adapters = off
            if not off:
                layer._active_adapter = name
        for (_, _, layer), (styles, disabled) in zip(self._shared_places, self._styles):
            layer._active_adapter = list(styles) if off else [*([] if disabled else styles), name]
            layer._disable_adapters = disabled if off else False

    @contextmanager
    def _lora_of(self, size: int | None) -> Iterator[None]:
        """``size``'s LoRA for a moment: a checkpointed block recomputed in the backward needs the LoRA of the
        size that ran it, and distillation runs every size's forward before one backward."""
        was = self._lora_active
        self._use_lora(size)
        try:
            yield
        finally:
            self._use_lora(was)

    def _lora_name(self, size: int) -> str:
        return lora_name(size, self.shared_lora)

    # -- parameters, saving and loading
    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's own parameters by name (heads and LoRA), not the backbone's, whole.

        Under FSDP this gathers the shards: every process must call it."""
        return {name: whole(p.detach()) for name, p in self._adapter_parameters().items()}

    def trainable_parameters(self, sizes: Sequence[int] | None = None) -> list[nn.Parameter]:
        """What distillation trains: the heads and the LoRA branches (FSDP's shards once it wrapped them), of
        ``sizes`` only if given (the shared LoRA belongs to every coarse size)."""
        if sizes is None:
            return list(self._adapter_parameters().values())
        names = {str(s) for s in sizes} | {self._lora_name(s) for s in sizes}
        return [p for name, p in self._adapter_parameters().items() if _size_of(name) in names]

    def _adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The LoRA's parameters by their names in the backbone (``backbone.<layer>.lora_A.patch4.weight``), wherever
        its layers are (in the backbone, out of it, or out of a style LoRA's layers), then the heads': in the order
        of ``named_parameters``, which optimizer states keep."""
        held = {id(layer): stashed for (_, _, layer), stashed in zip(self._shared_places, self._stashed)}
        params = {}
        for qualified, layer in self._named_lora_layers:
            for field in layer.adapter_layer_names:
                entries = held[id(layer)][field] if id(layer) in held else getattr(layer, field)
                for key, value in entries.items():
                    if key not in self._configs:
                        continue
                    prefix = f"backbone.{qualified}.{field}.{key}"
                    params |= ({prefix: value} if isinstance(value, nn.Parameter)
                               else dict(value.named_parameters(prefix)))
        return params | dict(self.heads.named_parameters("heads"))

    def save_pretrained(self, path: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Write the adapter's weights (safetensors), its LoRA config and its own config to ``path``.

        ``state_dict``: the weights to write, as ``adapter_state_dict()`` gave them (under FSDP every
        process gathers them, then one writes); by default this adapter's own."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        state = self.adapter_state_dict() if state_dict is None else state_dict
        save_file({k: v.contiguous() for k, v in state.items()}, path / WEIGHTS_NAME)
        self.lora_config.save_pretrained(path)
        (path / CONFIG_NAME).write_text(json.dumps({
            "backbone_class": type(self.backbone).__name__,
            "backbone_config_hash": config_hash(self.backbone),
            "base_patch_size": self.base_patch_size,
            "patch_sizes": list(self.patch_sizes),
            "shared_lora": self.shared_lora,
        }, indent=2))

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | None = None,
                    commit_message: str = "Upload a ddit multi-patch adapter",
                    state_dict: dict[str, torch.Tensor] | None = None, base_model: str | None = None) -> str:
        """Save the adapter to the Hub repository ``repo_id`` (created if missing), where ``from_pretrained`` and
        ``ddit.enable(pipe, repo_id)`` find it; returns the commit's URL. A second expert's adapter left there
        (``transformer_2/``) goes: it would be loaded beside this one. ``state_dict`` as ``save_pretrained``
        takes it (under FSDP every process gathers ``adapter_state_dict()``, then one pushes). A repository
        without a README.md gets a model card (``ddit.hub_card``) that names ``base_model``, the Hub id of the
        model the adapter was distilled for; one with a card keeps it. A folder ``ddit distill`` wrote, Wan 2.2's
        second expert inside: ``huggingface_hub.upload_folder``."""
        from huggingface_hub import HfApi

        from .hub_card import adapter_card

        if base_model is not None and not REPO_ID.fullmatch(base_model):
            raise ValueError(f"base_model={base_model!r} is not a Hub repository id (owner/name): the card's metadata "
                             "names the Hub model the adapter was distilled for; pass its id, or none")
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, state_dict)
            if not api.file_exists(repo_id, "README.md"):
                adapter_card(self, repo_id, base_model).save(Path(folder) / "README.md")
            return api.upload_folder(repo_id=repo_id, folder_path=folder, commit_message=commit_message,
                                     delete_patterns=["transformer_2/*"]).commit_url

    @classmethod
    def from_pretrained(cls, backbone: nn.Module, path: str | os.PathLike,
                        revision: str | None = None) -> "MultiPatchTransformer":
        """Wrap ``backbone`` with the adapter saved at ``path``: a folder, or a Hub repository id (``owner/name``,
        at ``revision``); refuses an adapter made for another backbone."""
        path = local_or_hub(path, ADAPTER_FILES, revision)
        try:
            meta = json.loads((path / CONFIG_NAME).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"no multi-patch adapter at {path}: {CONFIG_NAME} is missing") from None
        saved = f"{meta['backbone_class']} (config {meta['backbone_config_hash']})"
        given = f"{type(backbone).__name__} (config {config_hash(backbone)})"
        if saved != given:
            raise CheckpointError(f"the adapter at {path} was made for {saved}, not for this {given}: a backbone "
                                  "with another class or config (layers, widths, patch size) needs its own adapter; "
                                  "distil one for it with `ddit distill --pipeline FOLDER --prompts FILE` (or "
                                  "--backbone FOLDER --latents FILE)")
        file = path / WEIGHTS_NAME
        state = load_safetensors(file)  # before wrapping, so that a bad file leaves the backbone as it was
        model = cls(backbone, meta["patch_sizes"], lora_config=LoraConfig.from_pretrained(path),
                    shared_lora=meta.get("shared_lora", False))
        try:
            model.load_adapter_state_dict(state, source=file)
        except Exception:  # the LoRA layers leave again: a refused adapter changes nothing
            model.detach()
            raise
        return model

    def load_adapter_state_dict(self, state: dict[str, torch.Tensor], source: str | os.PathLike = "state") -> None:
        """Load what ``adapter_state_dict`` gave; refuses, naming ``source``, one of another layout.

        Under FSDP each process keeps its shard of the whole weights: every process must call it."""
        params = self._adapter_parameters()
        expected = params.keys()
        if state.keys() != expected:
            missing, extra = sorted(expected - state.keys()), sorted(state.keys() - expected)
            raise CheckpointError(f"adapter weights in {source} do not fit this adapter: "
                                  f"missing {missing[:3]}, unexpected {extra[:3]}; the file belongs to another "
                                  "adapter layout (sizes, LoRA targets): save it again, or distil a new one")
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(sharded_like(state[name], p))


def lora_name(size: int, shared: bool) -> str:
    """ddit's LoRA adapter for coarse patch ``size`` (one ``shared`` by every coarse size: ``coarse``)."""
    return "coarse" if shared else f"patch{size}"


def is_ddit_adapter(name: str) -> bool:
    """Whether a peft adapter's name is one ddit's adapters use (another, a style LoRA's)."""
    return re.fullmatch(r"patch\d+|coarse", name) is not None


def _inject(backbone: nn.Module, config: LoraConfig, names: Sequence[str], styled: dict) -> None:
    """peft's injection of ddit's adapters ``names``, all or nothing: any failure leaves the backbone as it was (a
    style LoRA's layers ``styled`` included); a layer peft puts no LoRA on (torchao's int4 weights, a module type
    it does not know) is refused, naming it."""
    had_config, name = hasattr(backbone, "peft_config"), None
    try:
        with warnings.catch_warnings():  # peft warns about a second adapter: one per size is the point
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            for name in names:
                inject_adapter_in_model(config, backbone, adapter_name=name)
    except Exception as err:
        modules = list(backbone.named_modules())  # peft goes in their order: the first target without ``name``
        failed = next((place for place, m in modules if check_target_module_exists(config, place)
                       and not (isinstance(m, LoraLayer) and name in m.lora_A)), "?")
        for place, layer in [(n, m) for n, m in modules if isinstance(m, LoraLayer)]:
            if id(layer) in styled:
                for name in set(names) & set(layer.lora_A):
                    layer.delete_adapter(name)
            else:
                parent, _, child = place.rpartition(".")
                setattr(backbone.get_submodule(parent), child, layer.get_base_layer())
        for layer, active, disabled in styled.values():
            layer._active_adapter, layer._disable_adapters = active, disabled
        for name in names:
            getattr(backbone, "peft_config", {}).pop(name, None)
        if not had_config and hasattr(backbone, "peft_config"):
            del backbone.peft_config
        if not isinstance(err, (ValueError, TypeError, NotImplementedError)):  # not peft refusing a layer
            raise
        raise ValueError(f"peft puts no LoRA on {type(backbone).__name__}.{failed} ({type(err).__name__}: {err}); "
                         "the transformer is left as it was. Quantized blocks: use a storage peft's LoRA takes (a "
                         "GGUF file, bitsandbytes, torchao's int8, quanto)") from err


def _check_copyable(backbone: nn.Module, base_layers: Sequence[nn.Module]) -> None:
    """Refuse, before any change, patch layers the coarse heads cannot start from (they copy the patch embedding
    and the output projection): weights not here, stored in float8 or in integers no quantizer reads back, or
    under layerwise casting."""
    model = type(backbone).__name__
    names = [name for name, m in backbone.named_modules() if any(m is layer for layer in base_layers)]
    weights = [layer.weight for layer in base_layers]
    # inside ``with torch.device("meta")`` the heads are shapes too (benchmarks/real_shapes.py counts FLOPs so)
    if any(w.is_meta for w in weights) and not torch.empty(0).is_meta:
        raise ValueError(f"{model}'s {' and '.join(names)} have no weights here (meta device: sequential CPU "
                         "offload, or a model built without loading them); build the adapter over the loaded "
                         "model, before any offloading")
    if _is_layerwise_casting_active(backbone):
        raise ValueError(f"{model} has layerwise casting enabled: LoRA layers added now would stay in its storage "
                         "dtype, outside its casting; build the adapter (or call ddit.enable) first, then "
                         "enable_layerwise_casting on pipe.transformer")
    stored = [w.dtype for w in map(float_weight, base_layers) if not w.is_floating_point() or w.dtype.itemsize < 2]
    if stored:
        raise ValueError(f"{model}'s {' and '.join(names)} are stored as {stored[0]} (float8, or integers no "
                         "quantizer reads back), and the coarse heads are copied from them: load the model with "
                         "these layers left as they were trained (the quantization config's modules_to_not_convert: "
                         f"{names})")


def _check_extendable(backbone: nn.Module, names: Sequence[str], base_layers: Sequence[nn.Module]) -> None:
    """Refuse what would bypass, share or split the LoRA layers the adapter (adapters ``names``) puts on the
    blocks' linear layers: checked when they go in, and again when ``attach`` puts them back after a ``disable``.
    A style LoRA's unfused layers may carry them beside its own adapters."""
    model = type(backbone).__name__
    if getattr(backbone, "_parallel_config", None) is not None:
        raise ValueError(f"{model} runs with context or tensor parallelism (enable_parallelism), which {_PARALLEL}")
    if any(_runs_fused_qkv(m) for m in backbone.modules()):
        raise ValueError(f"{model} has fused attention projections (fuse_qkv_projections), which would bypass the "
                         "LoRA layers the adapter puts on to_q, to_k and to_v: call unfuse_qkv_projections() first")
    tuners = {name: m for name, m in backbone.named_modules() if isinstance(m, BaseTunerLayer)}
    taken = sorted({a for m in tuners.values() for a in getattr(m, "lora_A", {}) if a in names})
    if taken:
        raise ValueError(f"{model} already carries LoRA adapters named {taken}, which are ddit's: an earlier ddit "
                         "adapter is on it (ddit.disable(pipe) or adapter.detach() first), or a LoRA was loaded under "
                         "that name (load it under another adapter_name)")
    problems = {name: "not a LoRA (another peft tuner)" for name, m in tuners.items() if not isinstance(m, LoraLayer)}
    problems |= {name: "fused into the weights but not unloaded, so its layer runs no other LoRA"
                 for name, m in tuners.items() if isinstance(m, LoraLayer) and m.merged}
    problems |= {name: "on the patch embedding or output projection, which coarse steps replace by their own"
                 for name, m in tuners.items() if any(m is layer for layer in base_layers)}
    if problems:
        name, why = next(iter(problems.items()))
        raise ValueError(f"{model}.{name} carries an adapter that ddit's LoRA cannot run beside ({why}"
                         f"{f'; {len(problems) - 1} more layers too' if len(problems) > 1 else ''}): fuse it into "
                         "the weights (pipe.fuse_lora(); pipe.unload_lora_weights()) before ddit.enable")


def _stash(layer: LoraLayer, names) -> dict[str, dict]:
    """Take the adapters ``names`` out of a style LoRA's ``layer``, everything peft keeps per adapter (what its
    ``delete_adapter`` deletes), and return them for ``_unstash``."""
    return {field: {n: getattr(layer, field).pop(n) for n in names if n in getattr(layer, field)}
            for field in (*layer.adapter_layer_names, *layer.other_param_names, "lora_variant")
            if hasattr(layer, field)}


def _unstash(layer: LoraLayer, stashed: dict[str, dict]) -> None:
    for field, entries in stashed.items():
        getattr(layer, field).update(entries)


def _runs_fused_qkv(module: nn.Module) -> bool:
    """Whether an attention module computes q, k and v with its fused ``to_qkv`` (after ``fuse_qkv_projections``).
    The flag decides for diffusers' newer attention classes; the legacy ``Attention`` keeps it after unfusing and
    lets its processor decide (a ``Fused...`` one reads ``to_qkv``)."""
    if not getattr(module, "fused_projections", False):
        return False
    return not isinstance(module, Attention) or "Fused" in type(getattr(module, "processor", None)).__name__


def _refused(name: str) -> Callable[..., None]:
    """What ``adapter.name`` gives instead of the backbone's method: a call that refuses, saying why."""
    def refused(*args, **kwargs):
        raise ValueError(f"{name}: {REFUSED_CALLS[name]}")
    return refused


def _size_of(name: str) -> str:
    """The size an adapter parameter belongs to: ``heads.4.…`` -> "4", ``….lora_A.patch4.weight`` -> "patch4"."""
    return name.split(".")[1] if name.startswith("heads.") else name.split(".lora_")[1].split(".")[1]

