"""Backbone specs: how each family of diffusers transformers patchifies.

The adapter picks a spec by the backbone's class (or a parent class). ddit
ships one spec per family; a plugin adds a family by returning its
``BackboneSpec`` subclass from the ``ddit_backbones`` hook.
"""

from __future__ import annotations

from torch import nn

from .. import plugins
from .base import (IP_ADAPTER, BackboneSpec, Reference, as_batch, controlnet_sample, patchify, pool_tokens,
                   sincos_positions, unpatchify)
from .chroma import ChromaSpec
from .dit import DiTSpec
from .flux import FluxSpec
from .flux2 import Flux2Spec
from .flux3 import Flux3Spec
from .hunyuanimage import HunyuanImageSpec
from .hunyuanvideo15 import HunyuanVideo15Spec
from .ltx import LTXVideoSpec
from .ltx2 import LTX2Spec
from .pixart import PixArtSpec
from .qwenimage import QwenImageSpec
from .qwenimage21 import QwenImage21Spec
from .sana import SanaSpec
from .sd3 import SD3Spec
from .skyreels_v2 import SkyReelsV2Spec
from .wan import WanSpec
from .zimage import ZImageSpec

BUILTIN_SPECS: tuple[type[BackboneSpec], ...] = (DiTSpec, PixArtSpec, SanaSpec, SD3Spec, FluxSpec, Flux2Spec, Flux3Spec,
                                                 ChromaSpec, QwenImageSpec, QwenImage21Spec, WanSpec, HunyuanImageSpec,
                                                 HunyuanVideo15Spec, LTXVideoSpec, LTX2Spec, ZImageSpec,
                                                 SkyReelsV2Spec)

__all__ = ["BUILTIN_SPECS", "IP_ADAPTER", "BackboneSpec", "ChromaSpec", "DiTSpec", "FluxSpec", "Flux2Spec", "Flux3Spec",
           "HunyuanImageSpec", "HunyuanVideo15Spec", "LTX2Spec", "LTXVideoSpec", "PixArtSpec", "QwenImageSpec",
           "QwenImage21Spec", "Reference", "SanaSpec", "SD3Spec", "SkyReelsV2Spec", "WanSpec", "ZImageSpec", "as_batch",
           "controlnet_sample", "patchify", "pool_tokens", "sincos_positions", "spec_for", "specs", "unpatchify"]


def specs() -> dict[str, type[BackboneSpec]]:
    """Every known spec by model class name; a plugin's spec overrides a built-in one."""
    return {spec.model_class: spec for spec in (*BUILTIN_SPECS, *plugins.collect("ddit_backbones"))}


def spec_for(model: nn.Module) -> BackboneSpec:
    """The spec of ``model``'s class, bound to ``model``."""
    known = specs()
    inner = getattr(model, "_orig_mod", None)
    if isinstance(inner, nn.Module):
        raise TypeError(f"the transformer is a torch.compile wrapper around {type(inner).__name__}: build the "
                        "adapter (or call ddit.enable) on the model itself, then compile its blocks with "
                        "pipe.transformer.compile_repeated_blocks(), which coarse steps run too")
    for cls in type(model).__mro__:
        if cls.__name__ in known:
            return known[cls.__name__](model)
    raise TypeError(
        f"ddit has no backbone spec for {type(model).__name__}; supported: {', '.join(sorted(known))} "
        "(a plugin adds one through the 'ddit_backbones' hook)"
    )
