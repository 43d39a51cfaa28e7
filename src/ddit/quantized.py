"""Weights as floats, whatever diffusers' quantizers store them as.

The coarse heads start from the backbone's patch embedding and output projection. A GGUF file may hold those
quantized (whoever made it chose; a user cannot leave them out, as ``modules_to_not_convert`` can for
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


#: Where the quantizers' tensor types live (GGUF's is known by its ``quant_type``).
QUANTIZED_TENSORS = ("torchao.", "optimum.quanto.", "bitsandbytes.")


def storage(model: nn.Module) -> str | None:
    """How ``model``'s weights are stored, if quantized: its diffusers quantizer's config, and the quantized tensor
    types it holds (a GGUF file's quantization types, which its config does not hold; a model quantized in place,
    by torchao's ``quantize_`` or quanto's ``freeze``, has no quantizer), so that a recording made on one storage
    does not resume on another."""
    kinds = sorted({p.quant_type.name if hasattr(p, "quant_type") else type(p).__name__ for p in model.parameters()
                    if hasattr(p, "quant_type") or type(p).__module__.startswith(QUANTIZED_TENSORS)})
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None and not kinds:
        return None
    config = [] if quantizer is None else [
        type(quantizer).__name__, json.dumps(quantizer.quantization_config.to_dict(), sort_keys=True, default=str)]
    return " ".join([*config, *kinds])
