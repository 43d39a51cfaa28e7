"""Distillation of the multi-patch adapter (DDiT, Eq. 1).

The frozen backbone at its own patch size is the teacher, the adapter at each
coarse size the student, both on the same noisy latent:

    L = || student(z_t at p_new, t) - teacher(z_t at p, t) ||^2,

averaged over the coarse sizes. z_t comes from one of two places: the inputs a
stock pipeline's transformer received on the user's prompts (``RecordedStates``,
self-distillation: ``self_distill.py``), or clean latents noised where the sampler
goes, uniformly over the N noise levels of a flow-matching Euler scheduler with
z_t = (1 - t) x_0 + t noise (``NoisedLatents``, the testbed). Only the adapter's
parameters train.

Built on accelerate, so the same code runs on a CPU or under
``accelerate launch`` on several GPUs (each process draws its own batches), data
parallel or, for a backbone too large for one GPU, with accelerate's FSDP: the
adapter's weights and optimiser state are then gathered whole to be saved and
sharded again on resume (``sharding.py``), and the main process's clock decides
when all processes checkpoint together. Every random draw of step k comes from a
generator seeded by (seed, k, process), so a resumed run reproduces an
uninterrupted one.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, broadcast_object_list
from diffusers import FlowMatchEulerDiscreteScheduler
from torch import nn
from torch.utils.data import Dataset, default_collate

from .adapter import MultiPatchTransformer, config_hash
from .backbones import as_batch
from .checkpoint import CheckpointError, TrainingRun, write_text_atomic
from .processes import processes
from .sharding import sharded_like, whole
from .sampling import default_scheduler


@dataclass
class DistillConfig:
    steps: int = 2000
    batch_size: int = 32  # per process
    lr: float = 3e-4
    # for clean-latent data only (recorded states carry their own timesteps; None there):
    num_inference_steps: int | None = 50  # the sampler's N: t is one of its N noise levels
    timestep_scale: float | None = 1000.0  # the model's timestep is t * scale (DiT, SD3, Wan: 1000; Flux: 1)
    patch_sizes: tuple[int, ...] | None = None  # the coarse sizes to train; None: all of the adapter's
    seed: int = 0

    def __post_init__(self):
        if self.patch_sizes is not None:
            self.patch_sizes = tuple(self.patch_sizes)
        if self.steps < 0 or self.batch_size < 1 or not self.lr > 0:
            raise ValueError(f"--steps must be >= 0, --batch-size >= 1 and --lr > 0; got {self.steps}, "
                             f"{self.batch_size}, {self.lr}")



class LatentDataset(Dataset):
    """Clean latents with per-sample conditioning: ``LatentDataset(images, class_labels=labels)``.

    ``identity``: how the data was made, where that names it better than its values do (generated data, whose
    last bits may differ between machines); by default a resumed run checks a hash of the values.
    """

    def __init__(self, latents: torch.Tensor, *, identity: str | None = None, **conditioning: torch.Tensor):
        self.latents, self.conditioning, self.identity = latents, conditioning, identity

    def __len__(self) -> int:
        return len(self.latents)

    def __getitem__(self, i):
        return self.latents[i], {name: value[i] for name, value in self.conditioning.items()}

    def fingerprint(self) -> str:
        """What a resumed run checks that it still trains on: ``identity``, else a hash of every tensor."""
        return self.identity or digest({"latents": self.latents, **self.conditioning})


def digest(tensors: dict) -> str:
    """A short hash of named tensors' values (in name order), as an identity."""
    hashed = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        hashed.update(f"{name} {value.dtype} {tuple(value.shape)}".encode())
        hashed.update(value.reshape(-1).view(torch.uint8).numpy())
    return hashed.hexdigest()[:16]


