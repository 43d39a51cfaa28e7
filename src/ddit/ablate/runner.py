"""Running the rows of an ablation, batch by batch, so that an interrupted run loses nothing.

A batch's images are written first (atomically), then its records are appended to
``results.jsonl`` and flushed: a record therefore always has its image, and whatever
stops the run, every finished batch is kept. A rerun skips the batches whose records
are all present.

A sample's time (``sec``) is its batch's wall time divided by the batch size, so that
a policy's decisions are billed too; ``model_sec`` is the model calls' share alone. Rows
are interleaved batch by batch (every row's batch k before any row's batch k + 1), so a
change in machine load falls on all rows alike.

A policy that calibrates itself (``budget``) is fitted first, once per row, on base-size
runs of calibration samples that no row evaluates; its tau is kept in ``calibration.json``
so that a resumed run samples with the same one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..checkpoint import write_text_atomic
from ..policies import get_policy
from ..runtime import synchronized_clock
from ..sampling import count_flops_ahead, transformer_velocity
from ..testbed.base_model import generate
from ..testbed.data import CHANNELS, IMAGE_SIZE, PROMPTS
from ..testbed.evaluate import balanced_labels
from .config import PROGRESSIVE, AblationConfig, Row, check_folder

RESULTS = "results.jsonl"
CALIBRATION = "calibration.json"
#: Calibration samples per calibrating row (balanced over classes), seeded apart from every row's.
CALIBRATION_SAMPLES = 8
CALIBRATION_SEED_OFFSET = 10**6


def run_ablation(config: AblationConfig, model, out: str | Path, *, progress: bool = True) -> None:
    """Sample every row of ``config`` into ``out`` (a ``MultiPatchTransformer``), skipping finished batches."""
    out = Path(out)
    check_folder(out, config)
    report = partial(print, file=sys.stderr)
    done = {(r["row"], r["sample"]) for r in read_results(out, report)}
    n, size = config.num_samples, config.batch_size
    batches = [(key, row, start) for start in range(0, n, size) for key, row in config.rows.items()]
    todo = [b for b in batches if not batch_done(out, b[0], b[2], min(b[2] + size, n), done, report)]
    labels = config.labels()
    if todo:
        _warm_up(model, config)
    taus = calibrate_rows(config, model, out)
    with results_file(out).open("a") as log:
        bar = tqdm(todo, total=len(batches), initial=len(batches) - len(todo), unit="batch",
                   desc="ablation", disable=not progress)
        for key, row, start in bar:
            bar.set_postfix_str(key)
            batch = labels[start : start + size]
            clock = synchronized_clock(model.device)
            samples = generate(model, batch, seed=config.seed + start, steps=row.steps,
                               guidance=config.guidance, policy=make_policy(row, taus.get(key)), cache=row.make_cache(),
                               batch_size=size)
            wall = (synchronized_clock(model.device) - clock) / len(batch)
            save_images(out, key, start, samples.images)
            for j, trace in enumerate(samples.traces):
                log.write(json.dumps(_record(key, row, start + j, int(batch[j]), config.seed, wall, trace)) + "\n")
            log.flush()
            os.fsync(log.fileno())


def calibrate_rows(config: AblationConfig, model, out: str | Path) -> dict[str, float]:
    """tau of every row whose policy calibrates (has ``calibrate(traces)``), fitted once and kept."""
    path = Path(out) / CALIBRATION
    taus = read_calibration(out)
    for key, row in config.rows.items():
        policy = row.make_policy()
        if key in taus or not hasattr(policy, "calibrate"):
            continue
        labels = balanced_labels(CALIBRATION_SAMPLES)
        generate(model, labels, seed=config.seed + CALIBRATION_SEED_OFFSET, steps=row.steps,
                 guidance=config.guidance, policy=policy, batch_size=len(labels))
        taus[key] = policy.calibrate([policy.trace])
        write_text_atomic(path, json.dumps(taus, indent=1))
    return taus


def read_calibration(out: str | Path) -> dict[str, float]:
    """Calibrated tau per row key (empty when no row calibrates)."""
    path = Path(out) / CALIBRATION
    return json.loads(path.read_text()) if path.exists() else {}


def make_policy(row: Row, tau: float | None = None):
    """A fresh policy for one batch of ``row``, with its calibrated tau if it has one."""
    policy = row.make_policy()
    if tau is not None:
        policy.tau = tau
    return policy


def results_file(out: str | Path, rank: int = 0) -> Path:
    """Where process ``rank`` appends its records: each process of a sharded run has its own file."""
    return Path(out) / (RESULTS if rank == 0 else f"results-rank{rank}.jsonl")


def read_results(out: str | Path, report: Callable[[str], None] | None = None) -> list[dict]:
    """The finished records, one per (row, sample), from every process's file. A line torn by a
    kill is dropped (and cut from its file); a line that is not JSON is skipped; of a sample's
    several records (a batch sampled again after a crash, maybe by another process), the last
    written is kept: it belongs to the batch that wrote the current images. ``report`` gets one
    line per repair."""
    records = {}
    for path in sorted(Path(out).glob("results*.jsonl"), key=lambda p: (p.name != RESULTS, p.name)):
        for record in _read_file(path, report):
            key = (record["row"], record["sample"])
            if key not in records or record.get("written", 0) >= records[key].get("written", 0):
                records[key] = record  # within a file, the later line; across files, the later time
    return list(records.values())


def _read_file(path: Path, report: Callable[[str], None] | None) -> list[dict]:
    text = path.read_text()
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        with path.open("r+") as f:
            f.truncate(len(text.encode()))
        _tell(report, f"dropped a torn last line of {path}")
    records, unreadable = [], 0
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or "row" not in record or "sample" not in record:
            unreadable += 1
            continue
        records.append(record)
    duplicates = len(records) - len({(r["row"], r["sample"]) for r in records})
    if unreadable:
        _tell(report, f"skipped {unreadable} unreadable line(s) of {path}")
    if duplicates:
        _tell(report, f"kept the last of {duplicates} repeated record(s) in {path}")
    return records


def _tell(report: Callable[[str], None] | None, message: str) -> None:
    if report is not None:
        report(f"ddit-ablate: {message}")


def batch_done(out: Path, key: str, start: int, stop: int, done: set, report) -> bool:
    """Whether a batch's records are all there and its image file holds its images."""
    if any((key, i) not in done for i in range(start, stop)):
        return False
    path = out / "images" / key / f"{start:07d}.safetensors"
    try:
        ok = load_file(path)["images"].shape[0] == stop - start
    except Exception:  # missing, truncated or not safetensors: safetensors raises several types
        ok = False
    if not ok:
        _tell(report, f"{path} is missing or damaged: sampling its batch again")
    return ok


