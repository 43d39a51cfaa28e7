"""Dynamic patches inside stock diffusers pipelines: ``ddit.enable(pipe, adapter)``, ``disable``, ``summary``.

``enable`` puts a ``DynamicPatchTransformer`` in ``pipe.transformer``: it takes the
pipeline's calls exactly as the backbone would, hands each to the shared
``PatchRuntime`` (decide per sample per step, group by size, run, put back), and
answers what pipelines and users ask of a transformer (config, dtype, device, cache
contexts, cache hooks, attention processors, gradient checkpointing). A plain
``pipe(...)`` then runs the policy; ``disable`` gives the pipeline its stock
transformer back. Wan 2.2's two experts get a wrapper each, over one runtime: one
policy decides every step, whichever expert runs it.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import warnings
import weakref
from collections.abc import Callable, Mapping
from contextlib import contextmanager, nullcontext
from functools import partial, update_wrapper
from pathlib import Path

import torch
from accelerate.hooks import AlignDevicesHook, CpuOffload
from diffusers.hooks.group_offloading import _is_group_offload_enabled
from diffusers.modular_pipelines.components_manager import CustomOffloadHook
from diffusers.pipelines.pag.pag_utils import PAGMixin
from torch import nn

from .adapter import ADAPTER_FILES, CONFIG_NAME, HOOK_ATTRIBUTES, MultiPatchTransformer, image_prompts
from .backbones import IP_ADAPTER, as_batch
from .caches import Cache, TeaCache, diffusers_caches, get_cache
from .policies import PatchPolicy, ProgressiveResolution, get_policy
from .pipeline_call import call_parameters, latent_factor
from .precise_latents import PreciseLatents
from .runtime import Call, PatchRuntime
from .summary import Summary
from .weights import local_or_hub

#: Where ``pipe.save_pretrained`` writes the adapter of an enabled pipeline, beside the stock components.
ADAPTER_FOLDER = "ddit_adapter"
#: The cache context of a call that holds both CFG branches as one batch (LTX-Video's pipelines): not a branch.
BOTH_BRANCHES = "cond_uncond"
#: The components that denoise: ``transformer``, and Wan 2.2's low-noise expert, which takes the later steps.
EXPERTS = ("transformer", "transformer_2")


#: Attributes that diffusers sets on a pipeline's transformer and that belong to the backbone inside the wrapper.
BACKBONE_ATTRIBUTES = ("encoder_hid_proj", "image_proj")


class DynamicPatchTransformer(nn.Module):
    """A pipeline's transformer that runs each sample at the patch size its policy picks, step by step."""

    def __init__(self, adapter: MultiPatchTransformer, runtime: PatchRuntime, pixels_per_latent: int | None = None,
                 guidance: Callable[[torch.Tensor], bool | None] | None = None, bins_resolution: bool = False,
                 precise: PreciseLatents | None = None):
        super().__init__()
        self.adapter = adapter
        self.runtime = runtime
        self._precise = precise or PreciseLatents()
        self.pixels_per_latent, self.bins_resolution = pixels_per_latent, bins_resolution
        self._guidance = guidance or (lambda timestep: None)
        self._signature = inspect.signature(adapter.backbone.forward)
        # diffusers' modular pipelines pass a transformer only the arguments its forward's signature names: this
        # one names the backbone's (a partial, not a closure, so that a deepcopy calls the copy)
        self.forward = partial(type(self).forward, self)
        self.forward.__signature__ = self._signature
        w_in, _, w_out, _ = adapter.spec.base_weights()
        # the channels the policies read: the noisy latent, without the condition channels that image-to-video and
        # fill pipelines append after it (HunyuanVideo 1.5, Wan I2V, FLUX Fill), which do not change between steps
        self._state_channels = w_out.shape[1] if w_out.shape[1] < w_in.shape[1] else None
        self._branch: str | None = None
        self._where: dict = {}
        self._cache_hooks = False  # whether a diffusers cache config is on the backbone's blocks
        self._manager: Callable[[], object] = lambda: None  # a modular pipeline's ComponentsManager (weakly held)

    # -- what a pipeline reads from its transformer
    @property
    def config(self):
        return self.adapter.config

    @property
    def dtype(self) -> torch.dtype:
        return self.adapter.dtype

    @property
    def device(self) -> torch.device:
        return self.adapter.device

    @property
    def policy(self) -> PatchPolicy:
        return self.runtime.policy

    def __getattr__(self, name: str):
        """Anything else (attention processors, gradient checkpointing...) is the adapter's, hence the backbone's."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            adapter = self.__dict__["_modules"].get("adapter")
            if adapter is None or name.startswith("__") or name in HOOK_ATTRIBUTES:
                raise
            return getattr(adapter, name)

    @contextmanager
    def cache_context(self, name: str, **where):
        """Stock Flux and Wan pipelines call once per CFG branch inside ``cache_context("cond")`` /
        ``("uncond")``: the name keeps the branches' cache state apart (LTX-Video names its batched call
        ``"cond_uncond"``: both branches, which the runtime tells apart itself); ``where`` (step_index,
        sigma...) is used when given."""
        self._branch, self._where = None if name == BOTH_BRANCHES else name, where
        try:
            yield
        finally:
            self._branch, self._where = None, {}

    def _reset_stateful_cache(self, recurse: bool = True) -> None:
        """Called by diffusers after each pipeline call: the next call starts a new generation."""
        self.runtime.reset()
        self.adapter._reset_stateful_cache(recurse=recurse)

    def enable_cache(self, config) -> None:
        """A diffusers cache config on the backbone's blocks, kept per group of one patch size."""
        check_diffusers_cache(self.adapter.backbone, config)
        self._cache_hooks = True  # first: if enabling fails part-way, disable_cache removes what it placed
        self.adapter.backbone.enable_cache(config)
        self.runtime.use(self.adapter, self._hooks)

    def disable_cache(self) -> None:
        self.adapter.backbone.disable_cache()
        self._cache_hooks = False
        self.runtime.use(self.adapter, None)

    @property
    def _hooks(self) -> nn.Module | None:
        """The module whose diffusers cache hooks need a context per group: the backbone, while they are on."""
        return self.adapter.backbone if self._cache_hooks else None

    def enable_group_offload(self, *args, **kwargs) -> None:
        """Refused (``pipe.enable_group_offload`` calls it): see ``check_offloading``."""
        raise ValueError(f"group offloading {_PER_LAYER_OFFLOAD}")

    def __setattr__(self, name: str, value) -> None:
        """What diffusers' IP-Adapter loaders set on the transformer they hold (``pipe.unload_ip_adapter()``:
        ``encoder_hid_proj = None``) is the backbone's."""
        if name in BACKBONE_ATTRIBUTES and "adapter" in self.__dict__.get("_modules", {}):
            setattr(self.adapter.backbone, name, value)
        else:
            super().__setattr__(name, value)

    # -- forward
    def forward(self, *args, **kwargs):
        if "_hf_hook" in self.__dict__ and _placed_layer_by_layer(self):  # pipe.enable_sequential_cpu_offload()
            raise ValueError(f"sequential CPU offload (or a device map) {_PER_LAYER_OFFLOAD}")
        if isinstance(self.adapter.backbone.__dict__.get("_hf_hook"), CustomOffloadHook):
            # the manager hooked the models it holds again (auto offload enabled after ddit.enable, or a model
            # added to or removed from the manager): the hook comes onto this wrapper, which the call then enters
            if not _move_manager_offload(self._manager(), self.adapter.backbone, self):
                raise ValueError(f"{_UNKNOWN_MANAGER}; or call ddit.disable(pipe) before the manager hooks its models")
            return self(*args, **kwargs)
        if self._group_offload_marks() and _is_group_offload_enabled(self):  # apply_group_offloading(this)
            raise ValueError(f"group offloading {_PER_LAYER_OFFLOAD}")
        given, spec = self._signature.bind(*args, **kwargs).arguments, self.adapter.spec
        latent = spec.latent(given)
        self._check_resolution(latent)
        refused = [name for name in spec.unsupported if given.get(name) is not None]
        refused += image_prompts(given, spec) + _misplaced_image_prompts(given, len(latent))
        if refused:  # at the first call, not at the first coarse step
            raise ValueError(f"{', '.join(refused)} cannot be used with dynamic patches "
                             "(they hold the fine grid's tokens, or the backbone reads them in its own forward)")
        self.adapter.check_residuals(given, latent)
        controlled = any(given.get(name) is not None for name in spec.residuals)
        if self.runtime.cache is not None and spec.single_stream and controlled:
            raise ValueError("ddit's feature caches run a single-stream block stack (Sana's) whole inside its first "
                             "block's call, so a ControlNet's residuals, added between its blocks, would land after "
                             "it: run the ControlNet pipeline without the cache, or the cache without the ControlNet")
        where = self._where
        timestep = spec.timestep(given)
        cfg = None if self._branch is not None else self._guidance(timestep) if spec.batched_cfg else False
        references, side = spec.references(given), spec.side_tokens(given)
        self._precise.watch(self.runtime.scheduler() if self.runtime.scheduler else None)
        first, hidden = next(iter(given.items()))
        precise = self._precise.latent_for(hidden)
        if precise is not None:
            precise = spec.latent({**given, first: precise})[:, :self._state_channels]
        call = Call(latent[:, :self._state_channels], timestep,
                    lambda idx, size: _generated(spec, self._run(args, kwargs, len(latent), idx, size), given),
                    branch=self._branch, branches=None if cfg is None else 1 + cfg,
                    step_index=where.get("step_index"), num_steps=where.get("num_inference_steps"),
                    sigma=where.get("sigma"),
                    beside=(lambda size: side + sum(self.adapter.reference_tokens(r, size) for r in references))
                    if references or side else None, precise=precise)
        self.runtime.use(self.adapter, self._hooks)  # Wan 2.2's second expert takes over mid-generation
        out, *others = _outputs(self.runtime(call))
        if isinstance(next(iter(given.values())), list):  # a list of per-sample latents in, a list out (Z-Image)
            out = list(out.unbind())
        return spec.output((out, *others), given.get("return_dict", True))

    def _run(self, args: tuple, kwargs: dict, rows: int, idx: torch.Tensor | None, size: int):
        """The adapter's output for rows ``idx`` (all: ``None``) of this call, at ``size``; a tuple, the latent's
        first, where the backbone has several (LTX-2's video and audio)."""
        if idx is not None:
            given, spec = self._signature.bind(*args, **kwargs), self.adapter.spec
            for k, v in given.arguments.items():
                if k in spec.residuals and v is not None:
                    given.arguments[k] = type(v)(_cut(r, idx, rows) for r in v)
                elif k not in spec.unbatched:
                    cut = spec.cut(k, v, idx, rows)
                    given.arguments[k] = _cut(v, idx, rows, k in spec.per_sample_lists, k in spec.row_blocks) \
                        if cut is NotImplemented else cut
            args, kwargs = given.args, given.kwargs
        result = self.adapter(*args, **kwargs, patch_size=size)
        fields = len(self.adapter.spec.output_fields)
        return as_batch(result[0]) if fields == 1 else (as_batch(result[0]), *result[1:fields])

    def _group_offload_marks(self) -> bool:
        """Cheap signs (checked every call) of group offloading applied to this module: at block level it hooks
        this module itself, at leaf level every leaf, the adapter's heads included."""
        return "_diffusers_hook" in self.__dict__ or any(
            "_diffusers_hook" in head.embed.__dict__ for head in self.adapter.heads.values())

    def _check_resolution(self, latent: torch.Tensor) -> None:
        h, w = latent.shape[-2:]
        sizes = self.runtime.candidates
        if h % sizes[-1] or w % sizes[-1]:
            multiple = (f"{sizes[-1] * self.pixels_per_latent} pixels" if self.pixels_per_latent
                        else f"{sizes[-1]} latent pixels")
            binned = (" (this pipeline moves the requested size to its nearest resolution bin unless called "
                      "with use_resolution_binning=False)" if self.bins_resolution else "")
            raise ValueError(f"patch sizes {', '.join(map(str, sizes))} need a latent whose height and width are "
                             f"multiples of {sizes[-1]}, not {h}x{w}: use an image height and width that are "
                             f"multiples of {multiple}{binned}")
        self.adapter.spec.check_sizes(tuple(latent.shape[2:]), tuple(sizes))


