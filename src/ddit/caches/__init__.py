"""Feature caches: skip a sample's transformer blocks at some steps, composable with every patch policy.

See docs/caches.md for the design, the built-ins and writing new ones.
"""

from .base import Cache, Group
from .registry import BUILTIN_CACHES, available_caches, diffusers_caches, get_cache
from .stack import SkipAll, StackRun, StandIn, blocks_of, replace_stack
from .taylorseer import TaylorSeer
from .teacache import (
    PUBLISHED_FITS, TeaCache, TeaCacheRecorder, delta_for_share, fit_teacache, load_teacache_fit, modulated_input,
    skipped_share, write_teacache_fit,
)

__all__ = [
    "Cache", "Group", "BUILTIN_CACHES", "available_caches", "diffusers_caches", "get_cache", "SkipAll", "StackRun",
    "StandIn", "blocks_of", "replace_stack", "TaylorSeer", "TeaCache", "TeaCacheRecorder", "PUBLISHED_FITS",
    "delta_for_share", "fit_teacache", "load_teacache_fit", "modulated_input", "skipped_share", "write_teacache_fit",
]
