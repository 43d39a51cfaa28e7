"""The ablation harness behind ``ddit-ablate``: patch policies x feature caches against the
baseline on one model, resumable, measured and reported (docs/ablation.md).

It composes the core (sampling, policies, caches, the testbed evaluator); nothing in the
core imports it.
"""

from .api import run
from .config import AblationConfig, ConfigMismatch, Row, build_config, effective_params, parse_params
from .report import summarize
from .runner import load_images, read_results, run_ablation

__all__ = ["AblationConfig", "ConfigMismatch", "Row", "build_config", "effective_params", "parse_params",
           "run", "summarize", "load_images", "read_results", "run_ablation"]