def _misplaced_image_prompts(given: dict, rows: int) -> list[str]:
    """An image prompt whose rows are not the call's (SD3's skip-layer guidance call passes its latent's rows with
    both CFG branches' image prompts), which no group of rows could be given, named for an error message."""
    return [f"{name}['{IP_ADAPTER}'] ({len(t)} rows of image prompt for {rows} latent rows: skip-layer guidance "
            "with an IP-Adapter is not supported)" for name, value in given.items()
            if isinstance(value, dict) and IP_ADAPTER in value
            for t in (value[IP_ADAPTER] if isinstance(value[IP_ADAPTER], (list, tuple)) else [value[IP_ADAPTER]])
            if torch.is_tensor(t) and t.ndim and len(t) not in (rows, 1)][:1]


def _outputs(result) -> tuple:
    """A call's outputs as a tuple, the latent's first: one tensor, or a backbone's several (LTX-2)."""
    return result if isinstance(result, tuple) else (result,)


def _generated(spec, result, given: dict):
    """The part of a call's ``result`` a pipeline keeps (``BackboneSpec.generated``), its other outputs as they are."""
    out, *others = _outputs(result)
    out = spec.generated(out, given)
    return (out, *others) if others else out


def _cut(value, idx: torch.Tensor, rows: int, listed: bool = False, blocked: bool = False):
    """``value``'s entries for rows ``idx``, if it has one entry per row (tensors, dicts of them, and lists where
    the spec says they hold one entry per sample: ``listed``), or one block of entries per row (``blocked``)."""
    if isinstance(value, torch.Tensor) and value.ndim and len(value) == rows:
        return value[idx.to(value.device)]
    if blocked and isinstance(value, torch.Tensor) and value.ndim and len(value) % rows == 0:
        return value.unflatten(0, (rows, -1))[idx.to(value.device)].flatten(0, 1)
    if listed and isinstance(value, list) and len(value) == rows:
        return [value[i] for i in idx.tolist()]
    if isinstance(value, dict):  # attention kwargs, with their lists of per-row tensors (IP-Adapters' image prompts)
        return {k: _cut_each(v, idx, rows) if isinstance(v, (list, tuple)) else _cut(v, idx, rows)
                for k, v in value.items()}
    return value


