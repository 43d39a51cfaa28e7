"""Policy names: the built-ins plus whatever installed plugins add (see ``ddit.plugins``)."""

from __future__ import annotations

from .. import plugins
from .base import PatchPolicy
from .budget import BudgetPolicy
from .fixed import BaselinePolicy, FixedPolicy
from .oracle import OracleBudgetPolicy, OraclePolicy
from .percentile import (
    CoarseToFinePolicy, FirstOrderPolicy, MeanPolicy, ProbedThirdOrderPolicy, SecondOrderPolicy, ThirdOrderPolicy,
)
from .progressive import ProgressiveResolution

BUILTIN_POLICIES: tuple[type[PatchPolicy], ...] = (
    ThirdOrderPolicy, SecondOrderPolicy, FirstOrderPolicy, MeanPolicy, CoarseToFinePolicy, ProbedThirdOrderPolicy,
    FixedPolicy, BaselinePolicy, OraclePolicy, OracleBudgetPolicy, BudgetPolicy, ProgressiveResolution,
)


def available_policies() -> dict[str, type[PatchPolicy]]:
    """Every policy by name, sorted. A plugin cannot shadow a built-in or an earlier plugin."""
    return plugins.named_classes(BUILTIN_POLICIES, "ddit_policies", PatchPolicy)


def get_policy(name: str, **params) -> PatchPolicy:
    """A new policy by name, e.g. ``get_policy("third_order", tau=1e-4, rho=90)``."""
    policies = available_policies()
    if name not in policies:
        raise ValueError(f"unknown patch policy {name!r}; available: {', '.join(policies)}")
    return policies[name](**params)
