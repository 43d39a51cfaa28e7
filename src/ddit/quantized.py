"""Weights as floats, whatever diffusers' quantizers store them as.

The coarse heads start from the backbone's patch embedding and output projection. In a GGUF file those are
quantized like every other layer (a user cannot leave them out, as ``modules_to_not_convert`` can for
bitsandbytes, torchao or quanto), so they are read back through the quantizer's own dequantization: diffusers'
for GGUF, quanto's, and peft's for the rest (bitsandbytes, torchao).
"""

from __future__ import annotations

import json

import torch
from peft.utils.integrations import dequantize_module_weight
from torch import nn


def float_weight(layer: nn.Module) -> torch.Tensor:
    """``layer.weight`` dequantized (a plain floating tensor: GGUF's block types give float16), or as it is if not
    quantized."""
    weight = layer.weight
    if hasattr(weight, "quant_type"):  # diffusers' GGUFParameter
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        return dequantize_gguf_tensor(weight)
    if type(weight).__module__.startswith("optimum.quanto"):
        return weight.dequantize()
    return dequantize_module_weight(layer)


def storage(model: nn.Module) -> str | None:
    """How ``model``'s weights are stored, if quantized: its quantizer's config (a GGUF file's quantization types,
    which its config does not hold), so that a recording made on one storage does not resume on another."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return None
    kinds = sorted({p.quant_type.name for p in model.parameters() if hasattr(p, "quant_type")})
    config = json.dumps(quantizer.quantization_config.to_dict(), sort_keys=True, default=str)
    return " ".join([type(quantizer).__name__, config, *kinds])