def _cut_each(values, idx: torch.Tensor, rows: int):
    """A list or tuple of tensors cut by row where every one has one entry per row; else whole, as one value."""
    if values and all(torch.is_tensor(t) and t.ndim and len(t) == rows for t in values):
        return type(values)(t[idx.to(t.device)] for t in values)
    return values


def check_diffusers_cache(backbone: nn.Module, config) -> None:
    """Refuse, before any work, a diffusers cache config that cannot run under dynamic patches."""
    if not hasattr(backbone, "enable_cache"):
        raise ValueError(f"{type(backbone).__name__} has no diffusers cache hooks (it is not a CacheMixin); use "
                         "ddit's caches (cache='teacache' or 'taylorseer') where its blocks allow, or no cache")
    supported = tuple(diffusers_caches().values())
    if not isinstance(config, supported):
        raise ValueError(f"{type(config).__name__} is not supported with dynamic patches; supported diffusers "
                         f"caches: {', '.join(c.__name__ for c in supported)}, or ddit's 'teacache'/'taylorseer'")
    if getattr(config, "use_lite_mode", False):
        raise ValueError("TaylorSeerCacheConfig(use_lite_mode=True) predicts the model's own proj_out, which "
                         "coarse steps do not run: use the default mode")
    patterns = [*(getattr(config, "cache_identifiers", None) or []),
                *(getattr(config, "skip_predict_identifiers", None) or [])]
    outside = [name for name, _ in backbone.named_modules() if any(re.fullmatch(p, name) for p in patterns)
               and not re.match(r"(transformer_blocks|single_transformer_blocks|blocks)\.\d+\.", name)]
    if outside:
        raise ValueError(f"the cache's identifiers match modules outside the transformer blocks ({outside[:3]}), "
                         "which coarse steps replace with their own layers: match block modules only")
    if backbone.is_cache_enabled:
        raise ValueError(f"{type(backbone).__name__} already has a diffusers cache enabled; disable it "
                         "(transformer.disable_cache()) and pass its config to ddit.enable(..., cache=config)")


