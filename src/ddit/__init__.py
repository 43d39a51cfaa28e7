"""ddit: dynamic patch sizes for diffusion transformers (DDiT)."""

__version__ = "0.1.0"

from .adapter import MultiPatchTransformer
from .pipelines import disable, enable, load_adapters, summary
from .progressive_pipeline import progressive_call

__all__ = ["MultiPatchTransformer", "disable", "enable", "load_adapters", "progressive_call", "summary"]
