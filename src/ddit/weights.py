"""Loading weights with errors that name the file and the fix."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from .checkpoint import CheckpointError


#: A Hugging Face Hub repository id (``owner/name``), as a path that is no local folder may be.
REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


def local_or_hub(path: str | os.PathLike, files: Sequence[str], revision: str | None = None) -> Path:
    """``path`` as a local folder; where none is there and it is a string that reads as a Hub repository id
    (``owner/name``), as diffusers' ``from_pretrained`` reads one, the folder huggingface_hub downloads its
    ``files`` to (patterns; or finds them in its cache, offline too)."""
    folder = Path(path)
    if not names_repository(path):
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(str(path), revision=revision, allow_patterns=list(files)))
    except Exception as err:  # not found, private, offline without it in the cache, no network...
        raise CheckpointError(f"there is no folder {path} here, and the Hub repository {path} cannot be had "
                              f"({type(err).__name__}: {err}); check the path or repository id, log in "
                              "(`hf auth login`) for a private repository, or download it where the Hub is "
                              "reachable and pass its folder") from err


def names_repository(path: str | os.PathLike) -> bool:
    """Whether ``path`` is no local folder but a Hub repository id: only a string names one, ./x or ../x never."""
    return (not Path(path).exists() and isinstance(path, str) and not path.startswith(".")
            and REPO_ID.match(path) is not None)


def pipeline_folder(path: str | os.PathLike, without: Sequence[str] = ()) -> Path:
    """``path`` as a local folder; where it names a Hub repository, the folder its download lies in: what
    ``DiffusionPipeline.from_pretrained`` would fetch (its components, not single-file checkpoints beside them;
    from huggingface_hub's cache, offline too), or a modular pipeline's ``modular_model_index.json``, whose
    components ``load_components`` fetches from where it points. Components ``without`` are left out but for
    their configs (``--transformer FILE`` replaces the transformer's 24 GB of FLUX.1 weights)."""
    if not names_repository(path):
        return Path(path)
    from diffusers import DiffusionPipeline

    index = local_or_hub(path, ["model_index.json", "modular_model_index.json"])
    if not (index / "model_index.json").is_file():
        if not (index / "modular_model_index.json").is_file():
            raise CheckpointError(f"the Hub repository {path} holds no diffusers pipeline (no model_index.json, nor "
                                  "a modular pipeline's modular_model_index.json); pass a pipeline's repository")
        return index
    try:
        folder = Path(DiffusionPipeline.download(str(path), **dict.fromkeys(without)))  # as passed components
    except Exception as err:
        raise CheckpointError(f"the Hub repository {path}'s pipeline cannot be downloaded ({type(err).__name__}: "
                              f"{err}); download it where the Hub is reachable and pass its folder") from err
    for name in without:  # diffusers fetches nothing of a component passed, not even its config
        local_or_hub(path, [f"{name}/config.json"])
    return folder


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return load_file(path)
    except Exception as err:
        raise CheckpointError(
            f"weights file {path} is truncated or corrupt ({err}); restore it "
            "(e.g. reinstall ddit or re-run the command that wrote it)"
        ) from err


def load_diffusers_model(model_class, folder: str | Path):
    """``model_class.from_pretrained(folder)``, checking the weights file first."""
    folder = Path(folder)
    for weights in folder.glob("*.safetensors"):
        load_safetensors(weights)  # raises a clear error for a damaged file
    try:
        return model_class.from_pretrained(folder)
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot load {model_class.__name__} from {folder}: {err}") from err


def load_pretrained_transformer(folder: str | Path):
    """A diffusers model saved with ``save_pretrained``, of the class its config names."""
    import diffusers

    config = Path(folder) / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder} holds no config.json; pass the folder a diffusers "
                              "model was saved to with save_pretrained")
    try:
        name = json.loads(config.read_text()).get("_class_name", "")
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{config} is not valid JSON ({err}); restore it, or save the model again "
                              "with save_pretrained") from None
    model_class = getattr(diffusers, name, None)
    if model_class is None:
        raise CheckpointError(f"{config} names the class {name!r}, which diffusers does not have")
    return load_diffusers_model(model_class, folder)


