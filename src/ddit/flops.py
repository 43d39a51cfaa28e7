"""FLOPs of a model call, as torch's FlopCounterMode counts them, CPU attention included."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _attention(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


#: Kernels FlopCounterMode has no formula for: scaled_dot_product_attention on the CPU would count as 0.
EXTRA_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _attention}


def count_flops(fn: Callable, *args, **kwargs) -> int:
    """The FLOPs of one call ``fn(*args, **kwargs)`` (matmuls, convolutions, attention)."""
    with FlopCounterMode(display=False, custom_mapping=EXTRA_FORMULAS) as counter:
        fn(*args, **kwargs)
    return counter.get_total_flops()
