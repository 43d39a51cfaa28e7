"""The block stack: the part of a transformer that a feature cache skips.

``replace_stack(model, stand_in)`` lets a stand-in decide, at each model call, which rows
(samples) run the model's blocks, and what the others get instead. It patches the blocks, not
the model's forward, so it works wherever the blocks run: the backbone's own forward (the base
patch size) and the multi-patch adapter's coarse path alike.

- A single-stream stack (one list of one kind of block, each returning its hidden states) runs
  whole inside the first block's call; the other blocks step aside (return their input).
- A dual-stream stack (FLUX, SD3, Qwen-Image...: blocks that carry text and image tokens side by
  side) cannot, since the model's own forward glues its block lists together (FLUX.2 and Chroma
  join the text and image tokens between them). There the first block's call asks the stand-in;
  every block runs on the rows that compute, the others stepping aside with their inputs in the
  order of diffusers' ``TransformerBlockRegistry``; and the stand-in finishes at the input of the
  model's output norm (``norm_out``), which holds the image tokens, as the stack's input did. A stream whose
  stack output the model keeps too (LTX-2's audio: the spec's ``side_streams``) is finished at its own norm.
"""

from __future__ import annotations

import functools
import inspect
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Protocol

import torch
from torch import nn

from ..adapter import MultiPatchTransformer
from ..backbones import spec_for

#: Where diffusers transformers keep their blocks, in the order they run.
BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks", "blocks", "layers")


def _eager(fn: Callable) -> Callable:
    """``fn``'s own frame outside torch.compile, the real blocks it calls compiled as ever
    (compile_repeated_blocks): its decisions, per call and row, would otherwise become guards that fail at
    every call. What it calls besides the blocks is ``_bookkeeping``."""
    return torch.compiler.disable(fn, recursive=False)


_bookkeeping = torch.compiler.disable  # never traced, nor what it calls


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
        """A single-stream stack's output for ``rows`` (a boolean mask; all rows by default).

        Arguments with one entry per row (timestep, labels...) are cut to the same rows.
        """
        if rows is not None:
            index = rows.nonzero().flatten().to(self.hidden.device)
            arguments = _cut(self.arguments, len(self.hidden), index)
            if arguments is None:  # a row's share of some argument cannot be told: all rows run
                _warn_uncut(self.block)
                return self.run().index_select(0, index)
        else:
            arguments = self.arguments
        bound = inspect.BoundArguments(inspect.signature(self.forwards[0]), dict(arguments))
        for forward in self.forwards:
            hidden = forward(*bound.args, **bound.kwargs)
            if not isinstance(hidden, torch.Tensor):
                raise TypeError(f"{type(self.block).__name__} returns {type(hidden).__name__}, not the hidden "
                                "states: its model's spec must say single_stream = False")
            bound.arguments[next(iter(bound.arguments))] = hidden
        return hidden

    run = _eager(run)  # the blocks compiled, not the loop


class StandIn(Protocol):
    """What stands in for the block stack during model calls: a cache bound to one group of samples."""

    def plan(self, run: StackRun) -> torch.Tensor:
        """Which rows of ``run.hidden`` run the blocks: one boolean per row (best on the CPU: read once per call)."""

    def finish(self, run: StackRun, output: torch.Tensor, compute: torch.Tensor,
               stream: str | None = None) -> torch.Tensor:
        """The stack's output for every row, given the blocks' ``output`` on the rows that computed (``compute``,
        on the CPU); the other rows of ``output`` hold nothing to use. ``stream``: a side stream's (its block
        argument's name; its input is ``run.arguments[stream]``), else the image tokens'."""


class SkipAll:
    """A stand-in that skips every row: what a step a cache skips costs besides the blocks (for counting and
    timing it)."""

    def plan(self, run: StackRun) -> torch.Tensor:
        return torch.zeros(len(run.hidden), dtype=torch.bool)

    def finish(self, run: StackRun, output: torch.Tensor, compute: torch.Tensor,
               stream: str | None = None) -> torch.Tensor:
        return run.hidden if stream is None else run.arguments[stream]


