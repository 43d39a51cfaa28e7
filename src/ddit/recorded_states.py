"""The inputs a pipeline's transformer received, recorded to disk, as distillation data.

Self-distillation needs no image data set: the stock pipeline, run on a user's prompts
with its own scheduler, guidance and resolution, shows exactly which noisy latents,
timesteps and conditioning the transformer sees. A forward pre-hook on
``pipe.transformer`` keeps every call's keyword arguments; each pipeline call (one
prompt) becomes one safetensors file, written whole or not at all, so a killed
recording resumes at the first missing prompt.

Each file holds every tensor once (the prompt embeddings, the same at every step, are
stored once, found by content) and, in its metadata, one entry per transformer call
naming the tensors and non-tensor values of its arguments. A tensor whose first
dimension is the call's batch size (that of the latent, the forward's first argument) is
per sample: one row per sample, so a batched classifier-free-guidance call gives a
conditional and an unconditional sample. So is a list of one tensor per sample (Z-Image's
latents and prompts). Other tensors (Flux's position ids) are shared by the call's rows.

``RecordedStates(folder, ...)`` draws random rows of random calls (of one or more
folders) as batches of ``(hidden_states, forward kwargs)`` for ``ddit.distill.distill``.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .pipeline_call import (GLOBAL_SEED_OFFSET, Prompt, as_prompts, progress_bars_off, run_pipeline,
                            seeded_globally)

#: Forward arguments that say how to return, not what to compute (``patch_size``: a
#: ``MultiPatchTransformer``'s choice, which the recorded state must not fix).
#: Not recorded: a pipeline's cache of a prefix's keys and values (Qwen-Image 2.1), which a replay recomputes.
IGNORED = ("return_dict", "patch_size", "kv_cache", "kv_cache_mode")
TENSOR = "__tensor__"
ROWS = "__rows__"
#: Text whose length follows the prompt (Qwen-Image trims its embeddings to the prompt), and the mask that
#: lets a batch of such rows be padded with zeros to the longest, as the pipeline pads a batch of prompts.
TEXT, TEXT_MASK = "encoder_hidden_states", "encoder_hidden_states_mask"
PADDED = (TEXT, TEXT_MASK)


class RecordingError(ValueError):
    """A recording folder or a transformer call that cannot be used as distillation data."""


def _dense(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy with its own storage (expanded tensors share one element among many)."""
    return t.detach().cpu().clone(memory_format=torch.contiguous_format)


def _digest(t: torch.Tensor) -> str:
    h = hashlib.blake2b(_dense(t).reshape(-1).view(torch.uint8).numpy().tobytes(), digest_size=8)
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    return h.hexdigest()


class CallLog:
    """The calls of one pipeline run: every distinct tensor once, each call as a JSON structure."""

    def __init__(self):
        self.tensors: dict[str, torch.Tensor] = {}
        self.calls: list[dict] = []

    def save(self, path: str | os.PathLike, prompt: str, **metadata: str) -> None:
        """Write the calls to one file, whole or not at all."""
        if not self.calls:
            raise RecordingError(f"no transformer call was recorded for {prompt!r}")
        path = Path(path)
        tmp = path.with_suffix(".tmp")
        save_file(self.tensors, tmp, metadata={"prompt": prompt, "calls": json.dumps(self.calls), **metadata})
        os.replace(tmp, path)

    def add(self, kwargs: dict) -> None:
        """Log one call, its arguments by name in the forward's order (the latent first)."""
        latent = next(iter(kwargs.values()), None)
        if not (torch.is_tensor(latent) or _tensor_list(latent)):
            raise RecordingError("the transformer's first argument is not a latent (a tensor, or a list of one "
                                 "tensor per sample); ddit records diffusers transformers, whose first it is")
        batch = len(latent)
        self.calls.append({"batch": batch, "kwargs": {name: self._encode(name, value, batch)
                                                      for name, value in kwargs.items()
                                                      if name not in IGNORED and value is not None}})

    def _encode(self, name: str, value, batch: int):
        if torch.is_tensor(value):
            key = f"{name}.{_digest(value)}"
            self.tensors.setdefault(key, _dense(value))
            return {TENSOR: key, "per_sample": batch is not None and value.ndim > 0 and value.shape[0] == batch}
        if _tensor_list(value) and len(value) == batch:
            return {ROWS: [self._encode(f"{name}.{i}", v, None) for i, v in enumerate(value)]}
        if isinstance(value, dict):
            return {k: self._encode(f"{name}.{k}", v, batch) for k, v in value.items()}
        try:
            json.dumps(value)
        except TypeError:
            raise RecordingError(f"the transformer's argument {name!r} is a {type(value).__name__}, which cannot "
                                 "be recorded; ddit records tensors, dicts of them and JSON values") from None
        return value