def load_images(out: str | Path, key: str, name: str = "images") -> torch.Tensor | None:
    """All images of a row, in sample order (``name="audio"``: its audio, None where the row has none); each file
    opened, not read whole, so that the other tensor beside it stays on disk."""
    files = sorted((Path(out) / "images" / key).glob("*.safetensors"))
    held = {}
    for path in files:
        with safe_open(path, "pt") as f:
            if name in f.keys():
                held[path] = f.get_tensor(name)
    if held and len(held) < len(files):  # batches written before ddit kept the audio, resumed after
        missing = ", ".join(p.name for p in files if p not in held)
        raise RuntimeError(f"row {key} in {out} has {name} in some batches and not in {missing}: delete those "
                           "files and rerun the ablation, which samples them again")
    if not held and name == "images":
        raise FileNotFoundError(f"row {key} in {out} has no images: run the ablation to sample them")
    return torch.cat([held[p] for p in files]) if held else None


def save_images(out: Path, key: str, start: int, images: torch.Tensor, audio: torch.Tensor | None = None) -> None:
    """A batch's images (and the audio generated with them, LTX-2's), in one file, written whole or not at all."""
    folder = out / "images" / key
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{start:07d}.safetensors"
    images = images if images.dtype == torch.uint8 else images.float()  # a pipeline's: 8-bit, as decoded
    saved = {"images": images.contiguous(), **({} if audio is None else {"audio": audio.float().contiguous()})}
    save_file(saved, path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)


def _warm_up(model, config: AblationConfig) -> None:
    """One untimed sample through every patch size, so that no row pays for first-call setup; and every FLOP
    count a row's traces will read (cached steps, progressive's half-size latent), so that none is counted in a
    timed batch."""
    sizes = list(model.patch_sizes)
    generate(model, torch.zeros(1, dtype=torch.long), steps=len(sizes), guidance=config.guidance,
             policy=get_policy("fixed", schedule=sizes))
    shapes = {(CHANNELS, IMAGE_SIZE, IMAGE_SIZE)}
    if any(row.policy == PROGRESSIVE for row in config.rows.values()):
        shapes.add((CHANNELS, IMAGE_SIZE // 2, IMAGE_SIZE // 2))
    for shape in shapes:
        count_flops_ahead(transformer_velocity(model), shape, config.guidance)


def _record(key: str, row: Row, index: int, label: int, seed: int, wall: float, trace: list[dict]) -> dict:
    """One sample's line: who it is, what it cost, and its trace as one list per field."""
    sizes = sorted({p for step in trace for p in step["signals"]})
    return {
        "row": key, "sample": index, "label": label, "prompt": PROMPTS[label], "seed": seed + index,
        "policy": row.policy, "cache": row.cache, "steps": row.steps, "written": time.time(),
        "sec": wall, "model_sec": sum(step["seconds"] for step in trace), "flops": sum(step["flops"] for step in trace),
        "trace": {
            **{name: [step[name] for step in trace]
               for name in ("sigma", "patch_size", "seconds", "flops", "tokens", "cached")},
            "signals": {str(p): [step["signals"].get(p) for step in trace] for p in sizes},
        },
    }