class DistillationLoss(nn.Module):
    """Eq. 1 for every coarse size on one batch, as one call: DDP expects one forward per backward."""

    def __init__(self, model: MultiPatchTransformer, patch_sizes: tuple[int, ...]):
        super().__init__()
        self.model, self.patch_sizes = model, patch_sizes

    @property
    def _no_split_modules(self) -> list[str] | None:
        """The backbone's block classes, which accelerate's FSDP shards one by one when its config names
        none (``docs/fsdp.yaml``): those it keeps whole, else those it repeats (LTX-Video and LTX-2 name only
        these); None (the testbed DiT, whose forward reaches into its first block): the whole model is one unit."""
        backbone = self.model.backbone
        return getattr(backbone, "_no_split_modules", None) or getattr(backbone, "_repeated_blocks", None) or None

    def forward(self, z_t: torch.Tensor | list[torch.Tensor], kwargs: dict) -> torch.Tensor:
        """The loss of each coarse size, as a vector: summed over the backbone's outputs, each one's mean squared
        error counting once (LTX-2's audio, a few hundred tokens, as much as its video's thousands: a coarse
        video step changes the audio through the streams' cross-attention)."""
        def outputs(size=None):  # what the pipeline keeps of them (not an edit pipeline's reference tokens)
            out, *others = self.model(z_t, patch_size=size, **kwargs, return_dict=False)
            return [self.model.generated(as_batch(out), z_t, **kwargs).float(), *(o.float() for o in others)]

        with torch.no_grad():
            teacher = outputs()
        return torch.stack([sum(F.mse_loss(o, t) for o, t in zip(outputs(size), teacher))
                            for size in self.patch_sizes])


def check_accelerator(accelerator: Accelerator) -> None:
    """Refuses an accelerate config's mixed precision: it would run the teacher in bf16 or fp16 under autocast
    (fp16 with a loss scaler ddit does not use); a bf16 model already trains its adapter in fp32 under autocast."""
    if accelerator.mixed_precision != "no":
        raise ValueError(f"the accelerate config sets mixed_precision: {accelerator.mixed_precision}; ddit distils "
                         "in the model's own dtype (load the pipeline with --dtype bfloat16 for bf16): set "
                         "mixed_precision: no (accelerate config, or accelerate launch --mixed_precision no)")


def backbone_stamp(model: MultiPatchTransformer) -> str:
    return f"{type(model.backbone).__name__} {config_hash(model.backbone)}"


