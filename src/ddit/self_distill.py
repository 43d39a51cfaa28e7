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
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from peft.tuners.lora import LoraLayer
from torch import nn

from .adapter import MultiPatchTransformer, config_hash, is_ddit_adapter
from .backbones import spec_for
from .checkpoint import write_text_atomic
from .pipeline_call import Prompt, as_prompts, check_call, check_resolution
from .distill import DistillConfig, check_accelerator, digest, distill
from .pipelines import disable, enable, offload_onto
from .policies import PatchPolicy
from .processes import processes
from .quantized import storage
from .recorded_states import RecordedStates, RecordingError, experts, record_states


def _check_recording(path: Path, identity: dict) -> None:
    if path.exists():
        recorded = json.loads(path.read_text())
        if recorded != identity:
            raise RecordingError(f"{path.parent} was recorded with {recorded}, not {identity}; use the same "
                                 "options, or another --out")


def lora_identity(model: nn.Module) -> dict[str, str]:
    """The LoRAs loaded into ``model`` (a style LoRA, which the adapter is then distilled beside; not ddit's own),
    each by a hash of its weights, its scale and whether it is on: a recording made with others must not resume."""
    layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
    weights = {}
    for n, p in model.named_parameters():
        if ".lora_" in n:  # ….lora_A.NAME.weight, ….lora_embedding_A.NAME
            weights.setdefault(n.split(".lora_")[1].split(".")[1], {})[n] = p
    identity = {}
    for name in sorted(name for name in weights if not is_ddit_adapter(name)):
        first = next(layer for layer in layers if name in layer.scaling)
        on = name in first.active_adapters and not first.disable_adapters
        identity[name] = f"{digest(weights[name])} scale {first.scaling[name]:g}{'' if on else ' off'}"
    return identity


def pipeline_loras(pipe) -> dict[str, dict[str, str]]:
    """``lora_identity`` of each of ``pipe``'s transformers and text encoders that holds LoRAs (a LoRA's
    text-encoder part changes the conditioning the transformer sees), by component name."""
    loaded_into = {name: m for name, m in pipe.components.items()
                   if name.startswith(("transformer", "text_encoder")) and isinstance(m, nn.Module)}
    return {name: style for name, m in loaded_into.items() if (style := lora_identity(m))}