def _saved_dtype(folder: Path, pipeline: bool = True) -> torch.dtype | None:
    """The dtype most of the transformer's weights are saved in, in a pipeline folder (its ``transformer``
    subfolder; every component's weights file's header is checked on the way) or in the transformer's own."""
    saved = None
    for weights in sorted(folder.glob("*/*.safetensors" if pipeline else "*.safetensors")):
        try:  # the header only: a real model's weights are too large to read twice
            with safe_open(weights, "pt") as f:
                keys = list(f.keys())
                ours = weights.parent.name == "transformer" or not pipeline
                if ours and keys and saved is None:  # its weights' most dtype
                    saved = SAVED_DTYPES.get(Counter(f.get_slice(k).get_dtype() for k in keys).most_common(1)[0][0])
        except Exception as err:
            raise CheckpointError(f"weights file {weights} is truncated or corrupt ({err}); restore it") from None
    return saved


def transformer_source(pipe, folder: Path) -> Path | str:
    """Where a pipeline's transformer is loaded from: ``folder/transformer``, or the folder a modular pipeline's
    index points at, or, where that is no local folder, the Hub source as diffusers writes it
    (``repo|subfolder|variant|revision``)."""
    if (folder / "transformer").is_dir():
        return folder / "transformer"
    spec = getattr(pipe, "_component_specs", {}).get("transformer")
    where = getattr(spec, "pretrained_model_name_or_path", None)
    if isinstance(where, str) and (Path(where) / (spec.subfolder or "")).is_dir():
        return Path(where) / (spec.subfolder or "")
    return "|".join(str(getattr(spec, name, None)) for name in ("pretrained_model_name_or_path", "subfolder",
                                                                 "variant", "revision"))


def _check_components(pipe, folder: Path) -> None:
    """A modular pipeline's ``load_components`` only logs a component it cannot load: refuse it here, before any
    work, naming each and where its index points."""
    missing = [f"{name} ({spec.pretrained_model_name_or_path}, {spec.subfolder or 'no subfolder'})"
               for name, spec in pipe._component_specs.items()
               if spec.default_creation_method == "from_pretrained" and spec.pretrained_model_name_or_path
               and getattr(pipe, name, None) is None]
    if missing:
        raise CheckpointError(f"the modular pipeline in {folder} could not load {'; '.join(missing)}: the "
                              "warnings above say why (a missing folder or package, a gated repository, no network "
                              "without the files in the cache)")


TWO_EXPERTS_LORA = ("has two experts (transformer, transformer_2), and which one a LoRA file is for is not said: "
                    "load each expert's file from Python (pipe.load_lora_weights(..., load_into_transformer_2=True) "
                    "for the second's) and run ddit.self_distill.self_distill or "
                    "ddit.ablate.pipeline_runner.run_pipeline_ablation on that pipeline")


def has_two_experts(folder: Path) -> bool:
    """Whether the pipeline folder names a second expert (Wan 2.2's ``transformer_2``), read before loading it."""
    for index in ("model_index.json", "modular_model_index.json"):
        path = folder / index
        if path.is_file() and (json.loads(path.read_text()).get("transformer_2") or [None])[0] is not None:
            return True
    return False


def check_lora_pipeline(folder: Path) -> None:
    """Refuse ``--lora`` on a pipeline folder with two experts (Wan 2.2) before loading it."""
    if has_two_experts(folder):
        raise ValueError(f"--lora: the pipeline in {folder} {TWO_EXPERTS_LORA}")


