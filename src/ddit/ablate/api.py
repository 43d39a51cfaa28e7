"""``ddit.ablate.run``: the harness from Python, with policies and caches a script defines.

A policy or cache may be a name (built-in or plugin), a class, or an instance. A class
from a script joins the registries for the run (as a plugin would); an instance becomes
its class's name and its parameters, read back from the attributes named like its
constructor's parameters, so that the run's configuration, and a resumed run, can say
what ran.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .. import plugins
from ..caches import Cache, available_caches
from ..policies import PatchPolicy, available_policies
from .config import NO_CACHE, build_config, effective_params
from .report import summarize
from .runner import run_ablation

_counter = itertools.count()


def run(out: str | Path, policies: Iterable = ("third_order",), caches: Iterable = (NO_CACHE, "teacache"), *,
        model=None, evaluator=None, progress: bool = True, **settings) -> list[dict]:
    """Run (or resume) an ablation into ``out`` and return its summary, one record per row.

    ``settings`` are ``build_config``'s: ``steps``, ``fewer_steps``, ``num_per_class``, ``seed``,
    ``guidance``, ``batch_size``, ``policy_params``, ``cache_params``, ``sweeps``. ``model`` defaults
    to the testbed's shipped base model and adapter, ``evaluator`` to the testbed's; a run resumes only with
    the same model (its weights' hash), device and dtype.
    """
    from ..testbed.evaluator import load_evaluator
    from .models import fingerprint, folders, load_model, state_fingerprint

    policy_names, policy_params, policy_classes = _resolve(policies, PatchPolicy, available_policies)
    cache_names, cache_params, cache_classes = _resolve(caches, Cache, available_caches)
    for given, found in (("policy_params", policy_params), ("cache_params", cache_params)):
        settings[given] = {**found, **settings.get(given, {})}
    with _registered(policy_classes, cache_classes):
        if model is None:
            found_folders = folders()
            model, settings["model"] = load_model(found_folders), fingerprint(found_folders)
        else:
            settings.setdefault("model", state_fingerprint(model))
        settings.setdefault("device", str(model.device))
        settings.setdefault("dtype", str(model.dtype).removeprefix("torch."))
        config = build_config(policy_names, cache_names, **settings)
        run_ablation(config, model, out, progress=progress)
        return summarize(config, out, evaluator or load_evaluator())


def _resolve(items: Iterable, base: type, known) -> tuple[list[str], dict[str, dict], list[type]]:
    """Names, parameters by name (from instances) and the classes to register (from the script)."""
    names, params, classes = [], {}, []
    registered = known()
    for item in items:
        if isinstance(item, str):
            names.append(item)
            continue
        cls = item if isinstance(item, type) else type(item)
        if not (issubclass(cls, base) and isinstance(getattr(cls, "name", None), str)):
            raise TypeError(f"{item!r} is neither a name nor a {base.__name__} (a subclass with a `name`)")
        if registered.get(cls.name, cls) is not cls:
            raise ValueError(f"the name {cls.name!r} of {cls.__qualname__} is taken by {registered[cls.name]!r}; "
                             "give your class another `name`")
        if cls.name not in registered:
            classes.append(cls)
        if not isinstance(item, type):
            if cls.name in params:
                raise ValueError(f"two instances of {cls.name!r}: give one, or vary a parameter with sweeps=")
            params[cls.name] = effective_params(item)
        names.append(cls.name)
    return names, params, classes


@contextmanager
def _registered(policies: list[type], caches: list[type]) -> Iterator[None]:
    """The script's classes in the registries while the run lasts, as a plugin's would be."""

    class ScriptPlugin:
        @plugins.hookimpl
        def ddit_policies(self):
            return policies

        @plugins.hookimpl
        def ddit_caches(self):
            return caches

    manager = plugins.plugin_manager()
    name = f"ddit-ablate-script-{next(_counter)}"
    manager.register(ScriptPlugin(), name=name)
    try:
        yield
    finally:
        manager.unregister(name=name)