def self_distill(pipe, prompts: Sequence[str | Prompt], out: str | os.PathLike, *, call: dict | None = None,
                 patch_sizes: Sequence[int] | None = None, rank: int = 8, shared_lora: bool = False,
                 config: DistillConfig | None = None, seed: int = 0, resume: bool = False,
                 checkpoint_minutes: float = 3.0, progress: bool = True,
                 accelerator: Accelerator | None = None, on_policy: PatchPolicy | None = None) -> Path:
    """Record ``pipe`` on ``prompts`` into ``out/states``, distil its adapter; returns ``out/adapter``. Once done,
    ``pipe``'s transformers hold no adapter, so that ``ddit.enable(pipe, returned_folder)`` can follow (not after
    FSDP, whose shards stay).

    ``call`` holds the pipeline's own arguments for the recording (``num_inference_steps``,
    ``height``, ``width``, ``num_frames``, ``guidance_scale``...); prompt i runs from seed
    ``seed + i``, with its own arguments if it is a ``Prompt`` that has some (an image-to-video
    pipeline's ``image``: ``read_prompts`` of a ``.jsonl`` file). ``config`` defaults to
    ``DistillConfig`` without the noise-level fields, which recorded states do not use. The written adapter loads with
    ``ddit.enable(pipe, out / "adapter")`` or ``MultiPatchTransformer.from_pretrained``.

    ``on_policy``: a second round. The pipeline runs the prompts again with the adapter
    enabled under this policy, so its coarse steps lead to latents the stock pipeline never
    visits (``out/on-policy/states``); training then goes on for ``config.steps`` more on
    both recordings together (``out/on-policy``; on the testbed this lowered the error
    where the sampler goes: docs/adapter.md). Returns ``out/on-policy/adapter`` then.

    Wan 2.2's second expert (``pipe.transformer_2``) is recorded beside the first and gets its own
    adapter, trained on its own steps in ``out/transformer_2`` and copied into the returned
    folder's ``transformer_2`` subfolder, where ``ddit.enable`` looks for it.
    """
    accelerator = accelerator or processes()
    call, out, prompts = dict(call or {}), Path(out), as_prompts(prompts)
    if not prompts:
        raise ValueError("no prompts to record; pass at least one")
    if on_policy is not None and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError("--on-policy samples the pipeline between two training rounds, which FSDP's sharded "
                         "transformer cannot do; record the on-policy round under a data-parallel accelerate "
                         "config (or one process), or drop --on-policy")
    check_call(pipe, call, prompts)
    denoisers = experts(pipe)
    quantized = [kind for m in denoisers.values() if (kind := storage(m))]
    if quantized and accelerator.distributed_type == DistributedType.FSDP:
        raise ValueError(f"the transformer is quantized ({quantized[0].split()[0]}), and FSDP's shards drop a "
                         "quantized layer's storage: distil it data-parallel (an accelerate config without FSDP) or "
                         "in one process, or the full-precision transformer under FSDP")
    try:
        specs = [spec_for(module) for module in denoisers.values()]
    except TypeError as err:  # no spec for this transformer: bad input here, not a bug
        raise ValueError(str(err)) from None
    if getattr(pipe, "controlnet", None) is not None:
        raise ValueError(f"{type(pipe).__name__} runs a ControlNet, whose residuals (a tensor the size of the "
                         "transformer's image tokens per ControlNet block, every step) distillation cannot record: "
                         "distil on the same model's pipeline without its ControlNet (its base model's folder, or "
                         "AutoPipelineForText2Image.from_pipe(pipe, controlnet=None) from Python); ddit.enable runs "
                         "that adapter in this pipeline")
    image_prompt = [name for name in (*call, *(n for p in prompts for n in p.inputs)) if "ip_adapter" in name]
    if image_prompt:
        raise ValueError(f"{image_prompt[0]}: distillation records the transformer's inputs, and an IP-Adapter's "
                         "image prompt (a list of image embeddings inside its attention kwargs) is not one it can "
                         "record; distil without the IP-Adapter (the adapter belongs to the transformer), and "
                         "ddit.enable runs it with the image prompt")
    base = specs[0].base_patch_size
    if any(s < base or s % base for s in patch_sizes or ()):
        raise ValueError(f"--sizes {','.join(map(str, patch_sizes))}: patch sizes are multiples of the base patch "
                         f"size {base} (e.g. {2 * base},{4 * base})")
    for module in denoisers.values():  # before recording: a LoRA on the patch layers, for one, is refused
        MultiPatchTransformer.check_backbone(module, patch_sizes, shared_lora)
    if rank < 1:
        raise ValueError(f"--rank must be at least 1, not {rank}")
    check_accelerator(accelerator)
    sizes = sorted({base, *(patch_sizes or (2 * base, 4 * base))})
    check_resolution(pipe, call, sizes, prompts)
    if pipe.transformer.dtype == torch.float16:
        raise ValueError("distil a bfloat16 or float32 pipeline (--dtype bfloat16): float16 training would "
                         "need loss scaling")
    config = config or DistillConfig(num_inference_steps=None, timestep_scale=None)
    loras = pipeline_loras(pipe)
    stored = {sub or "transformer": kind for sub, m in denoisers.items() if (kind := storage(m))}  # quantized
    identity = json.loads(json.dumps({  # as it reads back from recording.json (a tuple: a list)
        **{sub or "transformer": f"{type(m).__name__} {config_hash(m)}" for sub, m in denoisers.items()},
        "dtype": str(pipe.transformer.dtype), "call": call, "seed": seed, **({"loras": loras} if loras else {}),
        **({"storage": stored} if stored else {})}))
    states = out / "states"
    _check_recording(states / "recording.json", identity)

    if getattr(pipe, "_all_hooks", None):  # pipe.enable_model_cpu_offload(): records so, onto this process's device
        offload_onto(pipe, accelerator.device)
    else:
        pipe.to(accelerator.device)
    if accelerator.is_main_process:
        states.mkdir(parents=True, exist_ok=True)
        write_text_atomic(states / "recording.json", json.dumps(identity, indent=1))
    shares = range(accelerator.process_index, len(prompts), accelerator.num_processes)
    record_states(pipe, prompts, states, call, seed=seed, progress=progress and accelerator.is_main_process,
                  indices=shares)
    accelerator.wait_for_everyone()

    with torch.random.fork_rng(devices=[]):  # the LoRA starts from the training seed: a rerun makes the same
        torch.manual_seed(config.seed)  # first-round adapter, which an on-policy recording is stamped with
        models = {sub: MultiPatchTransformer(module, sizes[1:], rank=rank, shared_lora=shared_lora)
                  for sub, module in denoisers.items()}
    share = dict(config=config, resume=resume, checkpoint_minutes=checkpoint_minutes, progress=progress,
                 accelerator=accelerator, prompts=len(prompts))
    if on_policy is None:
        return _given_back(models, _distill_experts(pipe, models, [states], out, **share))
    _distill_experts(pipe, models, [states], out, **share)

    visited = out / "on-policy" / "states"
    # states recorded under another policy, or with other first-round adapters, must not be mixed in
    trained = {f"{sub}/{k}" if sub else k: v for sub, m in models.items() for k, v in m.adapter_state_dict().items()}
    on_policy_identity = json.loads(json.dumps({**identity, "policy": on_policy.name, "policy_params":
                                                _scalars(on_policy), "adapter": _digest(trained)}))
    _check_recording(visited / "recording.json", on_policy_identity)
    if accelerator.is_main_process:
        visited.mkdir(parents=True, exist_ok=True)
        write_text_atomic(visited / "recording.json", json.dumps(on_policy_identity, indent=1))
    enable(pipe, {sub or "transformer": m for sub, m in models.items()}, policy=on_policy)
    try:
        record_states(pipe, prompts, visited, call, seed=seed, modules=models,
                      progress=progress and accelerator.is_main_process, indices=shares)
    finally:
        disable(pipe)
        for model in models.values():  # disable gave the pipeline its stock transformers; training needs the LoRA
            model.attach()
    accelerator.wait_for_everyone()
    return _given_back(models, _distill_experts(pipe, models, [states, visited], out / "on-policy", **share))