def lora_argument(text: str) -> tuple[str, float]:
    """A command line's ``--lora PATH[:SCALE]``: a LoRA file or folder here, and its weight (default 1)."""
    path, _, scale = text.rpartition(":")
    try:
        weight = float(scale) if path else 1.0
    except ValueError:
        path, weight = "", 1.0
    path = path or text
    if not Path(path).exists():
        raise argparse.ArgumentTypeError(f"{path}: no such LoRA file or folder (PATH[:SCALE], e.g. "
                                         "style.safetensors:0.8; a LoRA on the Hub: download it first, "
                                         "hf download OWNER/NAME --local-dir DIR)")
    if not math.isfinite(weight):
        raise argparse.ArgumentTypeError(f"{text}: the LoRA's scale must be a number, not {scale}")
    return path, weight


def load_loras(pipe, loras: Sequence[tuple[str, float]]) -> None:
    """LoRAs (``(path, scale)``: a file or folder in diffusers' format each) loaded into ``pipe`` unfused and
    weighted, as ``pipe.load_lora_weights`` and ``pipe.set_adapters`` load them; a ddit adapter built or enabled
    after runs beside them. Refuses a pipeline with two experts, whose LoRAs come one per expert."""
    if not loras:
        return
    if not callable(getattr(pipe, "load_lora_weights", None)):
        raise ValueError(f"--lora: {type(pipe).__name__} cannot load LoRAs (it has no load_lora_weights)")
    if isinstance(getattr(pipe, "transformer_2", None), torch.nn.Module):
        raise ValueError(f"--lora: {type(pipe).__name__} {TWO_EXPERTS_LORA}")
    names = [f"lora{i}" for i in range(len(loras))]
    for name, (path, _) in zip(names, loras):
        try:
            pipe.load_lora_weights(path, adapter_name=name)
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointError(f"--lora {path}: cannot load it into {type(pipe).__name__}: {err}") from err
        if name not in getattr(pipe.transformer, "peft_config", {}):
            raise CheckpointError(f"--lora {path}: none of its weights fit {type(pipe.transformer).__name__} (a LoRA "
                                  "for another model?); give a LoRA trained for this pipeline's transformer")
    pipe.set_adapters(names, [scale for _, scale in loras])


def transformer_file_argument(text: str) -> Path:
    """A command line's ``--transformer FILE``: a GGUF or safetensors file here."""
    path = Path(text)
    if path.suffix == ".gguf" and importlib.util.find_spec("gguf") is None:
        raise argparse.ArgumentTypeError(f"{text}: diffusers reads GGUF files with the gguf package: pip install "
                                         "gguf")
    if path.suffix not in (".gguf", ".safetensors"):
        raise argparse.ArgumentTypeError(f"{text}: --transformer takes one file, a .gguf file (loaded quantized, as "
                                         "saved) or a .safetensors file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: no such file (a file on the Hub: download it first, "
                                         "hf download OWNER/NAME FILE --local-dir DIR)")
    return path


def load_transformer_file(path: Path, folder: Path, dtype: torch.dtype):
    """The transformer of the pipeline in ``folder`` from one file, as diffusers' ``from_single_file`` loads one,
    with the folder's transformer config: a GGUF file quantized as it was saved (computing in ``dtype``), a
    safetensors file (diffusers' or the original repository's key names) in ``dtype``."""
    import diffusers
    from diffusers import GGUFQuantizationConfig
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    index = json.loads((folder / "model_index.json").read_text())
    if has_two_experts(folder):
        raise CheckpointError(f"--transformer {path}: {folder} has two experts (transformer and transformer_2), "
                              "and one file replaces one of them; load both from Python (from_single_file) and "
                              "pass them to the pipeline's from_pretrained")
    name = (index.get("transformer") or [None, None])[1]
    model_class = getattr(diffusers, name or "", None)
    if model_class is None or not hasattr(model_class, "from_single_file"):
        raise CheckpointError(f"--transformer {path}: diffusers loads {name or 'this pipeline'}'s transformer from "
                              "a folder only (no from_single_file); save it with save_pretrained and pass that "
                              "pipeline folder")
    quantization = GGUFQuantizationConfig(compute_dtype=dtype) if path.suffix == ".gguf" else None
    try:
        return model_class.from_single_file(str(path), config=str(folder), subfolder="transformer",
                                            torch_dtype=dtype, quantization_config=quantization)
    except (OSError, ValueError, KeyError, IndexError, RuntimeError, SingleFileComponentError) as err:
        raise CheckpointError(f"--transformer {path}: cannot load it as {name} with the config in "
                              f"{folder / 'transformer'} ({type(err).__name__}: {err}); give a file of this "
                              "pipeline's transformer") from err


