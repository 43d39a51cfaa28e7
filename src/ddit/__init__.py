"""ddit: dynamic patch sizes for diffusion transformers (DDiT)."""

__version__ = "0.1.0"

from .adapter import MultiPatchTransformer
from .pipelines import disable, enable, summary

__all__ = ["MultiPatchTransformer", "disable", "enable", "summary"]
