"""The summary of a finished ablation: one record per row, as JSON, CSV, Markdown and a rich table.

Speed-ups are relative to the baseline row (base patch size, no cache, full steps), in
the sampler's measured model time and in FLOPs; FD (the headline quality metric: it sees both residual
noise and lost detail) and adherence come from the testbed evaluator, as in ``ddit testbed eval``, spectral
FD from ``ddit.testbed.spectrum``; the rest compares each sample with its baseline twin.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import torch
from rich.table import Table

from ..checkpoint import write_text_atomic
from ..testbed.data import PROMPTS, make_dataset
from ..testbed.evaluate import REAL_SEEDS, evaluate_images
from ..testbed.evaluator import Evaluator, frechet_interval
from . import adaptivity, plots
from .config import AblationConfig, effective_params
from .metrics import fd, per_sample, sfd
from .runner import load_images, read_calibration, read_results
from .tables import add_wall_speedups, batch_seconds, finite, markdown_table, rich_table, row_mean

#: Columns of summary.csv and of the tables, with their short titles.
COLUMNS = {"sec_per_image": "s/image", "speedup_wall": "x wall", "speedup_wall_range": "x wall over batches",
           "flops_per_image": "FLOPs/image",
           "speedup_flops": "x FLOPs", "fd": "FD", "fd_interval": "FD 90% CI", "adherence": "adherence", "sfd": "spectral FD",
           "ssim_vs_baseline": "SSIM",
           "psnr_vs_baseline": "PSNR", "feature_dist_vs_baseline": "feature dist", "mean_patch_size": "mean patch",
           "coarse_step_fraction": "coarse steps", "cached_step_fraction": "cached steps"}
#: Per class there is no wall time: a batch mixes classes.
CLASS_COLUMNS = {k: v for k, v in COLUMNS.items()
                 if k not in ("sec_per_image", "speedup_wall", "speedup_wall_range", "fd_interval")}


def summarize(config: AblationConfig, out: str | Path, evaluator: Evaluator) -> list[dict]:
    """Measure every row of a finished run; write summary.json, summary.csv, report.md and the plots."""
    out = Path(out)
    records = defaultdict(list)
    for record in sorted(read_results(out), key=lambda r: r["sample"]):
        records[record["row"]].append(record)
    missing = [k for k in config.rows if len(records[k]) != config.num_samples]
    if missing:
        raise RuntimeError(f"rows {', '.join(missing)} in {out} are not finished; rerun the ablation to complete them")

    labels = config.labels()
    reals, real_labels = make_dataset(config.num_samples, REAL_SEEDS[0])
    images = {key: load_images(out, key) for key in config.rows}
    base_key = next(iter(config.rows))
    base_size = min(min(r["trace"]["patch_size"]) for r in records[base_key])

    calibrated = read_calibration(out)
    summary = []
    for key, row in config.rows.items():
        values = per_sample(evaluator, images[key], images[base_key], records[key], base_size)
        quality = evaluate_images(evaluator, images[key], labels)
        by_class = {name: v for name, v in values.items() if name != "sec_per_image"}  # batches mix classes
        per_class = {prompt: {**_means(by_class, labels == c),
                              "fd": fd(evaluator, reals[real_labels == c], images[key][labels == c]),
                              "adherence": quality["adherence_per_class"][prompt],
                              "sfd": sfd(reals[real_labels == c], images[key][labels == c])}
                     for c, prompt in enumerate(PROMPTS)}
        summary.append({"row": key, "policy": row.policy, "cache": row.cache, "steps": row.steps,
                        "params": {"policy": {**effective_params(row.make_policy()), **row.policy_params,
                                              **_calibrated(calibrated, key)},
                                   "cache": {**effective_params(row.make_cache()), **row.cache_params}},
                        **_means(values), "fd": quality["fd"],
                        "fd_interval": (frechet_interval(evaluator, reals, images[key])
                                        if config.num_samples > 2 else None),
                        "adherence": quality["adherence"],
                        "sfd": quality["sfd"],
                        "per_class": per_class})
    _add_speedups(summary, {key: batch_seconds(records[key], config.batch_size) for key in config.rows})

    write_text_atomic(out / "summary.json", json.dumps(finite(summary), indent=1, allow_nan=False))
    _write_csv(out / "summary.csv", summary)
    figures = plots.plot_all(out, config, records, summary, images, base_size)
    pairs = adaptivity.compare(config, records, base_size)
    if pairs:
        write_text_atomic(out / "adaptivity.json", json.dumps(finite(pairs), indent=1, allow_nan=False))
        adaptivity.plot(out / "plots/adaptivity.png", pairs)
        figures["Coarse fraction per step and class: captured (policy, solid) vs available (oracle, dashed)"] = (
            "plots/adaptivity.png")
    write_text_atomic(out / "report.md", _markdown(config, summary, quality, figures, out, adaptivity.markdown(pairs)))
    return summary


def table(summary: list[dict]) -> Table:
    """The summary as a rich table, for the terminal."""
    return rich_table("ddit-ablate (SSIM, PSNR, feature dist: against the baseline)", COLUMNS, summary)


def _means(values: dict[str, torch.Tensor], mask: torch.Tensor | None = None) -> dict[str, float]:
    return {name: row_mean(name, v if mask is None else v[mask]) for name, v in values.items()}


def _add_speedups(summary: list[dict], seconds: dict[str, list[float]]) -> None:
    """Speed-ups against the first row, the baseline: in wall time, and in FLOPs, also per class
    (only in FLOPs: a batch mixes classes, and its wall time cannot be split between them)."""
    add_wall_speedups(summary, seconds)
    base = summary[0]
    for record in summary:
        record["speedup_flops"] = _ratio(base["flops_per_image"], record["flops_per_image"])
        for prompt, values in record["per_class"].items():
            values["speedup_flops"] = _ratio(base["per_class"][prompt]["flops_per_image"], values["flops_per_image"])


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _calibrated(calibrated: dict[str, float], key: str) -> dict:
    return {"calibrated_tau": calibrated[key]} if key in calibrated else {}


def _write_csv(path: Path, summary: list[dict]) -> None:
    """Tidy: one line per row and class (``all`` = every class), parameters as JSON."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, ["row", "class", "policy", "cache", "steps", "params", *COLUMNS],
                                extrasaction="ignore")
        writer.writeheader()
        for record in summary:
            head = {k: record[k] for k in ("row", "policy", "cache", "steps")}
            head["params"] = json.dumps(record["params"])
            writer.writerow({**record, **head, "class": "all"})
            for prompt, values in record["per_class"].items():
                writer.writerow({**values, **head, "class": prompt})