_PER_LAYER_OFFLOAD = ("places the transformer layer by layer, and coarse steps run layers it does not place (the "
              "adapter's heads and LoRA branches): load the pipeline again and use pipe.enable_model_cpu_offload() "
              "instead, before or after ddit.enable; it moves the whole transformer, adapter included")


def check_offloading(transformer: nn.Module, name: str = "transformer") -> None:
    """Refuse offloading that moves the transformer's layers one by one (accelerate's sequential CPU offload,
    diffusers' group offloading). Model CPU offload moves whole components: ``enable`` and ``disable`` hook
    the new transformer again, as diffusers does after every call."""
    if _placed_layer_by_layer(transformer) or any(p.is_meta for p in transformer.parameters()):
        raise ValueError(f"pipe.{name} is under sequential CPU offload or a device map (its weights are on "
                         f"the meta device or placed by accelerate's hooks), which {_PER_LAYER_OFFLOAD}")
    if _is_group_offload_enabled(transformer):
        raise ValueError(f"pipe.{name} has group offloading enabled, which {_PER_LAYER_OFFLOAD}")


def _placed_layer_by_layer(module: nn.Module) -> bool:
    """Whether accelerate's hooks place ``module``'s layers one by one (sequential CPU offload, a device map that
    splits it) rather than the whole module: model CPU offload, or a device map that puts it whole on one device
    (every hook then only aligns inputs with that device and offloads nothing)."""
    hook = module.__dict__.get("_hf_hook")
    if hook is None or isinstance(hook, (CpuOffload, CustomOffloadHook)):  # the latter: a ComponentsManager's
        return False
    hooks = [m.__dict__["_hf_hook"] for m in module.modules() if "_hf_hook" in m.__dict__]
    aligned = all(isinstance(h, AlignDevicesHook) and not h.offload for h in hooks)
    return not aligned or len({str(h.execution_device) for h in hooks}) > 1


def offload_onto(pipe, device: torch.device | str) -> None:
    """``pipe.enable_model_cpu_offload(device=device)``, onto that very device: diffusers reads GPU index 0 as
    unset and keeps an earlier offload's index, so a pipeline offloaded onto cuda:1 would stay there (and reads a
    bare "cuda" as that index too, where torch reads the current device)."""
    device = torch.device(device)
    index = device.index
    if index is None:  # a bare "cuda" is the current device, as torch reads it
        current = getattr(getattr(torch, device.type, None), "current_device", None)
        index = current() if device.type != "cpu" and current is not None else 0
    pipe._offload_gpu_id = index
    pipe.enable_model_cpu_offload(device=device)


_UNKNOWN_MANAGER = ("the transformer carries a ComponentsManager's auto CPU offload hook, which would move it without "
                    "the adapter's layers, but the pipeline names no manager that holds it (pipe._components_manager), "
                    "so ddit cannot move the hook onto its wrapper: load the pipeline with "
                    "ModularPipeline.from_pretrained(..., components_manager=manager)")


def _move_manager_offload(manager, old: nn.Module, new: nn.Module) -> bool:
    """A modular pipeline's ``ComponentsManager.enable_auto_cpu_offload()`` hooks each model it holds, to move the
    whole model to the GPU when called: the hook moves from ``old`` to ``new``, which takes ``old``'s place.
    Returns whether ``old`` is free of such a hook now."""
    for user_hook in getattr(manager, "model_hooks", None) or []:
        if user_hook.model is old:
            user_hook.remove()
            user_hook.model = new
            user_hook.attach()
    return not isinstance(old.__dict__.get("_hf_hook"), CustomOffloadHook)


