"""Whole tensors from FSDP shards, and shards again from whole tensors.

Under FSDP (``accelerate launch`` with an FSDP config) each process holds a shard
of every parameter and of its optimiser state, as a ``DTensor``. What ddit writes
(adapter folders, checkpoints) is always whole, so a run can resume on another
number of processes, or without FSDP, and an adapter loads anywhere. Both
directions are collectives: every process must call them, in the same order.
Plain tensors pass through unchanged, so the same code serves one process and DDP.
"""

from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def whole(tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor behind a shard (gathered from every process); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def sharded_like(tensor: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``tensor`` (whole) split the way ``param`` is, ready to load into it; as it is if ``param`` is plain."""
    if not isinstance(param, DTensor) or tensor.shape != param.shape:
        return tensor
    return distribute_tensor(tensor.to(param.device), param.device_mesh, param.placements)
