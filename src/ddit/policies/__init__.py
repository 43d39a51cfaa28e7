"""Patch policies: which patch size each sample uses at each denoising step (DDiT Sec. 2.2).

Sizes are in latent pixels. See docs/policies.md for driving a policy from plain tensors
and for writing and publishing new ones.
"""

from .base import Decision, PatchPolicy, Probe, Step, check_candidates, largest_below, trace_rows
from .budget import BudgetPolicy, budget_fraction, calibrate_tau, smallest_threshold
from .differences import finite_difference, patch_std, percentile
from .fixed import BaselinePolicy, FixedPolicy
from .oracle import OracleBudgetPolicy, OraclePolicy
from .percentile import (
    CoarseToFinePolicy, FirstOrderPolicy, MeanPolicy, ProbedThirdOrderPolicy, SecondOrderPolicy, ThirdOrderPolicy,
)
from .progressive import ProgressiveResolution, dct_resize, power_law, spectral_switch
from .registry import BUILTIN_POLICIES, available_policies, get_policy

__all__ = [
    "Decision", "PatchPolicy", "Probe", "Step", "check_candidates", "largest_below", "trace_rows",
    "BudgetPolicy", "budget_fraction", "calibrate_tau", "smallest_threshold",
    "finite_difference", "patch_std", "percentile",
    "BaselinePolicy", "FixedPolicy", "OracleBudgetPolicy", "OraclePolicy",
    "CoarseToFinePolicy", "FirstOrderPolicy", "MeanPolicy", "ProbedThirdOrderPolicy", "SecondOrderPolicy",
    "ThirdOrderPolicy",
    "ProgressiveResolution", "dct_resize", "power_law", "spectral_switch",
    "BUILTIN_POLICIES", "available_policies", "get_policy",
]
