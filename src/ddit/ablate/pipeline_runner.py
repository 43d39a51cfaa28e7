"""``ddit-ablate --pipeline``: the testbed's rows, run inside a stock diffusers pipeline on the user's prompts.

Every row is one way of calling the same pipeline: the baseline is the stock pipeline
(``ddit.disable``), a policy or cache row is ``ddit.enable(pipe, adapters, policy, cache)``,
a fewer-steps row the stock pipeline with fewer steps, a progressive row
``ddit.progressive_call`` (the stock transformer on a half-size latent, then full size).
Sample i of every row is the same prompt and seed (``seed + i``), so it can be compared
with its baseline twin. As on the testbed, rows are interleaved batch by batch, a batch's images are written before its
records, and a rerun resumes at the first missing batch (``runner.py``).

Under ``accelerate launch`` the batches are shared out: process r runs batch k of every row
when k % processes == r (so its rows stay interleaved, and batch k of a row and of the
baseline run on the same device), and appends to its own results file; the main process
summarises once all are done. A sharded run resumes with any number of processes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import torch
from accelerate import PartialState
from tqdm.auto import tqdm

from ..adapter import MultiPatchTransformer
from ..checkpoint import write_text_atomic
from ..pipeline_call import (GLOBAL_SEED_OFFSET, Prompt, as_prompts, progress_bars_off, run_pipeline,
                             seeded_globally)
from ..caches import diffusers_caches
from ..pipelines import disable, enable, summary
from ..progressive_pipeline import check_progressive, half_resolution_steps, progressive_call
from ..runtime import synchronized_clock
from .config import BASELINE, NO_CACHE, PROGRESSIVE, Row, check_folder
from .runner import (CALIBRATION, CALIBRATION_SAMPLES, CALIBRATION_SEED_OFFSET, batch_done, save_images,
                     make_policy, read_calibration, read_results, results_file)

#: Pipelines whose text encoder takes one prompt per call: a batch of several prompts fails inside diffusers.
ONE_PROMPT_PER_CALL = ("Flux3ModularPipeline", "Flux3DistilledModularPipeline")
#: The adapters by expert, as ``ddit.load_adapters`` gives them: ``transformer``, and Wan 2.2's ``transformer_2``.
Adapters = Mapping[str, MultiPatchTransformer]


@dataclass
class PipelineAblationConfig:
    """Rows and what every row shares: prompts, seeds, the pipeline's call arguments, the model."""

    rows: dict[str, Row]
    prompts: list[Prompt]  # plain text is taken too
    steps: int = 28
    num_per_prompt: int = 1
    seed: int = 0
    batch_size: int = 1
    call: dict = field(default_factory=dict)  # the pipeline's own arguments (height, guidance_scale...)
    model: dict = field(default_factory=dict)  # fingerprint of the pipeline's transformer and the adapter
    device: str = "cpu"
    dtype: str = "float32"
    cpu_offload: bool = False  # diffusers' model CPU offload: wall times include the components' moves
    loras: list = field(default_factory=list)  # [file name, scale] of each LoRA loaded unfused before the rows
    transformer_file: str | None = None  # the file name of a transformer loaded from one file (a GGUF file)

    def __post_init__(self):
        self.prompts = as_prompts(self.prompts)

    @property
    def num_samples(self) -> int:
        return len(self.prompts) * self.num_per_prompt

    def prompt(self, i: int) -> Prompt:
        return self.prompts[i // self.num_per_prompt]

    def to_json(self) -> dict:
        """As ``config.json`` holds it: each prompt by its key (its text, with its own arguments if any)."""
        config = asdict(replace(self, prompts=[]))
        config["prompts"] = [p.key for p in self.prompts]
        if self.transformer_file is None:  # left out unless given: runs made before it was an option resume
            del config["transformer_file"]
        return json.loads(json.dumps(config))


def check_pipeline_rows(config: PipelineAblationConfig, pipe, adapters: Adapters) -> None:
    """Enable every row once, without sampling: each policy and cache is checked against this
    pipeline (TeaCache's fit, a cache's blocks) before anything is written."""
    if config.num_samples < 1 or config.batch_size < 1:
        raise ValueError("--prompts needs at least one prompt, and --num-per-prompt and --batch-size must be at "
                         "least 1")
    check_batch(config.batch_size, config.prompts)
    if config.batch_size > 1 and type(pipe).__name__ in ONE_PROMPT_PER_CALL:
        raise ValueError(f"{type(pipe).__name__}'s text encoder takes one prompt per call (a string): drop "
                         "--batch-size")
    for key, row in config.rows.items():
        policy = row.make_policy()
        if row.policy == PROGRESSIVE:
            try:
                check_progressive(pipe, config.call.get("height"), config.call.get("width"))
                half = half_resolution_steps(pipe, policy, **_call_args(config.prompts[:1]),
                                             num_inference_steps=row.steps, **config.call)
            except ValueError as err:
                raise ValueError(f"row {key}: {err}") from None
            if all(half):
                raise ValueError(f"row {key}: switch {policy.switch} is below every step's noise level: nothing "
                                 "would run at full resolution; give a higher switch (e.g. --progressive 0.4)")
        elif _enabled(row):
            try:
                enable(pipe, adapters, policy=policy or BASELINE, cache=row.make_cache(testbed=False))
            except ValueError as err:
                raise ValueError(f"row {key}: {err}") from None
            disable(pipe)


def run_pipeline_ablation(config: PipelineAblationConfig, pipe, adapters: Adapters, out: str | Path, *,
                          progress: bool = True) -> None:
    """Sample every row of ``config`` into ``out`` through ``pipe``, skipping finished batches."""
    out, state = Path(out), PartialState()
    check_pipeline_rows(config, pipe, adapters)
    report = partial(print, file=sys.stderr) if state.is_main_process else None
    if state.is_main_process:  # one writer for config.json, one repairer of torn files, before anyone appends
        check_folder(out, config)
        read_results(out, report)
    state.wait_for_everyone()
    check_folder(out, config)
    done = {(r["row"], r["sample"]) for r in read_results(out)}
    with progress_bars_off(pipe):  # the table's bar, not one per pipeline call
        if state.is_main_process:
            calibrate_pipeline_rows(config, pipe, adapters, out)
        state.wait_for_everyone()
        taus = read_calibration(out)
        n, size = config.num_samples, config.batch_size
        batches = [(key, row, start) for start in range(0, n, size) for key, row in config.rows.items()
                   if (start // size) % state.num_processes == state.process_index]
        todo = [b for b in batches if not batch_done(out, b[0], b[2], min(b[2] + size, n), done, report)]
        if todo:
            _warm_up(config, pipe, adapters)
        with results_file(out, state.process_index).open("a") as log:
            bar = tqdm(todo, total=len(batches), initial=len(batches) - len(todo), unit="batch",
                       desc="ablation", disable=not progress or not state.is_main_process)
            for key, row, start in bar:
                bar.set_postfix_str(key)
                indices = range(start, min(start + size, n))
                images, audio, wall, decisions = _sample(config, pipe, adapters, row, indices, taus.get(key))
                save_images(out, key, start, images, audio)
                for j, i in enumerate(indices):
                    log.write(json.dumps({"row": key, "sample": i, "prompt": config.prompt(i).label,
                                          "seed": config.seed + i,
                                          "policy": row.policy, "cache": row.cache, "steps": row.steps,
                                          "written": time.time(), "sec": wall / len(indices), **decisions[j]}) + "\n")
                log.flush()
                os.fsync(log.fileno())
        state.wait_for_everyone()


def _enabled(row: Row) -> bool:
    """Whether the row runs through ``ddit.enable`` (a policy or a cache; progressive runs the stock one)."""
    return row.policy not in (BASELINE, PROGRESSIVE) or row.cache != NO_CACHE


def calibrate_pipeline_rows(config: PipelineAblationConfig, pipe, adapters: Adapters,
                            out: Path) -> None:
    """tau of every row whose policy calibrates (``budget``), fitted once on the pipeline and kept in
    ``calibration.json``: the uncalibrated policy runs the base schedule on calibration samples (the
    prompts, from seeds no row uses) and records the signals its budget is fitted to."""
    taus = read_calibration(out)
    for key, row in config.rows.items():
        policy = row.make_policy()
        if key in taus or not hasattr(policy, "calibrate"):
            continue
        prompts = [config.prompts[i % len(config.prompts)] for i in range(CALIBRATION_SAMPLES)]
        traces = []
        enable(pipe, adapters, policy=policy)
        try:
            for start in range(0, len(prompts), config.batch_size):
                batch = prompts[start:start + config.batch_size]
                generators = [torch.Generator("cpu").manual_seed(config.seed + CALIBRATION_SEED_OFFSET + start + j)
                              for j in range(len(batch))]
                seed = config.seed + GLOBAL_SEED_OFFSET + CALIBRATION_SEED_OFFSET + start
                with seeded_globally(seed, pipe._execution_device):
                    run_pipeline(pipe, **_call_args(batch), generator=generators, num_inference_steps=row.steps,
                                 output_type="latent", **config.call)
                traces.append(policy.trace)
        finally:
            disable(pipe)
        taus[key] = policy.calibrate(traces)
        write_text_atomic(out / CALIBRATION, json.dumps(taus, indent=1))


def _sample(config: PipelineAblationConfig, pipe, adapters: Adapters, row: Row, indices: range,
            tau: float | None):
    """One batch of ``row``: 8-bit images (what a decoded image holds; a video keeps its frames and is a
    quarter of its float size), the audio generated with them (LTX-2's waveforms; else None), the batch's wall
    seconds, and per sample its patch size and whether a cache skipped it, per step."""
    if _enabled(row):
        policy = make_policy(row, tau) if row.policy != BASELINE else BASELINE
        enable(pipe, adapters, policy=policy, cache=row.make_cache(testbed=False))
    try:
        given = _call_args([config.prompt(i) for i in indices])

        def seeded():
            return [torch.Generator("cpu").manual_seed(config.seed + i) for i in indices]

        call, half = partial(run_pipeline, pipe), None
        if row.policy == PROGRESSIVE:
            call = partial(progressive_call, pipe, row.make_policy())
            half = half_resolution_steps(pipe, row.make_policy(), **given, generator=seeded(),
                                         num_inference_steps=row.steps, **config.call)
        device = pipe._execution_device  # under model CPU offload the transformer waits on the CPU between calls
        with seeded_globally(config.seed + GLOBAL_SEED_OFFSET + indices[0], device):
            clock = synchronized_clock(device)
            output = call(**given, generator=seeded(), num_inference_steps=row.steps, output_type="pt",
                          **config.call)
            wall = synchronized_clock(device) - clock
        records = summary(pipe).records if _enabled(row) else []
    finally:
        if _enabled(row):
            disable(pipe)
    images = getattr(output, "frames", None)
    images = output.images if images is None else images
    images = (torch.as_tensor(images).float().cpu().clamp(0, 1) * 255).round().to(torch.uint8)
    audio = getattr(output, "audio", None)
    audio = None if audio is None else torch.as_tensor(audio).float().cpu()
    base = adapters["transformer"].base_patch_size
    return images, audio, wall, _decisions(records, len(indices), row.steps, base, half,
                                           hooks=row.cache in diffusers_caches())


def check_batch(batch_size: int, prompts: list[Prompt]) -> None:
    """Prompts with arguments of their own run one sample per pipeline call: a call takes one value of each
    (one image) for all its prompts."""
    if batch_size > 1 and any(p.inputs for p in prompts):
        raise ValueError("prompts with arguments of their own (a .jsonl prompts file's) run one sample per "
                         "pipeline call, as a call takes one value of each for all its prompts: drop --batch-size")


def _call_args(prompts: list[Prompt]) -> dict:
    """The pipeline arguments of a batch of prompts: their texts, and the arguments of their own, which a batch
    shares (prompts that have any run one per batch: ``check_batch``)."""
    return dict(prompt=[p.text for p in prompts], **prompts[0].call_inputs())


def _decisions(records: list[dict], batch: int, steps: int, base: int, half: list[bool] | None = None, *,
               hooks: bool = False) -> list[dict]:
    """Per sample, its patch size and cache hit at each step (the stock pipeline: base size, no cache;
    a diffusers cache hook, ``hooks``: hits unknown, None). A half-resolution step of progressive resolution
    counts as twice the base size: a token covers the image area of a 2p patch at full size."""
    sizes = [[2 * base if half and half[step] else base for step in range(steps)] for _ in range(batch)]
    cached = [[False] * steps for _ in range(batch)]
    for r in records:
        if r["step"] < steps:
            sizes[r["sample"]][r["step"]] = r["patch_size"]
            cached[r["sample"]][r["step"]] = r["cached"] if hooks else bool(r["cached"])  # a hook does not say
    return [{"patch_size": s, "cached": c} for s, c in zip(sizes, cached)]


def _warm_up(config: PipelineAblationConfig, pipe, adapters: Adapters) -> None:
    """One untimed call of the stock pipeline and one through every patch size, so that no row pays
    for first-call setup. With two experts (Wan 2.2) the second call runs the rows' steps, the sizes in turn,
    so that each expert, which takes its own share of the steps, meets every size."""
    sizes = list(adapters["transformer"].patch_sizes)
    steps = config.steps if len(adapters) > 1 else len(sizes)
    call = dict(**_call_args(config.prompts[:1]), num_inference_steps=steps, output_type="pt", **config.call)
    run_pipeline(pipe, **call)
    enable(pipe, adapters, policy="fixed", schedule=[sizes[i % len(sizes)] for i in range(steps)])
    try:
        run_pipeline(pipe, **call)
    finally:
        disable(pipe)
