"""Policy names: the built-ins plus whatever installed plugins add (see ``ddit.plugins``)."""

from __future__ import annotations

import warnings

from .. import plugins
from .base import PatchPolicy
from .budget import BudgetPolicy
from .fixed import BaselinePolicy, FixedPolicy
from .oracle import OraclePolicy
from .percentile import FirstOrderPolicy, MeanPolicy, SecondOrderPolicy, ThirdOrderPolicy

BUILTIN_POLICIES: tuple[type[PatchPolicy], ...] = (
    ThirdOrderPolicy, SecondOrderPolicy, FirstOrderPolicy, MeanPolicy,
    FixedPolicy, BaselinePolicy, OraclePolicy, BudgetPolicy,
)


def available_policies() -> dict[str, type[PatchPolicy]]:
    """Every policy by name, sorted. A plugin cannot shadow a built-in or an earlier plugin."""
    policies = {cls.name: cls for cls in BUILTIN_POLICIES}
    for cls in plugins.collect("ddit_policies"):
        name = getattr(cls, "name", None)
        if not (isinstance(cls, type) and issubclass(cls, PatchPolicy) and isinstance(name, str)):
            warnings.warn(f"plugin policy {cls!r} is skipped: not a PatchPolicy subclass with a name",
                          plugins.PluginWarning, stacklevel=2)
        elif name in policies:
            warnings.warn(f"plugin policy {cls.__module__}.{cls.__qualname__} is skipped: the name {name!r} "
                          "is taken", plugins.PluginWarning, stacklevel=2)
        else:
            policies[name] = cls
    return dict(sorted(policies.items()))


def get_policy(name: str, **params) -> PatchPolicy:
    """A new policy by name, e.g. ``get_policy("third_order", tau=1e-4, rho=90)``."""
    policies = available_policies()
    if name not in policies:
        raise ValueError(f"unknown patch policy {name!r}; available: {', '.join(policies)}")
    return policies[name](**params)