def blocks_of(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of a diffusers model (or of the backbone a MultiPatchTransformer wraps), in the
    order they run."""
    model = model.backbone if isinstance(model, MultiPatchTransformer) else model
    blocks = [b for name in BLOCK_LISTS if isinstance(getattr(model, name, None), nn.ModuleList)
              for b in getattr(model, name)]
    if not blocks:
        raise TypeError(f"feature caches need the model's blocks, and {type(model).__name__} keeps none in "
                        f"{', '.join(BLOCK_LISTS)}")
    return blocks


def check_stack(model: nn.Module) -> None:
    """Refuse, before any work, a model whose block stack ``replace_stack`` cannot stand in for."""
    backbone = model.backbone if isinstance(model, MultiPatchTransformer) else model
    blocks = blocks_of(backbone)
    kinds, spec = sorted({type(b).__name__ for b in blocks}), spec_for(backbone)
    if spec.caches_refused:
        raise ValueError(f"ddit's feature caches do not run on {type(backbone).__name__}: {spec.caches_refused}")
    if spec.single_stream:
        if len(kinds) != 1:
            raise ValueError(f"a single-stream stack runs as one call of one kind of block; "
                            f"{type(backbone).__name__} has {', '.join(kinds)}")
        return
    unknown = sorted({type(b).__name__ for b in blocks if _outputs(b, spec) is None})
    unknown += [norm for norm in ("norm_out", *spec.side_streams.values())
                if not isinstance(getattr(backbone, norm, None), nn.Module)]
    if unknown:
        raise ValueError(f"ddit's caches stand in for {type(backbone).__name__}'s dual-stream blocks only where "
                         "they know what each block returns (diffusers' TransformerBlockRegistry, or the spec's "
                         "block_outputs) and the model has an output norm (norm_out) after them; unknown: "
                         f"{', '.join(unknown)}. Add it to the spec, or use a diffusers cache config where the model "
                         "supports one")


@contextmanager
def replace_stack(model: nn.Module, stand_in: StandIn) -> Iterator[None]:
    """While inside, ``stand_in`` decides at each call of ``model`` which rows run its blocks."""
    backbone = model.backbone if isinstance(model, MultiPatchTransformer) else model
    if torch.is_grad_enabled() and getattr(backbone, "gradient_checkpointing", False):
        raise ValueError("a feature cache skips blocks at inference; with gradient checkpointing on and gradients "
                         "enabled their recomputation would not see it: run under torch.no_grad(), or turn "
                         "gradient checkpointing off")
    blocks = blocks_of(backbone)
    own = [block.__dict__.get("forward") for block in blocks]  # a forward patched by someone else
    forwards, spec = tuple(block.forward for block in blocks), spec_for(backbone)
    # compiled blocks (compile_repeated_blocks) would trace their patched forward: keep its decisions out
    compiled = any(getattr(block, "_compiled_call_impl", None) is not None for block in blocks)
    if spec.single_stream:
        patched, tails = _single_stream(blocks, forwards, stand_in), []
    else:
        patched, finishes = _dual_stream(blocks, forwards, stand_in, spec, compiled)
        tails = [getattr(backbone, norm).register_forward_pre_hook(finish, with_kwargs=True)
                 for norm, finish in finishes.items()]
    for block, forward in zip(blocks, patched):
        block.forward = _eager(forward) if compiled else forward
    try:
        yield
    finally:
        for tail in tails:
            tail.remove()
        for block, forward in zip(blocks, own):
            if forward is None:
                del block.forward
            else:
                block.forward = forward


@dataclass(frozen=True)
class _Plan:
    """Which rows of one call run the blocks, read once on the CPU (no device sync per block)."""

    compute: torch.Tensor  # boolean per row, on the CPU
    index: torch.Tensor | None  # the computing rows' indices on the device, when only some compute

    @property
    def all(self) -> bool:
        return self.index is None and bool(self.compute[:1].all())

    @property
    def none(self) -> bool:
        return self.index is None and not self.all


@_bookkeeping
def _plan(stand_in: StandIn, run: StackRun) -> _Plan:
    compute = stand_in.plan(run).cpu()
    some = bool(compute.any()) and not bool(compute.all())
    return _Plan(compute, compute.nonzero().flatten().to(run.hidden.device) if some else None)


@_bookkeeping
def _finish(stand_in: StandIn, run: StackRun, output: torch.Tensor, plan: _Plan) -> torch.Tensor:
    return stand_in.finish(run, output, plan.compute)


def _signature(forward: Callable) -> inspect.Signature:
    """A block forward's signature, worked out once per function: a model call enters ``replace_stack`` once per
    group, and the 57 blocks of FLUX cost milliseconds each time otherwise."""
    function = getattr(forward, "__func__", None)
    if function is None:  # a forward patched on the instance: its own
        return inspect.signature(forward)
    if function not in _SIGNATURES:
        _SIGNATURES[function] = inspect.signature(forward)
    return _SIGNATURES[function]


_SIGNATURES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _single_stream(blocks, forwards, stand_in: StandIn) -> list[Callable]:
    """The first block runs the whole stack on the rows that compute; the others step aside."""
    signature = _signature(forwards[0])

    def first(*args, **kwargs):
        run = StackRun(blocks[0], dict(signature.bind(*args, **kwargs).arguments), forwards)
        plan = _plan(stand_in, run)
        if plan.all:
            output = run.run()
        else:
            output = torch.empty_like(run.hidden)
            if plan.index is not None:
                output.index_copy_(0, plan.index, run.run(plan.compute).to(output.dtype))
        return _finish(stand_in, run, output, plan)

    def step_aside(hidden_states, *args, **kwargs):
        return hidden_states

    return [first, *[step_aside] * (len(blocks) - 1)]


def _dual_stream(blocks, forwards, stand_in: StandIn, spec,
                 compiled: bool) -> tuple[list[Callable], dict[str, Callable]]:
    """Every block runs on the rows that compute; the output norm's pre-hook finishes the call, and each side
    stream's norm its stream (the hooks by norm name). A pass starts at the first block that runs in it (SD3's
    skip-layer guidance may leave out block 0)."""
    call: dict = {}  # the model call in flight: its run, its plan and the last block that ran

    def block_forward(i: int) -> Callable:
        signature, outputs = _signature(forwards[i]), _outputs(blocks[i], spec)
        outside = _bookkeeping if compiled else (lambda f: f)  # wrapping costs 10 us a function, twice a block

        @outside
        def before(args, kwargs) -> tuple[tuple | None, list | None]:
            """What to run this block on ((args, kwargs), or None: no row), and its inputs to put the computed
            rows into (None: it runs on every row)."""
            if not call or i <= call["last"]:  # a new pass (or one that an exception cut short)
                run = StackRun(blocks[i], dict(signature.bind(*args, **kwargs).arguments), forwards)
                call.clear()  # nothing of a pass cut short before its norms (its finished streams) carries over
                call.update(run=run, plan=_plan(stand_in, run))
            call["last"], plan = i, call["plan"]
            if plan.all:
                return (args, kwargs), None
            arguments = signature.bind(*args, **kwargs).arguments
            inputs = [arguments.get(name) for name in outputs]  # what the block returns, as it came in
            if plan.none:
                return None, inputs
            cut = _cut(arguments, len(plan.compute), plan.index)
            if cut is None:  # a row's share of an argument cannot be told: all rows run
                _warn_uncut(blocks[i])
                return (args, kwargs), None
            bound = inspect.BoundArguments(signature, cut)
            return (bound.args, bound.kwargs), inputs

        @outside
        def after(computed, inputs: list):
            """The block's output for every row: the computed rows put into its inputs."""
            index = call["plan"].index
            computed = computed if isinstance(computed, tuple) else (computed,)
            for j, value in enumerate(computed):
                if value is not None and inputs[j] is not None:
                    inputs[j] = inputs[j].index_copy(0, index, value.to(inputs[j].dtype))
            return tuple(inputs) if len(inputs) > 1 else inputs[0]

        def forward(*args, **kwargs):
            run_on, inputs = before(args, kwargs)
            if run_on is None:
                return tuple(inputs) if len(inputs) > 1 else inputs[0]
            computed = forwards[i](*run_on[0], **run_on[1])
            return computed if inputs is None else after(computed, inputs)

        return forward

    def finisher(stream: str | None) -> Callable:
        """The pre-hook that finishes ``stream`` (None: the image tokens) at its norm's input."""

        @_bookkeeping
        def finish(norm: nn.Module, args: tuple, kwargs: dict):
            if not call or stream in call.get("finished", ()):  # the norm called outside a stack call
                return None
            if not args:
                raise TypeError(f"{type(norm).__name__} was called without its input as its first positional "
                                "argument, where ddit's caches finish the stack")
            run, plan = call["run"], call["plan"]
            call.setdefault("finished", set()).add(stream)
            if len(call["finished"]) > len(spec.side_streams):  # every stream finished: the call is done
                call.clear()
            hidden, tokens = args[0], args[0].shape[1]
            if stream is None and tokens < run.hidden.shape[1]:  # Kontext's coarse path norms the generated
                name = next(iter(run.arguments))  # grid, not its references
                run = replace(run, arguments={**run.arguments, name: run.hidden[:, :tokens]})
            output = hidden if plan.all else hidden.clone()
            side = (stream,) if stream else ()  # a stand-in is asked about side streams only where there are some
            return (stand_in.finish(run, output, plan.compute, *side).to(hidden.dtype), *args[1:]), kwargs

        return finish

    finishes = {"norm_out": finisher(None), **{norm: finisher(stream) for stream, norm in spec.side_streams.items()}}
    return [block_forward(i) for i in range(len(blocks))], finishes