#: safetensors' names of the floating dtypes a transformer is saved in.
SAVED_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def load_pipeline(folder: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                  cpu_offload: bool = False, transformer_file: Path | None = None):
    """A diffusers pipeline folder (``save_pretrained``'s, with ``model_index.json``; or a modular pipeline's,
    with ``modular_model_index.json`` only, such as FLUX.3's) or Hub repository id (``pipeline_folder``), in
    ``dtype`` (None: its transformer's dtype as
    saved; diffusers' own default would be float32, twice a bf16 model's memory), on ``device``; with
    ``cpu_offload``, under diffusers' model CPU offload onto ``device``: each component there only while it runs,
    for a GPU that holds the transformer but not every component at once. ``transformer_file``: the transformer
    from that file instead (``load_transformer_file``: a GGUF file, say), in ``dtype`` or else the folder's saved
    dtype or else bfloat16."""
    from diffusers import DiffusionPipeline
    from diffusers.modular_pipelines import ModularPipeline

    folder = pipeline_folder(folder, without=("transformer",) if transformer_file else ())
    modular = not (folder / "model_index.json").is_file() and (folder / "modular_model_index.json").is_file()
    if not modular and not (folder / "model_index.json").is_file():
        raise CheckpointError(f"{folder} holds no model_index.json (nor a modular pipeline's "
                              "modular_model_index.json); pass a diffusers pipeline folder (one written by "
                              "pipe.save_pretrained, or a downloaded checkpoint)")
    if modular and transformer_file is not None:
        raise CheckpointError(f"--transformer {transformer_file}: {folder} is a modular pipeline; load its "
                              "transformer from the file in Python (from_single_file) and pass it to "
                              "ModularPipeline.update_components")
    if modular and cpu_offload:
        raise CheckpointError(f"{folder} is a modular pipeline, which offloads through a ComponentsManager's auto "
                              "CPU offload, not --cpu-offload: drop --cpu-offload, or run ddit from Python with "
                              "ModularPipeline.from_pretrained(..., components_manager=manager) and "
                              "manager.enable_auto_cpu_offload()")
    saved = _saved_dtype(folder)  # the pipeline's, unless dtype says otherwise
    try:
        if modular:
            pipe = ModularPipeline.from_pretrained(str(folder))
            source = transformer_source(pipe, folder)
            saved = saved or (_saved_dtype(source, pipeline=False) if isinstance(source, Path) else None)
            if dtype is None and saved is None:
                raise CheckpointError(f"{folder} is a modular pipeline whose transformer lies elsewhere ({source}), "
                                      "so its saved dtype cannot be read before loading: pass --dtype (bfloat16 for "
                                      "most models), the same on every run of this output folder")
            pipe.load_components(dtype=dtype or saved)
            _check_components(pipe, folder)
        elif transformer_file is not None:
            dtype = dtype or saved or torch.bfloat16
            pipe = DiffusionPipeline.from_pretrained(
                folder, transformer=load_transformer_file(transformer_file, folder, dtype), dtype=dtype)
        else:
            pipe = DiffusionPipeline.from_pretrained(folder, dtype=dtype or saved)
    except (OSError, ValueError, TypeError) as err:
        raise CheckpointError(f"cannot load the pipeline in {folder}: {err}") from err
    if cpu_offload:
        pipe.enable_model_cpu_offload(device=device)
    elif device is not None:
        pipe.to(device)
    return pipe
