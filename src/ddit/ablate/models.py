"""The model an ablation samples: a backbone and its multi-patch adapter, loaded from folders.

By default the testbed's shipped base model and adapter; ``--backbone/--adapter`` take any
diffusers class-conditional DiT-family model of the testbed's shape (the evaluator judges
3x32x32 images of its classes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..adapter import MultiPatchTransformer
from ..testbed.adapter import SHIPPED_ADAPTER
from ..testbed.base_model import NULL_LABEL, SHIPPED_BASE
from ..testbed.data import CHANNELS, IMAGE_SIZE, PROMPTS
from ..weights import load_pretrained_transformer

_MISSING = {
    "backbone": "train one with `ddit testbed train-base` and `ddit testbed ship-base`, or pass --backbone",
    "adapter": "run `ddit distill --out runs/adapter` first, then pass --adapter runs/adapter/adapter",
}


def folders(backbone: str | Path | None = None, adapter: str | Path | None = None) -> dict[str, Path]:
    """The backbone and adapter folders (the shipped ones by default); missing ones are an error."""
    found = {"backbone": Path(backbone or SHIPPED_BASE), "adapter": Path(adapter or SHIPPED_ADAPTER)}
    for what, folder in found.items():
        if not folder.is_dir():
            raise FileNotFoundError(f"no {what} at {folder}: {_MISSING[what]}")
    return found


def fingerprint(found: dict[str, Path], configs: Path | None = None) -> dict[str, str]:
    """A hash of each folder's weights and configs (or of a file, a LoRA's): a different model must not resume a
    run. Its cards' measurements (``eval.json``, ``card.json``) are not the model and are left out. ``configs``:
    a pipeline folder, whose every component's JSON (configs, the scheduler's, the tokenizers') is hashed too
    (``components``): another shift or VAE config must not resume a run either."""
    files = {what: [path] if path.is_file() else sorted([*path.glob("*.safetensors"), *path.glob("*config.json")])
             for what, path in found.items()}
    if configs is not None:
        files["components"] = sorted([*configs.glob("*.json"), *configs.glob("*/*.json")])
    return {what: _digest(paths) for what, paths in files.items()}


def state_fingerprint(model) -> dict[str, str]:
    """A hash of a model's weights, for a model given in memory (``ddit.ablate.run(model=...)``)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().float().cpu().numpy().tobytes())
    return {"weights": digest.hexdigest()[:16]}


def _digest(paths: list[Path]) -> str:
    """One hash of files' names and bytes, read in chunks (a FLUX shard is 10 GB)."""
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def load_model(found: dict[str, Path]) -> MultiPatchTransformer:
    backbone = load_pretrained_transformer(found["backbone"])
    config = backbone.config
    shape = (config.get("in_channels"), config.get("sample_size"), config.get("num_embeds_ada_norm"))
    if shape != (CHANNELS, IMAGE_SIZE, len(PROMPTS)):
        raise ValueError(
            f"{found['backbone']} holds a {type(backbone).__name__} with in_channels, sample_size, classes = "
            f"{shape}; ddit-ablate samples the testbed's shape: {(CHANNELS, IMAGE_SIZE, len(PROMPTS))} "
            f"(label {NULL_LABEL} = no class), which its evaluator can judge")
    return MultiPatchTransformer.from_pretrained(backbone, found["adapter"]).eval()