@_bookkeeping
def _warn_uncut(block: nn.Module) -> None:
    warnings.warn(f"ddit's cache could not cut {type(block).__name__}'s arguments by row (one holds several "
                  "entries per row): every row ran the blocks, so the samples it skipped saved no compute",
                  stacklevel=3)


@functools.cache
def _registered_outputs(block_class: type) -> tuple[str, ...] | None:
    """The arguments a block class returns, in its return order, per diffusers' registry; None if unknown."""
    from diffusers.hooks._helpers import TransformerBlockRegistry  # diffusers' own record of block outputs

    try:
        meta = TransformerBlockRegistry.get(block_class)
    except ValueError:
        return None
    if meta.return_encoder_hidden_states_index is None:
        return (meta.hidden_states_argument_name,)
    names = [None, None]
    names[meta.return_hidden_states_index] = meta.hidden_states_argument_name
    names[meta.return_encoder_hidden_states_index] = meta.encoder_hidden_states_argument_name
    return tuple(names)


def _outputs(block: nn.Module, spec) -> tuple[str, ...] | None:
    """The arguments a dual-stream block returns, in its return order (the spec's, or diffusers' registry's);
    None if unknown."""
    return spec.block_outputs.get(type(block).__name__) or _registered_outputs(type(block))


@_bookkeeping
def _cut(arguments: dict, n: int, index: torch.Tensor) -> dict | None:
    """The arguments of the rows at ``index`` alone: a tensor with one entry per row is cut, in containers too
    (rotary embeddings per row, an IP adapter's image embeddings); others pass as they are. None where a row's
    share cannot be told: an argument of several entries per row (Qwen-Image-Edit-2511's two modulations)."""
    if any(torch.is_tensor(v) and v.ndim and len(v) > n and len(v) % n == 0 for v in arguments.values()):
        return None
    return {name: _cut_value(value, n, index) for name, value in arguments.items()}


def _cut_value(value, n: int, index: torch.Tensor):
    """A tensor of ``n`` entries cut to ``index``; in a tuple or list, the tensors only if all of them have ``n``
    entries (a pair of per-token rotary tables, one of which happens to have ``n`` tokens, passes whole)."""
    if torch.is_tensor(value) and value.ndim and len(value) == n:
        return value.index_select(0, index.to(value.device))
    if isinstance(value, dict):
        return {k: _cut_value(v, n, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        tensors = [v for v in value if torch.is_tensor(v) and v.ndim]
        if any(len(v) != n for v in tensors):
            return value
        return type(value)(_cut_value(v, n, index) for v in value)
    return value