@contextmanager
def _model_offload_renewed(pipe):
    """Under ``pipe.enable_model_cpu_offload()`` each component carries a hook that moves it to the GPU when
    called: a transformer put in its place gets one too (diffusers renews them after every call the same way)."""
    device = getattr(pipe, "_offload_device", None) if getattr(pipe, "_all_hooks", None) else None
    if device is not None:
        pipe.remove_all_hooks()
    try:
        yield
    finally:
        if device is not None:
            offload_onto(pipe, device)


def enable(pipe, adapter: str | os.PathLike | MultiPatchTransformer | Mapping,
           policy: str | PatchPolicy = "third_order", cache=None, **params):
    """Run ``policy`` inside ``pipe``: every ``pipe(...)`` after this picks each sample's patch size per step.

    ``adapter``: a folder written by ``MultiPatchTransformer.save_pretrained`` (or a pipeline folder
    that ``pipe.save_pretrained`` wrote while enabled), or a ``MultiPatchTransformer`` over
    ``pipe.transformer``. A pipeline with two experts (Wan 2.2: ``pipe.transformer_2`` takes the
    low-noise steps) takes the folder's ``transformer_2`` subfolder for the second (``ddit distill
    --pipeline`` writes both), or a mapping ``{"transformer": ..., "transformer_2": ...}`` of folders
    or adapters; both experts then share one policy and its history across the switch.
    ``policy``: a name (plugins included; ``params`` go to it) or an instance.
    ``cache``: ``None``, a ddit cache name or instance, or a diffusers cache config
    (``FirstBlockCacheConfig``, ``TaylorSeerCacheConfig``). Everything is checked before the
    pipeline changes. Returns ``pipe``.
    """
    transformer = getattr(pipe, "transformer", None)
    if any(isinstance(_uncompiled(getattr(pipe, name, None)), DynamicPatchTransformer) for name in EXPERTS):
        raise ValueError("ddit.enable: this pipeline is already enabled; call ddit.disable(pipe) first")
    if not isinstance(transformer, nn.Module):
        raise ValueError(f"ddit.enable needs a pipeline with a transformer, not {type(pipe).__name__}")
    manager = getattr(pipe, "_components_manager", None)
    for name in EXPERTS:
        expert = getattr(pipe, name, None)
        if isinstance(expert, nn.Module):
            check_offloading(expert, name)
            hooked = isinstance(expert.__dict__.get("_hf_hook"), CustomOffloadHook)
            if hooked and not any(h.model is expert for h in getattr(manager, "model_hooks", None) or []):
                raise ValueError(f"pipe.{name}: {_UNKNOWN_MANAGER}")
            if getattr(expert, "is_cache_enabled", False):
                raise ValueError(f"pipe.{name} has a diffusers cache enabled; disable it "
                                 f"(pipe.{name}.disable_cache()) and pass its config to ddit.enable(..., cache=config)")
    _check_guider(getattr(pipe, "guider", None))
    if isinstance(pipe, PAGMixin):
        raise ValueError(f"{type(pipe).__name__} batches a third branch per sample (perturbed-attention guidance), "
                         "which ddit does not tell apart from samples: use the pipeline without PAG")
    policy = _policy(policy, params)
    cache = get_cache(cache) if isinstance(cache, str) else cache
    adapters, wrappers = _adapters(pipe, adapter), {}
    try:
        first = adapters["transformer"]
        if len({a.patch_sizes for a in adapters.values()}) > 1:
            raise ValueError("the two experts' adapters run different patch sizes "
                             f"({', '.join(f'{n}: {a.patch_sizes}' for n, a in adapters.items())}); distil them "
                             "together (ddit distill --pipeline) so that one policy can pick among the same sizes")
        if len(adapters) > 1 and isinstance(cache, TeaCache):
            raise ValueError("TeaCache's rescaling polynomial is fitted to one model, and the two experts are two "
                             "models: use cache='taylorseer' or a diffusers cache config on a pipeline with two "
                             "experts")
        for a in adapters.values():
            if isinstance(cache, Cache):
                cache.check(a)
            elif cache is not None:
                check_diffusers_cache(a.backbone, cache)
        runtime = PatchRuntime(policy, first.patch_sizes, cache=cache if isinstance(cache, Cache) else None,
                               model=first, scheduler=_scheduler_of(pipe), patch=first.spec.patch)
        binning = "use_resolution_binning" in call_parameters(pipe)
        precise = PreciseLatents()  # one for both experts: they share the scheduler
        wrappers = {name: DynamicPatchTransformer(a, runtime, latent_factor(pipe), _guidance_of(pipe), binning,
                                                  precise) for name, a in adapters.items()}
        if cache is not None and not isinstance(cache, Cache):
            for wrapper in wrappers.values():
                wrapper.enable_cache(cache)
    except Exception:
        for wrapper in wrappers.values():
            if wrapper._cache_hooks:
                wrapper.disable_cache()
        for a in adapters.values():
            a.detach()
        raise
    if _calls_second_expert(pipe) and "transformer_2" not in adapters:
        warnings.warn("pipe.transformer_2 (the low-noise expert) stays stock: its steps run at the base size, "
                      "without the cache, and are not in ddit.summary; give its adapter as the adapter folder's "
                      "transformer_2 subfolder (ddit distill --pipeline writes it)", stacklevel=2)
    with _model_offload_renewed(pipe):
        for name, wrapper in wrappers.items():
            wrapper._manager = weakref.ref(manager) if manager is not None else wrapper._manager
            wrapper.adapter.set_lean_base(True)
            _move_manager_offload(manager, _uncompiled(getattr(pipe, name)), wrapper)
            setattr(pipe, name, wrapper)
    pipe.save_pretrained = _SaveWithAdapter(pipe)
    for name in (*PIPE_STYLE_CALLS, *PIPE_LORA_CHANGES, *PIPE_LORA_REFUSED):
        if callable(getattr(type(pipe), name, None)):
            setattr(pipe, name, _PipeLoraCall(pipe, name))
    return pipe


