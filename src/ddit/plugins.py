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

A plugin that fails to import, or whose hook raises, is reported with its
distribution's name (a ``PluginWarning``) and skipped; the others still load.
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


class PluginWarning(UserWarning):
    """A plugin was skipped; filter on this to silence or escalate it."""


def _skip(plugin: str, err: Exception) -> None:
    warnings.warn(f"ddit plugin {plugin} failed and is skipped: {err!r}", PluginWarning, stacklevel=3)


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
        name = f"{ep.dist.name if ep.dist else 'unknown distribution'}:{ep.name}"
        try:
            pm.register(ep.load(), name=name)
        except Exception as err:  # a broken plugin must not break ddit
            _skip(name, err)
    return pm


def collect(hook: str) -> list:
    """Everything all plugins return for ``hook`` (e.g. ``"ddit_policies"``), flattened.

    Each plugin's hook runs on its own, so one that raises cannot hide the others.
    """
    items = []
    for impl in getattr(plugin_manager().hook, hook).get_hookimpls():
        try:
            items.extend(impl.function() or [])
        except Exception as err:
            _skip(impl.plugin_name, err)
    return items


def named_classes(builtins, hook: str, base: type, *, reserved: tuple[str, ...] = ()) -> dict[str, type]:
    """Built-in classes plus those plugins return for ``hook``, by their ``name``, sorted.

    A plugin class that is no ``base`` subclass with a string ``name``, or whose name
    is taken (by a built-in, an earlier plugin or ``reserved``), is skipped with a warning.
    """
    kind = base.__name__
    found = {cls.name: cls for cls in builtins}
    for cls in collect(hook):
        name = getattr(cls, "name", None)
        if not (isinstance(cls, type) and issubclass(cls, base) and isinstance(name, str)):
            warnings.warn(f"plugin {kind} {cls!r} is skipped: not a {kind} subclass with a name",
                          PluginWarning, stacklevel=3)
        elif name in found or name in reserved:
            warnings.warn(f"plugin {kind} {cls.__module__}.{cls.__qualname__} is skipped: the name {name!r} "
                          "is taken", PluginWarning, stacklevel=3)
        else:
            found[name] = cls
    return dict(sorted(found.items()))
