"""ddit: dynamic patch sizes for diffusion transformers (DDiT)."""

__version__ = "0.1.0"

from .adapter import MultiPatchTransformer
from .pipelines import disable, enable, summary
from .progressive_pipeline import progressive_call

__all__ = ["MultiPatchTransformer", "disable", "enable", "progressive_call", "summary"]
