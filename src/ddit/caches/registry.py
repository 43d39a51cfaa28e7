"""Cache names: the built-ins plus whatever installed plugins add (see ``ddit.plugins``)."""

from __future__ import annotations

from .. import plugins
from .base import Cache
from .taylorseer import TaylorSeer
from .teacache import TeaCache

BUILTIN_CACHES: tuple[type[Cache], ...] = (TeaCache, TaylorSeer)


def available_caches() -> dict[str, type[Cache]]:
    """Every cache by name, sorted. A plugin cannot shadow a built-in or an earlier plugin."""
    return plugins.named_classes(BUILTIN_CACHES, "ddit_caches", Cache, reserved=("none",))


def get_cache(name: str, **params) -> Cache | None:
    """A new cache by name, e.g. ``get_cache("teacache", delta=0.4)``; ``"none"`` is no cache."""
    if name == "none":
        return None
    caches = available_caches()
    if name not in caches:
        raise ValueError(f"unknown feature cache {name!r}; available: none, {', '.join(caches)}")
    return caches[name](**params)


def diffusers_caches() -> dict[str, type]:
    """diffusers' cache hooks that work under dynamic patches, by the name ``ddit-ablate --pipeline``
    gives them; ``ddit.enable(pipe, ..., cache=Config(...))`` takes their configs. They hook the
    blocks and keep their state per cache context, which the runtime gives each group of one size
    (and resets when the grouping changes). Hooks on the model's own forward (FasterCache, Pyramid
    Attention Broadcast) or that count steps against a per-step table (MagCache) are not here:
    coarse steps bypass that forward, and the resets restart their step count."""
    from diffusers.hooks import FirstBlockCacheConfig, TaylorSeerCacheConfig

    return {"first_block_cache": FirstBlockCacheConfig, "diffusers_taylorseer": TaylorSeerCacheConfig}
