"""The summary of a finished pipeline ablation: speed and closeness to the baseline twin, per row and prompt.

A pipeline has no evaluator of its own: quality is how close each sample stays to the
stock pipeline's sample of the same prompt and seed (SSIM and PSNR, torchmetrics; a video
is compared frame by frame; LTX-2's audio by its signal-to-noise ratio against the twin's waveform).
LPIPS and CLIP score need weights that this harness never downloads; the report says when they were
skipped.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from ..checkpoint import write_text_atomic
from ..images import save_grid
from .config import BASELINE
from .pipeline_runner import PipelineAblationConfig
from .runner import load_images, read_results
from .tables import add_wall_speedups, batch_seconds, finite, markdown_table, rich_table, row_mean

COLUMNS = {"sec_per_image": "s/image", "speedup_wall": "x wall", "speedup_wall_range": "x wall over batches",
           "ssim_vs_baseline": "SSIM", "psnr_vs_baseline": "PSNR", "mean_patch_size": "mean patch",
           "coarse_step_fraction": "coarse steps", "cached_step_fraction": "cached steps"}
#: Where the pipeline generates audio beside the images (LTX-2).
AUDIO_COLUMNS = {"audio_snr_vs_baseline": "audio SNR (dB)"}
TIMING = ("sec_per_image", "speedup_wall", "speedup_wall_range")
SKIPPED = ("LPIPS and CLIP score: skipped (their weights are not downloaded by ddit-ablate; SSIM and PSNR "
           "against the baseline twin stand in for them)")


def table(summary: list[dict]):
    """The summary as a rich table, for the terminal."""
    return rich_table("ddit-ablate on a pipeline (SSIM, PSNR: against the baseline)", _columns(summary), summary)


def _columns(summary: list[dict], per_prompt: bool = False) -> dict[str, str]:
    """The table's columns: the audio's where the pipeline made audio; the timings but per prompt."""
    columns = {**COLUMNS, **(AUDIO_COLUMNS if any("audio_snr_vs_baseline" in r for r in summary) else {})}
    return {k: v for k, v in columns.items() if not (per_prompt and k in TIMING)}


def summarize_pipeline(config: PipelineAblationConfig, out: str | Path) -> list[dict]:
    """Measure every row of a finished run; write summary.json, report.md, grids and the patch-size plot."""
    out = Path(out)
    records = defaultdict(list)
    for record in sorted(read_results(out), key=lambda r: r["sample"]):
        records[record["row"]].append(record)
    missing = [k for k in config.rows if len(records[k]) != config.num_samples]
    if missing:
        raise RuntimeError(f"rows {', '.join(missing)} in {out} are not finished; rerun the ablation to complete them")
    base_key = next(iter(config.rows))
    images = {key: load_images(out, key) for key in config.rows}
    audio = {key: load_images(out, key, "audio") for key in config.rows}
    base_size = min(min(r["patch_size"]) for r in records[base_key])
    prompts = [config.prompt(r["sample"]).label for r in records[base_key]]  # as this run's prompts file names them

    summary = []
    for key, row in config.rows.items():
        values = _per_sample(images[key], images[base_key], records[key], base_size)
        if audio[key] is not None and audio[base_key] is not None:
            values["audio_snr_vs_baseline"] = _snr(audio[key], audio[base_key])
        per_prompt = {p: _means(values, [q == p for q in prompts]) for p in dict.fromkeys(prompts)}
        summary.append({"row": key, "policy": row.policy, "cache": row.cache, "steps": row.steps,
                        "params": {"policy": row.policy_params, "cache": row.cache_params},
                        **_means(values), "per_prompt": per_prompt})
    add_wall_speedups(summary, {key: batch_seconds(records[key], config.batch_size) for key in config.rows})
    figures = _figures(out, config, records, images)
    write_text_atomic(out / "summary.json", json.dumps(finite(summary), indent=1, allow_nan=False))
    write_text_atomic(out / "report.md", _markdown(config, summary, figures, out))
    return summary


@torch.no_grad()
def _per_sample(images: torch.Tensor, baseline: torch.Tensor, records: list[dict], base: int) -> dict:
    """Per sample, closeness to its twin (a video: the mean over its frames, one sample at a time to keep
    memory to one video), its cost and how coarse its schedule was."""
    ssim, psnr = [], []
    for x, y in zip(images, baseline):
        a, b = _unit(x).reshape(-1, *x.shape[-3:]), _unit(y).reshape(-1, *y.shape[-3:])
        ssim.append(structural_similarity_index_measure(a, b, data_range=1.0, reduction="none").mean())
        psnr.append(peak_signal_noise_ratio(a, b, data_range=1.0))  # of the whole video's squared error
    sizes = torch.tensor([r["patch_size"] for r in records], dtype=torch.float32)
    cached = torch.tensor([[math.nan if c is None else c for c in r["cached"]] for r in records],
                          dtype=torch.float32)  # NaN (shown as -): a diffusers hook, whose hits are unknown
    return {
        "sec_per_image": torch.tensor([r["sec"] for r in records], dtype=torch.float64),
        "ssim_vs_baseline": torch.stack(ssim),
        "psnr_vs_baseline": torch.stack(psnr),
        "mean_patch_size": sizes.mean(1),
        "coarse_step_fraction": (sizes > base).float().mean(1),
        "cached_step_fraction": cached.mean(1),
    }


def _snr(audio: torch.Tensor, baseline: torch.Tensor) -> torch.Tensor:
    """Per sample, the twin's waveform power over the difference's, in dB: infinite where they are equal
    (torchmetrics' SNR adds an epsilon, which would make a baseline row read as a finite number); NaN (not known)
    where the twin is silent and the sample is not."""
    signal = baseline.flatten(1).square().sum(1).double()
    noise = (audio - baseline).flatten(1).square().sum(1).double()
    snr = (10 * torch.log10(signal / noise)).where(signal > 0, torch.nan)
    return snr.where(noise > 0, torch.inf)  # equal, silent or not: identical


def _unit(images: torch.Tensor) -> torch.Tensor:
    """8-bit images as floats in [0, 1]."""
    return images.float() / 255


def _means(values: dict[str, torch.Tensor], mask: list[bool] | None = None) -> dict[str, float]:
    keep = slice(None) if mask is None else torch.tensor(mask)
    means = {name: row_mean(name, v[keep]) for name, v in values.items()}
    return {name: None if math.isnan(v) else v for name, v in means.items()}  # NaN: not known


def _figures(out: Path, config: PipelineAblationConfig, records: dict, images: dict) -> dict[str, str]:
    (out / "plots").mkdir(exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    figures = {}
    policies = [key for key, row in config.rows.items() if row.policy != BASELINE]
    if policies:
        _patch_sizes(out / "plots/patch_sizes.png", config, records, policies)
        figures["Patch size per step and prompt (the paper's Fig. 3)"] = "plots/patch_sizes.png"
    keys = list(config.rows)
    for p, prompt in enumerate(config.prompts):
        i = p * config.num_per_prompt  # the prompt's first sample, in every row
        row_images = torch.stack([_still(images[key][i]) for key in keys])
        save_grid(row_images, out / "grids" / f"prompt{p:03d}.png", ncol=len(keys), scale=1)
        figures[f"Prompt {p}: {prompt.label!r}; left to right: {', '.join(keys)}"] = f"grids/prompt{p:03d}.png"
    return figures


def _still(image: torch.Tensor) -> torch.Tensor:
    """An image, or a video's middle frame, in [-1, 1] as the grids take it."""
    return _unit(image[image.shape[0] // 2] if image.ndim == 4 else image) * 2 - 1


def _patch_sizes(path: Path, config: PipelineAblationConfig, records: dict[str, list[dict]], keys: list[str]) -> None:
    """Per policy row, a heat map of each prompt's mean patch size at each step."""
    fig = Figure(figsize=(5.5, 1.2 + 1.6 * len(keys)), layout="constrained")
    axes = fig.subplots(len(keys), 1, squeeze=False)[:, 0]
    sizes = [p for key in keys for r in records[key] for p in r["patch_size"]]
    low, high = min(sizes), max(max(sizes), min(sizes) + 1)  # one colour scale for every row
    for ax, key in zip(axes, keys):
        by_prompt = defaultdict(list)
        for r in records[key]:
            by_prompt[config.prompt(r["sample"]).label].append(r["patch_size"])
        names = list(by_prompt)
        grid = torch.tensor([torch.tensor(by_prompt[n], dtype=torch.float32).mean(0).tolist() for n in names])
        shown = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", cmap="viridis", vmin=low, vmax=high)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("denoising step")
        ax.set_ylabel("prompt")
        ax.set_yticks(range(len(names)), [n if len(n) <= 24 else n[:21] + "..." for n in names], fontsize=7)
        fig.colorbar(shown, ax=ax, label="patch size")
    fig.savefig(path, dpi=120)


def _markdown(config: PipelineAblationConfig, summary: list[dict], figures: dict[str, str], out: Path) -> str:
    rows = markdown_table(_columns(summary), [([r["row"]], r) for r in summary], ["row"])
    per_prompt = markdown_table(_columns(summary, per_prompt=True), [([r["row"], p], v) for r in summary
                                                  for p, v in r["per_prompt"].items()], ["row", "prompt"])
    pictures = "".join(f"### {title}\n\n![{title}]({path})\n\n" for title, path in figures.items())
    busy = summary[0].get("batch_seconds_spread")
    warning = (f"\n**The machine was busy**: the baseline's batches took times {busy:.0%} apart (range over "
               "median); wall speed-ups are unreliable.\n" if busy is not None and busy > 0.2 else "")
    return (
        f"# Pipeline ablation: {out.name}\n\n"
        f"{config.num_samples} samples per row ({config.num_per_prompt} per prompt, {len(config.prompts)} prompts), "
        f"{config.steps} steps, seed {config.seed}, batch {config.batch_size}, on {config.device} in {config.dtype}"
        f"{' under model CPU offload (wall times include the components moves)' if config.cpu_offload else ''}"
        f"{'; the transformer from ' + config.transformer_file if config.transformer_file else ''}"
        f"{'; LoRAs ' + ', '.join(f'{path} at {scale:g}' for path, scale in config.loras) if config.loras else ''}; "
        f"pipeline arguments {json.dumps(config.call)}. Sample i of every row has the prompt and seed of the "
        "baseline's sample i; SSIM and PSNR compare each sample with that twin (a row's PSNR: that of its "
        "samples' mean squared error, a video's over all its frames; identical: every sample equals its twin; "
        "an audio SNR likewise, of the twin's waveform over the difference). "
        "Speed-ups are each batch's "
        "wall time per image against the baseline's, the policy's decisions included.\n\n"
        f"{SKIPPED}.\n\n## Rows\n\n{rows}{warning}\n## Per prompt\n\n{per_prompt}\n## Figures\n\n{pictures}"
    )