def _by_name(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name, as a keyword call takes them back (``**kwargs`` flattened)."""
    named = {}
    for name, value in signature.bind_partial(*args, **kwargs).arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif kind is inspect.Parameter.VAR_POSITIONAL:
            if value:
                raise RecordingError("the transformer was called with extra positional arguments, which cannot be "
                                     "replayed by name")
        else:
            named[name] = value
    return named


@contextmanager
def recording(transformer: torch.nn.Module) -> Iterator[CallLog]:
    """Log every call of ``transformer`` while the block runs."""
    # a MultiPatchTransformer is recorded by its backbone's arguments
    log, signature = CallLog(), getattr(transformer, "_signature", None) or inspect.signature(transformer.forward)

    def hook(module, args, kwargs):
        named = _by_name(signature, args, {k: v for k, v in kwargs.items() if k not in IGNORED})
        if TEXT_MASK in signature.parameters and named.get(TEXT_MASK) is None and torch.is_tensor(named.get(TEXT)):
            named[TEXT_MASK] = torch.ones(named[TEXT].shape[:2], dtype=torch.long)  # every call keeps one
        log.add(named)

    handle = transformer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield log
    finally:
        handle.remove()


def record_states(pipe, prompts: Iterable[str | Prompt], folder: str | os.PathLike, call: dict | None = None, *,
                  seed: int = 0, indices: Iterable[int] | None = None, progress: bool = True,
                  modules: Mapping[str, torch.nn.Module] | None = None) -> Path:
    """Run ``pipe(prompt, **call)`` for each prompt (with its own arguments, ``Prompt.inputs``) and record its
    transformer's inputs in ``folder``.

    Prompt i runs with a generator seeded ``seed + i`` and is written to
    ``folder/{i:05d}.safetensors``; prompts already there are skipped (a resume), and a
    file recorded from another prompt is refused. ``indices`` restricts the run to some
    prompts (one process's share under accelerate). ``call`` holds the pipeline's own
    arguments (``num_inference_steps``, ``height``, ``guidance_scale``...); the output
    is kept as a latent, never decoded. ``modules`` are what to record, by subfolder of
    ``folder`` ("": the folder itself); by default ``pipe.transformer``, and Wan 2.2's
    second expert ``pipe.transformer_2`` in ``folder/transformer_2``. In an enabled pipeline,
    record its ``MultiPatchTransformer``s, whose calls carry the full-size latent whatever
    patch size they run at.
    """
    folder, prompts = Path(folder), as_prompts(prompts)
    modules = dict(modules or experts(pipe))
    for sub in modules:
        (folder / sub).mkdir(parents=True, exist_ok=True)
    todo = []
    for i in (range(len(prompts)) if indices is None else indices):
        paths = [folder / sub / f"{i:05d}.safetensors" for sub in modules]
        if not all(path.exists() for path in paths):
            todo.append(i)
        for path in paths:
            if path.exists() and _metadata(path)["prompt"] != prompts[i].key:
                raise RecordingError(f"{path} was recorded from another prompt than {prompts[i].label!r} (another "
                                     "text, or other arguments or images of its own); record another prompts file "
                                     "into another folder")
    device = getattr(pipe, "_execution_device", None) or pipe.device
    with progress_bars_off(pipe):  # one bar over the prompts, not one per call
        for i in tqdm(todo, desc="record", disable=not progress or not todo):
            # no_grad, not inference_mode: model CPU offload moves the weights inside the call, and weights made in
            # inference mode could not train after
            with ExitStack() as stack, torch.no_grad(), seeded_globally(seed + GLOBAL_SEED_OFFSET + i, device):
                logs = {sub: stack.enter_context(recording(module)) for sub, module in modules.items()}
                generator = torch.Generator("cpu").manual_seed(seed + i)
                run_pipeline(pipe, prompt=prompts[i].text, generator=generator, output_type="latent",
                             **(call or {}), **prompts[i].call_inputs())
            idle = [sub or "transformer" for sub, log in logs.items() if not log.calls]
            if idle and len(logs) > 1:  # checked before any file of this prompt is written
                raise RecordingError(f"pipe.{idle[0]} ran no step for {prompts[i].label!r}: every step fell on the "
                                     "other expert (the pipeline's boundary_ratio); record with more steps")
            for sub, log in logs.items():
                log.save(folder / sub / f"{i:05d}.safetensors", prompts[i].key, device=str(device))
    return folder


def experts(pipe) -> dict[str, torch.nn.Module]:
    """The transformers a pipeline denoises with, by recording subfolder: ``pipe.transformer`` (""), and Wan 2.2's
    low-noise expert ``pipe.transformer_2``, which takes the steps below its boundary (without a
    ``boundary_ratio`` the pipeline never calls it)."""
    found = {"": pipe.transformer}
    config = getattr(pipe, "config", None)
    if isinstance(getattr(pipe, "transformer_2", None), torch.nn.Module) and config.get("boundary_ratio") is not None:
        found["transformer_2"] = pipe.transformer_2
    return found


def _metadata(path: Path) -> dict:
    try:
        with safe_open(path, "pt") as f:
            return f.metadata() or {}
    except Exception as err:
        raise RecordingError(f"recorded states file {path} is damaged ({err}); delete it and record again "
                             "(only that prompt is recomputed)") from None


class RecordedStates:
    """Random batches of recorded transformer inputs: ``draw(generator, n) -> (hidden_states, kwargs)``."""

    def __init__(self, *folders: str | os.PathLike, shared: Iterable[str] = (), prompts: int | None = None):
        """``shared``: arguments the backbone reads once for all rows (its spec's ``unbatched``: FLUX.2's ids,
        recorded per sample), which a batch's rows must then hold alike. ``prompts``: read the first ``prompts``
        prompts' files only (those of the prompts file in use: a folder may hold more, from a longer one)."""
        self.folders, shared = [Path(f) for f in folders], frozenset(shared)
        self.folder = self.folders[0]  # named in errors
        self.files = []
        for folder in self.folders:
            if prompts is None:
                files = sorted(folder.glob("*.safetensors"))
            else:
                files = [folder / f"{i:05d}.safetensors" for i in range(prompts)]
                missing = [f.name for f in files if not f.exists()]
                if missing:
                    raise RecordingError(f"{folder} lacks the recorded states of {len(missing)} prompt(s) "
                                         f"({', '.join(missing[:3])}...): record them first")
            if not files:
                raise RecordingError(f"{folder} holds no recorded states (*.safetensors); record them with "
                                     "ddit.recorded_states.record_states or `ddit distill --pipeline`")
            self.files += files
        self.calls, kinds = [], []
        for path in self.files:
            calls = json.loads(_metadata(path)["calls"])
            with safe_open(path, "pt") as f:
                kinds += [_kind(f, call, shared) for call in calls]
            self.calls += [(path, call) for call in calls]
        self.index = [(c, row) for c, (_, call) in enumerate(self.calls) for row in range(call["batch"])]
        self._kind = [kinds[c] for c, _ in self.index]  # of each row
        self._alike: dict[tuple, list[int]] = {}  # rows by kind: those that can share a batch
        for i, kind in enumerate(self._kind):
            self._alike.setdefault(kind, []).append(i)

    def __len__(self) -> int:
        return len(self.index)

    def describe(self) -> dict:
        return {"folders": [str(f) for f in self.folders], "prompts": len(self.files), "calls": len(self.calls),
                "samples": len(self.index)}

    def draw(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, dict]:
        """``batch_size`` random rows that can share a batch: the first uniformly among all rows, the others among
        those of its kind (``_kind``): recordings at several resolutions, or of edits with reference images of
        several sizes, train in batches of one shape each."""
        if len(self._alike) == 1:
            picks = torch.randint(len(self.index), (batch_size,), generator=generator).tolist()
        else:
            first = int(torch.randint(len(self.index), (1,), generator=generator))
            alike = self._alike[self._kind[first]]
            picks = [first] + [alike[i] for i in torch.randint(len(alike), (batch_size - 1,), generator=generator)]
        items = _pad_text([self._item(*self.index[p]) for p in picks])
        kwargs = _collate(items, self.folder)
        if torch.is_tensor(kwargs.get(TEXT_MASK)) and kwargs[TEXT_MASK].all():
            kwargs[TEXT_MASK] = None  # nothing padded: no mask, as the pipeline passes it (fast attention kernels)
        latent = kwargs.pop(next(iter(kwargs)))  # the latent, then the other arguments
        if isinstance(latent, list) and len({x.shape for x in latent}) > 1:
            raise _mixed(self.folder, "the latent's shape")
        return latent, kwargs

    def _item(self, c: int, row: int) -> dict:
        path, call = self.calls[c]
        with safe_open(path, "pt") as f:
            return _decode(call["kwargs"], f, row)


def _kind(f, call: dict, shared: frozenset[str]) -> tuple:
    """What rows must hold alike to be batched: which arguments their calls pass (SD3's skip-layer guidance adds
    one to some calls), their latent's shape (read from the open file's header), the tensors their calls share (by
    content: Flux's position ids; and those named ``shared``, even if recorded per sample) and their other values
    (Qwen-Image's img_shapes), and the shapes of their per-sample tensors (Qwen-Image 2.1's img_mask follows its
    text). Text of another length is padded: not part of it."""
    (_, latent), *others = call["kwargs"].items()
    if ROWS in latent:
        shape = tuple(f.get_slice(latent[ROWS][0][TENSOR]).get_shape())
    else:
        shape = tuple(f.get_slice(latent[TENSOR]).get_shape())[1:]
    return shape, tuple((name, _alike(value, name in shared), None if name in PADDED else _row_shape(f, value))
                        for name, value in others)


def _row_shape(f, value) -> tuple | None:
    """The shape of one row of a per-sample tensor, read from the open file's header."""
    if isinstance(value, dict) and TENSOR in value and value["per_sample"]:
        return tuple(f.get_slice(value[TENSOR]).get_shape())[1:]
    return None


def _alike(value, shared: bool = False):
    """A recorded argument's part that every row of a batch must hold alike: shared tensors' names (their
    digests) and JSON values; per-sample tensors are batched row by row."""
    if isinstance(value, dict) and TENSOR in value:
        return value[TENSOR] if shared or not value["per_sample"] else None
    if isinstance(value, dict) and ROWS in value:
        return None
    if isinstance(value, dict):
        return tuple((k, _alike(v)) for k, v in sorted(value.items()))
    return json.dumps(value, sort_keys=True)


def _decode(value, f, row: int):
    if isinstance(value, dict) and TENSOR in value:
        t = f.get_tensor(value[TENSOR])
        return t[row] if value["per_sample"] else _Shared(t)
    if isinstance(value, dict) and ROWS in value:
        return _Row(f.get_tensor(value[ROWS][row][TENSOR]))
    if isinstance(value, dict):
        return {k: _decode(v, f, row) for k, v in value.items()}
    return value


class _Shared:
    """A tensor every row of a call shares (no batch dimension): one copy per batch."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _Row:
    """One sample's entry of a per-sample list; a batch of them is a list again (shapes may differ)."""

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


def _tensor_list(value) -> bool:
    return isinstance(value, list) and bool(value) and all(torch.is_tensor(v) for v in value)


def _pad_text(items: list[dict]) -> list[dict]:
    """Rows whose masked text differs in length, padded with zeros (text and mask) to the longest."""
    if not all(torch.is_tensor(i.get(TEXT)) and torch.is_tensor(i.get(TEXT_MASK)) for i in items):
        return items
    longest = max(len(i[TEXT]) for i in items)
    return [{**i, TEXT: _pad(i[TEXT], longest), TEXT_MASK: _pad(i[TEXT_MASK], longest)} for i in items]


def _pad(t: torch.Tensor, length: int) -> torch.Tensor:
    return torch.cat([t, t.new_zeros(length - len(t), *t.shape[1:])])


def _collate(items: list, folder: Path, name: str = "the arguments"):
    first = items[0]
    if isinstance(first, dict):
        if any(not isinstance(i, dict) or i.keys() != first.keys() for i in items):
            keys = [set(i) if isinstance(i, dict) else set() for i in items]
            differ = sorted(set.union(*keys) - set.intersection(*keys))
            raise _mixed(folder, f"which arguments they pass ({', '.join(differ)})")
        return {k: _collate([i[k] for i in items], folder, k) for k in first}
    if isinstance(first, _Row):
        return [i.tensor for i in items]
    if isinstance(first, _Shared):
        if any(i.tensor.shape != first.tensor.shape or not torch.equal(i.tensor, first.tensor) for i in items):
            raise _mixed(folder, name)
        return first.tensor
    if torch.is_tensor(first):
        if any(i.shape != first.shape for i in items):
            raise _mixed(folder, name)
        return torch.stack(items)
    if any(i != first for i in items):
        raise _mixed(folder, name)
    return first


def _mixed(folder: Path, what: str) -> RecordingError:
    return RecordingError(f"the calls recorded in {folder} differ in {what} (another pipeline, or an older "
                          "ddit?); record one pipeline per folder")