def disable(pipe):
    """Give ``pipe`` its stock transformers back (LoRA layers out, ddit's cache hooks off). Returns ``pipe``."""
    wrappers = _wrappers(pipe)
    if not wrappers:
        raise ValueError("ddit.disable: this pipeline is not enabled (call ddit.enable(pipe, adapter) first)")
    for wrapper in wrappers.values():
        wrapper._precise.unwatch()
        if wrapper._cache_hooks:
            wrapper.disable_cache()
    with _model_offload_renewed(pipe):
        for name, wrapper in wrappers.items():
            wrapper.adapter.set_lean_base(False)
            _move_manager_offload(wrapper._manager(), wrapper, wrapper.adapter.backbone)
            setattr(pipe, name, wrapper.adapter.detach())
    for name in ("save_pretrained", *PIPE_STYLE_CALLS, *PIPE_LORA_CHANGES, *PIPE_LORA_REFUSED):
        vars(pipe).pop(name, None)
    return pipe


def load_adapters(pipe, path: str | os.PathLike) -> dict[str, MultiPatchTransformer]:
    """The adapters saved at ``path`` over ``pipe``'s experts: ``path`` itself for ``pipe.transformer``, and its
    ``transformer_2`` subfolder, if there is one, for Wan 2.2's ``pipe.transformer_2``. A pipeline folder that
    ``pipe.save_pretrained`` wrote while enabled holds them in its ``ddit_adapter`` folder."""
    path = adapter_folder(path)
    second = getattr(pipe, "transformer_2", None)
    if (path / "transformer_2" / CONFIG_NAME).exists() and not isinstance(second, nn.Module):
        raise ValueError(f"{path} holds an adapter for a second expert (transformer_2), but this "
                         f"{type(pipe).__name__} has none: load the pipeline that it was distilled from")
    adapters = {"transformer": MultiPatchTransformer.from_pretrained(pipe.transformer, path)}
    if isinstance(second, nn.Module) and (path / "transformer_2" / CONFIG_NAME).exists():
        try:
            adapters["transformer_2"] = MultiPatchTransformer.from_pretrained(second, path / "transformer_2")
        except Exception:
            adapters["transformer"].detach()
            raise
    return adapters


def adapter_folder(path: str | os.PathLike) -> Path:
    """Where the adapter at ``path`` lies: ``path``, or the ``ddit_adapter`` folder of a pipeline folder that
    ``pipe.save_pretrained`` wrote while enabled; ``path`` may be a Hub repository id (``owner/name``) holding
    either, of which only the adapters' files are downloaded."""
    path = local_or_hub(path, [f"{folder}{name}" for folder in ("", "transformer_2/", f"{ADAPTER_FOLDER}/",
                                                                 f"{ADAPTER_FOLDER}/transformer_2/")
                               for name in ADAPTER_FILES])
    if not (path / CONFIG_NAME).exists() and (path / ADAPTER_FOLDER / CONFIG_NAME).exists():
        return path / ADAPTER_FOLDER
    return path


def _calls_second_expert(pipe) -> bool:
    """Whether the pipeline hands some steps to ``pipe.transformer_2`` (Wan 2.2: below its ``boundary_ratio``)."""
    config = getattr(pipe, "config", None) or {}
    return isinstance(getattr(pipe, "transformer_2", None), nn.Module) and config.get("boundary_ratio") is not None


def _adapters(pipe, adapter) -> dict[str, MultiPatchTransformer]:
    """``enable``'s ``adapter`` as attached adapters by expert name, each checked to wrap that expert."""
    if isinstance(adapter, Mapping):
        unknown = sorted(set(adapter) - set(EXPERTS))
        if unknown or "transformer" not in adapter:
            raise ValueError(f"ddit.enable: adapters are given by expert ({', '.join(EXPERTS)}), with one for "
                             f"transformer; got {sorted(adapter)}")
        given = dict(adapter)
    elif isinstance(adapter, MultiPatchTransformer):
        given = {"transformer": adapter}
    else:
        return load_adapters(pipe, adapter)
    adapters = {}
    try:
        for name, value in given.items():
            expert = getattr(pipe, name, None)
            if not isinstance(expert, nn.Module):
                raise ValueError(f"ddit.enable: an adapter is given for pipe.{name}, which this pipeline lacks")
            if not isinstance(value, MultiPatchTransformer):
                folder = adapter_folder(value)
                if name == "transformer_2" and (folder / name / CONFIG_NAME).exists():
                    folder = folder / name  # the folder ddit distill wrote for both: the second's is inside
                value = MultiPatchTransformer.from_pretrained(expert, folder)
            elif value.backbone is not expert:
                raise ValueError(f"ddit.enable: the adapter wraps another transformer than pipe.{name}; build it "
                                 f"over pipe.{name}, or pass the folder it was saved to")
            value.attach()
            adapters[name] = value
    except Exception:  # nothing changes on a refusal: the adapters placed so far leave their experts again
        for placed in adapters.values():
            placed.detach()
        raise
    return adapters