class _AdapterState:
    """What a checkpoint keeps of the model: the adapter's weights, stamped with its backbone."""

    def __init__(self, model: MultiPatchTransformer):
        self.model = model

    def state_dict(self) -> dict:
        return {"backbone": backbone_stamp(self.model), "layout": self._layout(),
                "weights": self.model.adapter_state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state["backbone"] != backbone_stamp(self.model):
            raise CheckpointError(f"this checkpoint distilled an adapter for {state['backbone']}, not for "
                                  f"{backbone_stamp(self.model)}; use another output folder")
        if state.get("layout", self._layout()) != self._layout():
            raise CheckpointError(f"this checkpoint trained an adapter with {state['layout']}, not "
                                  f"{self._layout()}: resume with the same --sizes, --rank and --shared-lora, or "
                                  "use another output folder")
        self.model.load_adapter_state_dict(state["weights"], source="checkpoint")

    def _layout(self) -> dict:
        """What the adapter's weights are laid out by: its sizes and its LoRA's."""
        lora = self.model.lora_config
        return {"patch_sizes": list(self.model.patch_sizes), "shared_lora": self.model.shared_lora,
                "rank": lora.r, "alpha": lora.lora_alpha, "targets": str(lora.target_modules)}


class _OptimizerState:
    """What a checkpoint keeps of the optimiser: its state, whole even where FSDP shards it."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        state = self.optimizer.state_dict()
        return {**state, "state": {i: {k: whole(v) for k, v in s.items()} for i, s in state["state"].items()}}

    def load_state_dict(self, state: dict) -> None:
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.optimizer.load_state_dict({**state, "state": {
            i: {k: sharded_like(v, params[i]) for k, v in s.items()} for i, s in state["state"].items()}})


def sampler_sigmas(num_steps: int, scheduler: FlowMatchEulerDiscreteScheduler | None = None) -> torch.Tensor:
    """The ``num_steps`` noise levels t that an Euler sampler feeds the model (1 is pure noise)."""
    scheduler = copy.deepcopy(scheduler) if scheduler is not None else default_scheduler()
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas[:-1].float()  # the last entry is the final 0, never a model input


class NoisedLatents:
    """Clean latents noised where the sampler goes: ``z_t = (1 - t) x_0 + t noise``, t one of its levels.

    ``draw(generator, n) -> (z_t, forward kwargs)``, as ``RecordedStates`` gives recorded ones.
    """

    def __init__(self, data: Dataset, sigmas: torch.Tensor, timestep_scale: float, extra_kwargs: dict | None = None):
        self.data, self.sigmas, self.timestep_scale = data, sigmas, timestep_scale
        self.extra_kwargs = extra_kwargs or {}

    def __len__(self) -> int:
        return len(self.data)

    def describe(self) -> dict:
        fingerprint = self.data.fingerprint() if hasattr(self.data, "fingerprint") else None
        shared = {k: v for k, v in self.extra_kwargs.items() if torch.is_tensor(v)}
        return {"latents": len(self.data), "fingerprint": fingerprint,
                "noise_levels": [round(float(t), 6) for t in self.sigmas],
                "shared": {**{k: repr(v) for k, v in self.extra_kwargs.items() if k not in shared},
                           **({"tensors": digest(shared)} if shared else {})}}

    def draw(self, generator: torch.Generator, batch_size: int) -> tuple[torch.Tensor, dict]:
        idx = torch.randint(len(self.data), (batch_size,), generator=generator)
        x0, conditioning = default_collate([self.data[int(i)] for i in idx])
        t = self.sigmas[torch.randint(len(self.sigmas), (len(idx),), generator=generator)]
        noise = torch.randn(x0.shape, generator=generator)
        t_ = t.view(-1, *[1] * (x0.ndim - 1))
        return (1 - t_) * x0 + t_ * noise, {**self.extra_kwargs, **conditioning, "timestep": t * self.timestep_scale}


def distill(
    model: MultiPatchTransformer,
    data,
    out: str | Path,
    config: DistillConfig | None = None,
    *,
    extra_kwargs: dict | None = None,
    scheduler: FlowMatchEulerDiscreteScheduler | None = None,
    resume: bool = False,
    checkpoint_minutes: float = 3.0,
    progress: bool = True,
    accelerator: Accelerator | None = None,
) -> Path:
    """Train ``model``'s adapter against its own backbone; returns the saved adapter, ``out/adapter``.

    ``data`` is either recorded transformer inputs (``ddit.recorded_states.RecordedStates``,
    used as they are) or a data set of clean latents: ``data[i]`` is ``(clean latent,
    {forward argument: value})``, in the form the backbone's ``hidden_states`` takes
    (packed for Flux), noised by ``NoisedLatents`` at the ``config.num_inference_steps``
    levels of ``scheduler`` (without dynamic shifting; the default is the testbed
    sampler's); ``extra_kwargs`` are forward arguments shared by every batch (Flux's
    ``img_ids``...), and the timestep is ``t * config.timestep_scale``. Checkpoints go to
    ``out/checkpoint.pt`` every ``checkpoint_minutes`` and at the end; ``resume``
    continues from there.
    """
    config, accelerator = config or DistillConfig(), accelerator or processes()
    out = Path(out)
    sizes = tuple(config.patch_sizes or model.patch_sizes[1:])
    if not hasattr(data, "draw") and next(iter(model._signature.parameters)) in model.spec.per_sample_lists:
        raise ValueError(f"{type(model.backbone).__name__} takes lists of per-sample inputs, which clean latents "
                         "noised here cannot give: distil it from its pipeline (ddit distill --pipeline DIR)")
    w_in, _, w_out, _ = model.spec.base_weights()
    if not hasattr(data, "draw") and w_in.shape[1] > w_out.shape[1]:
        raise ValueError(f"{type(model.backbone).__name__} takes {w_in.shape[1]} channels and returns "
                         f"{w_out.shape[1]}: its pipeline appends condition channels that noising clean latents "
                         "would noise too; distil it from its pipeline (ddit distill --pipeline DIR)")
    states = data if hasattr(data, "draw") else NoisedLatents(
        data, sampler_sigmas(config.num_inference_steps, scheduler), config.timestep_scale, extra_kwargs)
    check_accelerator(accelerator)
    bad = [s for s in sizes if s not in model.patch_sizes[1:]]
    if bad:
        raise ValueError(f"patch sizes {bad} are not this adapter's coarse sizes {model.patch_sizes[1:]}")
    trained = set(map(id, model.trainable_parameters(sizes)))
    for p in model.trainable_parameters():  # another size's are left out: DDP wants every trained one used
        p.requires_grad_(id(p) in trained)
    params, dtype = model.trainable_parameters(sizes), model.dtype
    if dtype == torch.float16:
        raise ValueError("distil in bfloat16 or float32: float16 training would need loss scaling")
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and not accelerator.is_fsdp2:
        raise ValueError("ddit distils under FSDP version 2 only (version 1 flattens the parameters the adapter "
                         "is saved from): set fsdp_version: 2 in the accelerate config, as docs/fsdp.yaml does")
    mixed = dtype == torch.bfloat16
    for p in params:  # a bf16 backbone: the adapter trains in fp32 under autocast, as mixed precision does
        p.data = p.data.float()
    opt = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    loss_fn, opt = accelerator.prepare(DistillationLoss(model, sizes).eval(), opt)
    params = model.trainable_parameters(sizes)  # FSDP replaced them with its shards
    data_description = states.describe()
    if accelerator.num_processes > 1:  # every process checks the main one's: one verdict on resume, never a hang
        data_description = broadcast_object_list([data_description])[0]
    run = TrainingRun(out / "checkpoint.pt", config, desc="distill", minutes=checkpoint_minutes,
                      progress=progress, writer=accelerator.is_main_process,
                      identity={"data": {k: v for k, v in data_description.items() if k != "folders"}},  # may move
                      agree=(lambda due: broadcast_object_list([due])[0]) if sharded else None,
                      adapter=_AdapterState(model), optimizer=_OptimizerState(opt))
    if resume:
        run.restore()
    segments = run.state.setdefault("processes", [])  # a resumed run may go on with other processes
    if segments and segments[-1] != accelerator.num_processes and accelerator.is_main_process:
        warnings.warn(f"{out} was trained on {segments[-1]} processes and goes on with {accelerator.num_processes}: "
                      "the batch per step changes with them, so the run differs from one on a fixed count")
    if segments[-1:] != [accelerator.num_processes]:
        segments.append(accelerator.num_processes)

    def to_device(v):
        """Conditioning keeps its dtype: a pipeline hands its transformer fp32 timesteps even in bf16, and
        rounding 985.6 to 984 would train at timesteps inference never passes."""
        if isinstance(v, dict):
            return {k: to_device(x) for k, x in v.items()}
        if isinstance(v, list):
            return [to_device(x) for x in v]
        return v.to(accelerator.device) if torch.is_tensor(v) else v

    def latent_to_device(z):  # a batch, or a list of per-sample latents (Z-Image)
        return [latent_to_device(x) for x in z] if isinstance(z, list) else z.to(accelerator.device, dtype)

    for step in run.steps():
        g = torch.Generator().manual_seed((config.seed * 1_000_003 + step) * 1_009 + accelerator.process_index)
        z_t, kwargs = states.draw(g, config.batch_size)
        with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=mixed):
            losses = loss_fn(latent_to_device(z_t), to_device(kwargs))
        accelerator.backward(losses.mean())
        accelerator.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        run.log(losses.tolist())

    accelerator.wait_for_everyone()
    for p in params:
        p.data = p.data.to(dtype)
    weights = model.adapter_state_dict()  # every process: FSDP gathers the shards
    export = out / "adapter"
    if accelerator.is_main_process:  # written beside, then put in place: a kill never leaves half an adapter
        staging = out / "adapter.partial"
        shutil.rmtree(staging, ignore_errors=True)
        model.save_pretrained(staging, weights)
        shutil.rmtree(export, ignore_errors=True)
        staging.rename(export)
        write_text_atomic(out / "distill.json", json.dumps(
            {"config": asdict(config), "backbone": backbone_stamp(model), "patch_sizes": sizes,
             "data": data_description, "processes": segments, "steps": run.state["step"],
             "seconds": round(run.state["seconds"], 1), "losses": run.state["losses"]}, indent=1))
    return export