def _markdown(config: AblationConfig, summary: list[dict], quality: dict, figures: dict[str, str],
              out: Path, sections: str) -> str:
    rows = markdown_table(COLUMNS, [([r["row"]], r) for r in summary], ["row"])
    per_class = markdown_table(CLASS_COLUMNS, [([r["row"], prompt], v) for r in summary
                                                for prompt, v in r["per_class"].items()], ["row", "class"])
    params = "".join(f"- `{r['row']}`: {json.dumps(r['params'])}\n" for r in summary
                     if r["params"]["policy"] or r["params"]["cache"])
    pictures = "".join(f"### {title}\n\n![{title}]({path})\n\n" for title, path in figures.items())
    return (
        f"# Ablation: {out.name}\n\n"
        f"{config.num_samples} samples per row ({config.num_per_class} per class of {', '.join(PROMPTS)}), "
        f"{config.steps} steps, guidance {config.guidance}, seed {config.seed}, batch {config.batch_size}. "
        "Sample i of every row has the seed and label of the baseline's sample i; SSIM, PSNR and the "
        "distance of evaluator features compare each sample with that twin. Speed-ups are against the "
        "baseline (x wall: each batch's wall time per image, the policy's decisions included; x FLOPs: the "
        "sampler's FLOP count).\n\n"
        "FD (of the evaluator's features, which encode how noisy and how blurred an image is as well as its "
        "class: residual noise and lost detail both raise it) and spectral FD (of per-image radial power "
        "spectra: it rises with noise, but since generated images carry more high-frequency power than real "
        f"ones a blur can lower it) are against {config.num_samples} real images; two disjoint real sets of "
        f"that size are {quality['fd_real_floor']:.3g} and {quality['sfd_real_floor']:.3g} apart (each "
        "metric's own noise floor). FD 90% CI: the spread of FD over 200 bootstrap resamples of the row's "
        "samples (reals fixed), centred on the measured FD: two rows whose intervals overlap are not told apart "
        "at this sample size. Progressive rows run the base model at half resolution early: their mean patch "
        "and coarse steps count the size the model ran at, the base (a pipeline ablation's report counts a "
        "half-resolution step as 2p), so their saving shows in FLOPs and wall time. Wall times are "
        "measured on a possibly shared machine and are noisier "
        "than FLOPs. A row's PSNR is that of its samples' mean squared error to their twins (a mean of "
        "per-sample PSNR would be infinite as soon as one sample equals its twin); infinite only when every "
        "sample does: shown as identical here, null in summary.json.\n\n"
        f"## Rows\n\n{rows}\n{_timing_warnings(summary)}{params}\n## Per class\n\n{per_class}\n"
        f"{sections}## Figures\n\n{pictures}"
    )


#: Wall and FLOP speed-ups further apart than this, relatively, are flagged.
WALL_FLOPS_TOLERANCE = 0.25
#: Baseline batches whose wall times spread more than this (range over median) mean a busy machine.
BUSY_SPREAD = 0.2


def _timing_warnings(summary: list[dict]) -> str:
    """Lines that say where wall times should not be trusted: rows whose wall and FLOP speed-ups
    disagree, and a baseline whose batches took very different times (the machine was busy)."""
    lines = [f"- **check timing**: `{r['row']}` is {r['speedup_wall']:.2f}x in wall time but "
             f"{r['speedup_flops']:.2f}x in FLOPs" for r in summary[1:]
             if r["speedup_flops"] and abs(r["speedup_wall"] / r["speedup_flops"] - 1) > WALL_FLOPS_TOLERANCE]
    spread = summary[0].get("batch_seconds_spread")
    if spread is not None and spread > BUSY_SPREAD:
        lines.insert(0, f"- **the machine was busy**: the baseline's batches differ by {spread:.0%} of their "
                        "median wall time; compare FLOPs rather than wall times")
    return "".join(line + "\n" for line in lines) + ("\n" if lines else "")