def _wrappers(pipe) -> dict[str, "DynamicPatchTransformer"]:
    """The enabled experts' wrappers by name (none: not enabled)."""
    found = {name: _uncompiled(getattr(pipe, name, None)) for name in EXPERTS}
    return {name: w for name, w in found.items() if isinstance(w, DynamicPatchTransformer)}


def _check_guider(guider) -> None:
    """Refuse a diffusers guider that hooks the transformer's layers for some of its calls (skip-layer, perturbed
    attention, smoothed energy, auto guidance): it looks for them by name in the module it is given, and inside
    ddit's wrapper they sit under another name."""
    from diffusers.guiders.guider_utils import BaseGuidance

    if isinstance(guider, BaseGuidance) and type(guider).prepare_models is not BaseGuidance.prepare_models:
        raise ValueError(f"{type(guider).__name__} changes the transformer's layers for some calls, which it cannot "
                         "find inside ddit's wrapper: give the pipeline a guider that does not "
                         "(ClassifierFreeGuidance, AdaptiveProjectedGuidance, ...)")


def _policy(policy: str | PatchPolicy, params: dict) -> PatchPolicy:
    if isinstance(policy, str):
        policy = get_policy(policy, **params)
    elif not isinstance(policy, PatchPolicy):
        raise TypeError(f"policy must be a name or a PatchPolicy, not {type(policy).__name__}")
    elif params:
        raise ValueError(f"parameters {sorted(params)} go to a policy given by name; this one is an instance "
                         "already: set them when you construct it")
    if isinstance(policy, ProgressiveResolution):
        raise ValueError("progressive resolution changes the latent's size between steps, which a pipeline's own "
                         "loop does not allow: run it with ddit.progressive_call(pipe, switch, **call) instead")
    return policy


def _uncompiled(module):
    """The module inside a ``torch.compile`` wrapper (``pipe.transformer = torch.compile(pipe.transformer)``)."""
    return getattr(module, "_orig_mod", module)


def _scheduler_of(pipe):
    """The scheduler of the pipeline ``enable`` was given, while it lives; else the one it had, which pipelines
    made from it by ``from_pipe`` share."""
    ref, scheduler = weakref.ref(pipe), getattr(pipe, "scheduler", None)
    return lambda: getattr(ref(), "scheduler", scheduler)


def _guidance_of(pipe) -> Callable[[torch.Tensor], bool | None]:
    """Whether the pipeline's call at a timestep batches CFG branches, where it says (SD3's
    ``do_classifier_free_guidance``); ``None`` leaves it to the runtime (identical halves). Not asked for the
    families whose pipelines call once per branch (``BackboneSpec.batched_cfg``). Z-Image stops guiding
    once its timestep (its normalised time, 0 at pure noise) passes ``cfg_truncation``, which img2img can
    do from the first step."""
    ref, z_image = weakref.ref(pipe), type(pipe).__module__.startswith("diffusers.pipelines.z_image")

    def batched(timestep: torch.Tensor) -> bool | None:
        try:
            value = getattr(ref(), "do_classifier_free_guidance", None)
        except AttributeError:  # a property that reads what only a call sets
            return None
        truncation = getattr(ref(), "_cfg_truncation", None) if z_image else None
        if value is True and truncation is not None and float(truncation) <= 1:
            value = float(torch.as_tensor(timestep).flatten()[0]) <= float(truncation)
        return value if isinstance(value, bool) else None

    return batched


@contextmanager
def _stock_transformers(pipe, rebuild: bool = False):
    """The enabled pipeline with its stock transformers for a moment (ddit's LoRA out of them, a style LoRA's
    left in), enabled again after. With ``rebuild`` the call may load or remove LoRA layers: an expert's adapter
    whose layers changed is then built again over its transformer as it is, with the same weights, under fresh
    model-offload hooks; if ddit cannot run beside those LoRAs, the pipeline is left disabled, saying why."""
    wrappers = _wrappers(pipe)
    held = {name: getattr(pipe, name) for name in wrappers}  # as they are, compiled or not
    with _model_offload_renewed(pipe) if rebuild else nullcontext():
        try:
            for name, wrapper in wrappers.items():
                setattr(pipe, name, wrapper.adapter.detach())
            yield
        except BaseException as error:
            refused = _enabled_again(pipe, wrappers, held, rebuild)
            if refused is not None:
                disable(pipe)
                error.add_note(f"ddit: the pipeline is disabled, its adapter refused after this error: {refused}")
            raise
        refused = _enabled_again(pipe, wrappers, held, rebuild)
        if refused is not None:
            disable(pipe)
            raise ValueError(f"ddit's adapter cannot run beside the transformer's LoRAs as they are now, so the "
                             f"pipeline is disabled (ddit.enable it again once they suit): {refused}") from refused


