"""The feature-cache interface: skip a sample's transformer blocks at some steps, reuse earlier work."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar

import torch

from torch import nn

from .stack import StackRun, StandIn, check_stack


@dataclass(frozen=True)
class Group:
    """Who a model call is for: samples of one generation that run at one patch size at one step."""

    step: int  # 0-based
    num_steps: int
    samples: tuple  # their keys in the generation: (CFG branch or None, sample index)
    patch_size: int


class Cache(abc.ABC):
    """Decides per sample whether to run the block stack or to stand in for it.

    State is kept per sample key (a pipeline's CFG branch, the sample's index), so that what
    a sample becomes never depends on its batch or group, and it starts over whenever the
    sample's patch size changes: features of one token grid mean nothing on another. The rows of a model call
    are its group's samples, repeated once per classifier-free-guidance branch;
    a sample's branches are decided together. Only the rows that compute run
    through the blocks.

    A cache implements ``reuse``; by default it stands in with the residual
    (output - input of the stack) of the sample's last computed step, which
    ``record`` keeps.
    """

    name: ClassVar[str]

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Start a generation: forget every sample."""
        self.states: dict = {}
        self.reused: dict = {}  # sample key -> whether its latest call skipped the blocks

    def check(self, model: nn.Module) -> None:
        """Refuse, before any work, a model whose blocks this cache cannot stand in for."""
        check_stack(model)

    @abc.abstractmethod
    def reuse(self, group: Group, run: StackRun, rows: dict) -> dict:
        """Per sample of the group, whether to skip its blocks; ``rows`` are each sample's rows (a slice).

        ``self.states[sample]`` is the sample's state; it holds at least its ``patch_size``.
        """

    def predict(self, state: dict, group: Group, hidden: torch.Tensor) -> torch.Tensor:
        """The stack's output for a skipped sample's rows."""
        return hidden.float() + state["residual"]

    def record(self, state: dict, group: Group, hidden: torch.Tensor, output: torch.Tensor) -> None:
        """Keep what a computed step leaves for later ones."""
        state["residual"] = output.float() - hidden.float()

    def standing_in(self, group: Group) -> StandIn:
        """This cache for one group's model calls, as ``replace_stack`` takes it."""
        return _GroupStandIn(self, group)

    def plan(self, group: Group, run: StackRun) -> torch.Tensor:
        """Which rows run the blocks (on the CPU): those of samples that do not reuse."""
        hidden, rows = run.hidden, self._rows(group)
        # a new patch size, resolution or number of CFG branches (Z-Image's cfg_truncation) starts afresh
        where = (group.patch_size, tuple(hidden.shape[1:]), len(hidden) // len(group.samples))
        for s in group.samples:
            if self.states.get(s, {}).get("where") != where:
                self.states[s] = {"patch_size": group.patch_size, "where": where}
        reuse = self.reuse(group, run, rows)
        self.reused.update(reuse)
        compute = torch.ones(len(hidden), dtype=torch.bool)
        for s, r in rows.items():
            compute[r] = not reuse[s]
        return compute

    def finish(self, group: Group, run: StackRun, output: torch.Tensor, compute: torch.Tensor,
               stream: str | None = None) -> torch.Tensor:
        """Every row's output: the skipped samples' predicted, the computed ones' recorded. A side ``stream``
        (LTX-2's audio) keeps its own state inside the sample's, under its name, predicted and recorded alike."""
        hidden = run.hidden if stream is None else run.arguments[stream]
        for s, r in self._rows(group).items():
            state = self.states[s] if stream is None else self.states[s].setdefault(stream, {})
            if self.reused[s]:
                output[r] = self.predict(state, group, hidden[r]).to(output.dtype)
            else:
                self.record(state, group, hidden[r], output[r])
        return output

    @staticmethod
    def _rows(group: Group) -> dict:
        """Each sample's rows, as a slice: a call's rows are its group's samples, once per CFG branch (no index
        tensor, so no copy to the device)."""
        return {s: slice(j, None, len(group.samples)) for j, s in enumerate(group.samples)}


@dataclass(frozen=True)
class _GroupStandIn:
    """A cache bound to one group: what ``replace_stack`` calls."""

    cache: Cache
    group: Group

    def plan(self, run: StackRun) -> torch.Tensor:
        return self.cache.plan(self.group, run)

    def finish(self, run: StackRun, output: torch.Tensor, compute: torch.Tensor,
               stream: str | None = None) -> torch.Tensor:
        side = () if stream is None else (stream,)  # a cache that overrides finish without streams runs as before
        return self.cache.finish(self.group, run, output, compute, *side)
