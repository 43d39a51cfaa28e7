"""Self-distillation from a pipeline: a folder and a prompts file in, an adapter out.

No image data set is needed. The stock pipeline runs on the prompts with its own
scheduler, guidance and resolution, and its transformer's inputs are recorded
(``recorded_states.py``, in ``OUT/states``, resumable prompt by prompt); the adapter
over that transformer then learns Eq. 1 on them (``distill.py``), the frozen
transformer at its own patch size the teacher. Under ``accelerate launch`` each
process records its share of the prompts, and training is data-parallel.

Everything that can be checked is checked before the first prompt runs: the
transformer has a backbone spec, the resolution is divisible by every patch size,
the prompts file is readable and not empty, and a folder recorded with other
options is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType

from .adapter import MultiPatchTransformer, config_hash
from .backbones import spec_for
from .checkpoint import write_text_atomic
from .pipeline_call import check_call, check_resolution
from .distill import DistillConfig, distill
from .pipelines import disable, enable
from .policies import PatchPolicy
from .processes import processes
from .recorded_states import RecordedStates, RecordingError, record_states


def _check_recording(path: Path, identity: dict) -> None:
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != identity:
            raise RecordingError(f"{path.parent} was recorded with {recorded}, not {identity}; use the same "
                                 "options, or another --out")


def self_distill(pipe, prompts: Sequence[str], out: str | os.PathLike, *, call: dict | None = None,
                 patch_sizes: Sequence[int] | None = None, rank: int = 8, shared_lora: bool = False,
                 config: DistillConfig | None = None, seed: int = 0, resume: bool = False,
                 checkpoint_minutes: float = 3.0, progress: bool = True,
                 accelerator: Accelerator | None = None, on_policy: PatchPolicy | None = None) -> Path:
    """Record ``pipe`` on ``prompts`` into ``out/states``, distil its adapter; returns ``out/adapter``.

    ``call`` holds the pipeline's own arguments for the recording (``num_inference_steps``,
    ``height``, ``width``, ``num_frames``, ``guidance_scale``...); prompt i runs from seed
    ``seed + i``. ``config`` defaults to ``DistillConfig`` without the noise-level
    fields, which recorded states do not use. The written adapter loads with
    ``ddit.enable(pipe, out / "adapter")`` or ``MultiPatchTransformer.from_pretrained``.

    ``on_policy``: a second round. The pipeline runs the prompts again with the adapter
    enabled under this policy, so its coarse steps lead to latents the stock pipeline never
    visits (``out/on-policy/states``); training then goes on for ``config.steps`` more on
    both recordings together (``out/on-policy``; on the testbed this lowered the error
    where the sampler goes: docs/adapter.md). Returns ``out/on-policy/adapter`` then.
    """
    accelerator = accelerator or processes()
    call, out, prompts = dict(call or {}), Path(out), list(prompts)
    if not prompts:
        raise ValueError("no prompts to record; pass at least one")
    if on_policy is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("--on-policy samples the pipeline between two training rounds, which FSDP's sharded "
                         "transformer cannot do; record the on-policy round under a data-parallel accelerate "
                         "config (or one process), or drop --on-policy")
    check_call(pipe, call)
    try:
        spec = spec_for(pipe.transformer)
    except TypeError as err:  # no spec for this transformer: bad input here, not a bug
        raise ValueError(str(err)) from None
    base = spec.base_patch_size
    sizes = sorted({base, *(patch_sizes or (2 * base, 4 * base))})
    check_resolution(pipe, call, sizes)
    if pipe.transformer.dtype == torch.float16:
        raise ValueError("distil a bfloat16 or float32 pipeline (--dtype bfloat16): float16 training would "
                         "need loss scaling")
    config = config or DistillConfig(num_inference_steps=None, timestep_scale=None)
    identity = json.loads(json.dumps({  # as it reads back from recording.json (a tuple: a list)
        "transformer": f"{type(pipe.transformer).__name__} {config_hash(pipe.transformer)}",
        "dtype": str(pipe.transformer.dtype), "call": call, "seed": seed}))
    states = out / "states"
    _check_recording(states / "recording.json", identity)

    pipe.to(accelerator.device)
    if accelerator.is_main_process:
        states.mkdir(parents=True, exist_ok=True)
        write_text_atomic(states / "recording.json", json.dumps(identity, indent=1))
    record_states(pipe, prompts, states, call, seed=seed, progress=progress and accelerator.is_main_process,
                  indices=range(accelerator.process_index, len(prompts), accelerator.num_processes))
    accelerator.wait_for_everyone()

    model = MultiPatchTransformer(pipe.transformer, sizes[1:], rank=rank, shared_lora=shared_lora)
    share = dict(checkpoint_minutes=checkpoint_minutes, progress=progress, accelerator=accelerator)
    with _offloaded(pipe, accelerator.device):
        export = distill(model, RecordedStates(states), out, config, resume=resume, **share)
    if on_policy is None:
        return export

    visited = out / "on-policy" / "states"
    # states recorded under another policy, or with another first-round adapter, must not be mixed in
    on_policy_identity = json.loads(json.dumps({**identity, "policy": on_policy.name, "policy_params":
                                                _scalars(on_policy), "adapter": _digest(model.adapter_state_dict())}))
    _check_recording(visited / "recording.json", on_policy_identity)
    if accelerator.is_main_process:
        visited.mkdir(parents=True, exist_ok=True)
        write_text_atomic(visited / "recording.json", json.dumps(on_policy_identity, indent=1))
    enable(pipe, model, policy=on_policy)
    try:
        record_states(pipe, prompts, visited, call, seed=seed, module=model,
                      progress=progress and accelerator.is_main_process,
                      indices=range(accelerator.process_index, len(prompts), accelerator.num_processes))
    finally:
        disable(pipe)
        model.attach()  # disable gave the pipeline its stock transformer; training needs the LoRA layers back
    accelerator.wait_for_everyone()
    with _offloaded(pipe, accelerator.device):
        return distill(model, RecordedStates(states, visited), out / "on-policy", config, resume=resume, **share)


@contextmanager
def _offloaded(pipe, device) -> Iterator[None]:
    """The pipeline's other components (text encoders, VAE: FLUX's T5 alone is 9.5 GB) on the CPU while
    its transformer trains, back on ``device`` after."""
    others = [c for name, c in pipe.components.items()
              if isinstance(c, torch.nn.Module) and name != "transformer" and c is not pipe.transformer]
    for component in others:
        component.to("cpu")
    try:
        yield
    finally:
        for component in others:
            component.to(device)


def _scalars(obj) -> dict:
    """An object's settings: its attributes that are plain values (a policy's tau, fraction...)."""
    return {k: v for k, v in sorted(vars(obj).items()) if isinstance(v, (bool, int, float, str)) or v is None}


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]

