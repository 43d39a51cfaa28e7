"""Cache names: the built-ins plus whatever installed plugins add (see ``ddit.plugins``)."""

from __future__ import annotations

import warnings

from .. import plugins
from .base import Cache
from .taylorseer import TaylorSeer
from .teacache import TeaCache

BUILTIN_CACHES: tuple[type[Cache], ...] = (TeaCache, TaylorSeer)


def available_caches() -> dict[str, type[Cache]]:
    """Every cache by name, sorted. A plugin cannot shadow a built-in or an earlier plugin."""
    caches = {cls.name: cls for cls in BUILTIN_CACHES}
    for cls in plugins.collect("ddit_caches"):
        name = getattr(cls, "name", None)
        if not (isinstance(cls, type) and issubclass(cls, Cache) and isinstance(name, str)):
            warnings.warn(f"plugin cache {cls!r} is skipped: not a Cache subclass with a name",
                          plugins.PluginWarning, stacklevel=2)
        elif name in caches or name == "none":
            warnings.warn(f"plugin cache {cls.__module__}.{cls.__qualname__} is skipped: the name {name!r} "
                          "is taken", plugins.PluginWarning, stacklevel=2)
        else:
            caches[name] = cls
    return dict(sorted(caches.items()))


def get_cache(name: str, **params) -> Cache | None:
    """A new cache by name, e.g. ``get_cache("teacache", delta=0.4)``; ``"none"`` is no cache."""
    if name == "none":
        return None
    caches = available_caches()
    if name not in caches:
        raise ValueError(f"unknown feature cache {name!r}; available: none, {', '.join(caches)}")
    return caches[name](**params)
