"""The block stack: the part of a transformer that a feature cache skips.

``replace_stack`` lets a function stand in for a model's whole stack of
transformer blocks during a call: the first block's forward hands its inputs to
that function and returns what it returns, the other blocks step aside (return
their input). It patches the blocks, not the model's forward, so it works
wherever the blocks run: the backbone's own forward (the base patch size) and
the multi-patch adapter's coarse path alike.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..adapter import MultiPatchTransformer

#: Where diffusers transformers keep their blocks, in the order they run.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


@dataclass(frozen=True)
class StackRun:
    """One pass through the block stack, as the first block was called for it."""

    block: nn.Module  # the first block
    arguments: dict  # its forward arguments by name, the hidden states first
    forwards: tuple[Callable, ...]  # every block's real forward, in order

    @property
    def hidden(self) -> torch.Tensor:
        """The stack's input tokens (rows, tokens, dim): the blocks' first argument."""
        return next(iter(self.arguments.values()))

    def run(self, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The real blocks' output for ``rows`` (a boolean mask; all rows by default).

        Arguments with one entry per row (timestep, labels...) are cut to the same rows.
        """
        arguments = self.arguments
        if rows is not None:
            n = len(self.hidden)
            arguments = {k: v[rows] if isinstance(v, torch.Tensor) and v.ndim and len(v) == n else v
                         for k, v in arguments.items()}
        bound = inspect.BoundArguments(inspect.signature(self.forwards[0]), dict(arguments))
        for forward in self.forwards:
            hidden = forward(*bound.args, **bound.kwargs)
            if not isinstance(hidden, torch.Tensor):
                raise TypeError(f"{type(self.block).__name__} returns {type(hidden).__name__}, not the hidden "
                                "states: feature caches handle single-stream blocks only")
            bound.arguments[next(iter(bound.arguments))] = hidden
        return hidden


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a diffusers model (or of the backbone a MultiPatchTransformer wraps)."""
    if isinstance(model, MultiPatchTransformer):
        model = model.backbone
    blocks = [b for name in BLOCK_LISTS if isinstance(getattr(model, name, None), nn.ModuleList)
              for b in getattr(model, name)]
    kinds = sorted({type(b).__name__ for b in blocks})
    if len(kinds) != 1:
        raise TypeError(f"feature caches need one stack of one kind of block; {type(model).__name__} has "
                        f"{', '.join(kinds) or 'none'}")
    return blocks


@contextmanager
def replace_stack(model: nn.Module, stack: Callable[[StackRun], torch.Tensor]) -> Iterator[None]:
    """While inside, ``model``'s blocks run as one call ``stack(run) -> output tokens``."""
    blocks = blocks_of(model)
    forwards = tuple(block.forward for block in blocks)
    signature = inspect.signature(forwards[0])
    own = [block.__dict__.get("forward") for block in blocks]  # a forward patched by someone else

    def first(*args, **kwargs):
        return stack(StackRun(blocks[0], dict(signature.bind(*args, **kwargs).arguments), forwards))

    def step_aside(hidden_states, *args, **kwargs):
        return hidden_states

    for block, forward in zip(blocks, (first, *[step_aside] * (len(blocks) - 1))):
        block.forward = forward
    try:
        yield
    finally:
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward
