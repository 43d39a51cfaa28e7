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