def _enabled_again(pipe, wrappers: dict, held: dict, rebuild: bool) -> Exception | None:
    """Each expert's adapter back on its transformer (built again if ``rebuild`` and its LoRA layers changed), and
    the wrappers back in the pipeline, whatever fails; returns the first refusal."""
    refused = None
    for name, wrapper in wrappers.items():
        try:
            if rebuild and wrapper.adapter.changed():
                wrapper.adapter = wrapper.adapter.rebuilt()
            else:
                wrapper.adapter.attach()
        except Exception as error:
            refused = refused or error
        setattr(pipe, name, held[name])
    return refused


class _SaveWithAdapter:
    """``pipe.save_pretrained`` of an enabled pipeline: the stock pipeline, and the adapter in
    ``ADAPTER_FOLDER`` (a second expert's in its ``transformer_2`` subfolder);
    ``ddit.enable(type(pipe).from_pretrained(DIR), DIR)`` gives it back."""

    def __init__(self, pipe):
        self.pipe = weakref.ref(pipe)

    def __call__(self, save_directory, *args, **kwargs):
        pipe = self.pipe()
        wrappers = _wrappers(pipe)
        folder = Path(save_directory) / ADAPTER_FOLDER
        if "transformer_2" not in wrappers:  # a second expert's adapter from an earlier save is not this one's
            shutil.rmtree(folder / "transformer_2", ignore_errors=True)
        for name, wrapper in wrappers.items():  # first: a hub push takes them along
            wrapper.adapter.save_pretrained(folder if name == "transformer" else folder / name)
        with _stock_transformers(pipe):
            type(pipe).save_pretrained(pipe, os.fspath(save_directory), *args, **kwargs)  # modular: str only


#: The pipeline's LoRA calls that switch or weight loaded LoRAs: while enabled they run on the stock transformers,
#: which diffusers would skip otherwise (an enabled transformer is not one of its models).
PIPE_STYLE_CALLS = ("set_adapters", "enable_lora", "disable_lora", "get_active_adapters", "get_list_adapters",
                    "set_lora_device")
#: The pipeline's LoRA calls that load or remove LoRA layers: they run on the stock transformers too, and ddit's
#: adapter is built again around what they leave.
PIPE_LORA_CHANGES = ("load_lora_weights", "unload_lora_weights", "delete_adapters")
#: The pipeline's LoRA calls refused while enabled, and why.
PIPE_LORA_REFUSED = dict.fromkeys(
    ("fuse_lora", "unfuse_lora"),
    "a fused LoRA's layers run no other LoRA, ddit's included; ddit.disable(pipe), then pipe.fuse_lora() and "
    "pipe.unload_lora_weights() (the fused weights stay), then ddit.enable(pipe, adapter_folder) again; or keep the "
    "LoRA unfused, which runs while enabled")
PIPE_LORA_REFUSED["enable_lora_hotswap"] = _HOTSWAP = (
    "ddit builds its adapter again around a LoRA loaded while enabled, which recompiles what hotswapping keeps "
    "from recompiling: load LoRAs without hotswapping while enabled, or hotswap after ddit.disable(pipe)")


class _PipeLoraCall:
    """``pipe.<name>`` for a diffusers LoRA call while ddit is enabled: the stock call on the stock transformers
    (``PIPE_STYLE_CALLS``; ``PIPE_LORA_CHANGES``, after which ddit's adapter is built again around the LoRAs), or
    refused before any work (``PIPE_LORA_REFUSED``, hotswapping, a transformer the adapter cannot be built on)."""

    def __init__(self, pipe, name: str):
        self.pipe, self.name = weakref.ref(pipe), name
        update_wrapper(self, getattr(type(pipe), name))  # its name and docstring

    def __call__(self, *args, **kwargs):
        pipe = self.pipe()
        reason = PIPE_LORA_REFUSED.get(self.name) or (_HOTSWAP if kwargs.get("hotswap") else None)
        if reason is None and self.name in PIPE_LORA_CHANGES:
            try:
                for wrapper in _wrappers(pipe).values():
                    wrapper.adapter.check_rebuildable()
            except ValueError as error:
                reason = f"ddit's adapter could not be built again around the LoRAs: {error}"
        if reason is not None:
            raise ValueError(f"pipe.{self.name} while ddit is enabled: {reason}")
        with _stock_transformers(pipe, rebuild=self.name in PIPE_LORA_CHANGES):
            return getattr(type(pipe), self.name)(pipe, *args, **kwargs)


def summary(pipe) -> Summary:
    """What the last ``pipe(...)`` of an enabled pipeline did; ``print`` it for a table."""
    wrapper = _uncompiled(getattr(pipe, "transformer", pipe))
    if not isinstance(wrapper, DynamicPatchTransformer):
        raise ValueError("ddit.summary: this pipeline is not enabled (call ddit.enable(pipe, adapter) first)")
    return Summary(list(wrapper.runtime.records), wrapper.runtime.base_size)