def _given_back(models: dict[str, MultiPatchTransformer], export: Path) -> Path:
    """``export``, with the trained adapters taken off the pipeline's transformers, so that
    ``ddit.enable(pipe, export)`` can follow."""
    for model in models.values():
        model.detach()
    return export


def _distill_experts(pipe, models: dict[str, MultiPatchTransformer], recordings: list[Path], out: Path, *,
                     config: DistillConfig, accelerator: Accelerator, prompts: int, resume: bool, **share) -> Path:
    """Distil each expert's adapter on its own recorded calls (Wan 2.2's second in ``out/transformer_2``), one at
    a time, with the pipeline's other components off the device; returns ``out/adapter``, which holds the second
    expert's adapter in its ``transformer_2`` subfolder, as ``ddit.enable`` and ``load_adapters`` take it. The
    first expert trains last: its ``out/adapter`` appears only when the other is done. With ``resume``, a round
    or an expert that had not started yet (no checkpoint) starts fresh."""
    exports = {}
    for sub, model in reversed(models.items()):
        with _offloaded(pipe, accelerator.device, keep=model.backbone,
                        sharded=accelerator.distributed_type == DistributedType.FSDP):
            data = RecordedStates(*(folder / sub for folder in recordings), shared=model.spec.unbatched,
                                  prompts=prompts)
            started = (out / sub / "checkpoint.pt").exists()
            exports[sub] = distill(model, data, out / sub, config, accelerator=accelerator,
                                   resume=resume and started, **share)
    export = exports.pop("")
    if accelerator.is_main_process:
        for sub, folder in exports.items():
            shutil.copytree(folder, export / sub, dirs_exist_ok=True)
    accelerator.wait_for_everyone()
    return export


@contextmanager
def _offloaded(pipe, device, keep: torch.nn.Module, sharded: bool = False) -> Iterator[None]:
    """The pipeline's components other than ``keep``, the transformer that trains (text encoders, VAE, another
    expert: FLUX's T5 alone is 9.5 GB), on the CPU while it trains, back on ``device`` after. Under model CPU
    offload its hooks come off while training moves ``keep`` itself, and go back after, unless FSDP has
    ``sharded`` the transformers (nothing samples after an FSDP training: on-policy rounds are refused there)."""
    hooked = bool(getattr(pipe, "_all_hooks", None))
    if hooked:
        pipe.remove_all_hooks()
    others = [c for c in pipe.components.values() if isinstance(c, torch.nn.Module) and c is not keep]
    for component in others:
        component.to("cpu")
    try:
        yield
    finally:
        if hooked and not sharded:
            offload_onto(pipe, device)
        else:
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

