"""ddit: dynamic patch sizes for diffusion transformers (DDiT)."""

__version__ = "0.1.0"
