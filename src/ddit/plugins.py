"""Extension points: pluggy hook specifications and the plugin loader.

A third-party package extends ddit by exposing a module under the ``ddit``
entry-point group whose functions implement these hooks, for example::

    # pyproject.toml of the plugin
    [project.entry-points.ddit]
    my_policies = "my_package.ddit_hooks"

    # my_package/ddit_hooks.py
    from ddit.plugins import hookimpl

    @hookimpl
    def ddit_policies():
        return [MyPolicy]

A plugin that fails to import is reported (with its distribution's name) and
skipped; the others still load.
"""

from __future__ import annotations

import warnings
from functools import lru_cache
from importlib.metadata import entry_points

import pluggy

PROJECT = "ddit"
ENTRY_POINT_GROUP = "ddit"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


class DditHookSpecs:
    """Each hook returns a list of classes that ddit registers by their ``name``."""

    @hookspec
    def ddit_policies(self) -> list:
        """Patch policies (subclasses of ``ddit.policies.PatchPolicy``)."""

    @hookspec
    def ddit_backbones(self) -> list:
        """Backbone specs, telling the multi-patch adapter how a model class patchifies."""

    @hookspec
    def ddit_caches(self) -> list:
        """Feature caches (e.g. TeaCache-like) to compose with patch policies."""

    @hookspec
    def ddit_metrics(self) -> list:
        """Quality metrics for the ablation harness."""


@lru_cache(maxsize=1)
def plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every installed plugin that imports."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(DditHookSpecs)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist else "unknown distribution"
        try:
            module = ep.load()
        except Exception as err:  # a broken plugin must not break ddit
            warnings.warn(f"ddit plugin {ep.name!r} from {dist} failed to load and is skipped: {err!r}",
                          stacklevel=2)
            continue
        pm.register(module, name=f"{dist}:{ep.name}")
    return pm


def collect(hook: str) -> list:
    """Everything all plugins return for ``hook`` (e.g. ``"ddit_policies"``), flattened."""
    results = getattr(plugin_manager().hook, hook)()
    return [item for result in results for item in (result or [])]
