"""How a summary is shown and kept, for the testbed's and a pipeline's ablations alike: numbers as
text, JSON without infinities, markdown and rich tables, wall speed-ups against the baseline."""

from __future__ import annotations

import math
import statistics

import torch
from rich.table import Table


#: Figures in decibels, which a row takes from its samples' mean noise-to-signal ratio, not their mean (one sample
#: equal to its twin would make that infinite).
DECIBELS = ("psnr_vs_baseline", "audio_snr_vs_baseline")


def row_mean(name: str, values: torch.Tensor) -> float:
    """A row's figure from its samples': their mean; for PSNR, the PSNR of their mean squared error (images in
    [0, 1]), and for an audio SNR likewise."""
    values = values.double()
    if name in DECIBELS:  # NaN: a sample whose figure is not known (an audio SNR against a silent twin)
        return float(-10 * torch.log10((10 ** (-values / 10)).nanmean()))
    return values.mean().item()


def fmt(value) -> str:
    """A cell: 3 significant digits, a range as ``a-b``, ``-`` for none, ``identical`` for an infinite PSNR or SNR
    (every sample equal to its twin)."""
    if value is None:
        return "-"
    if isinstance(value, list):  # a range
        return "-".join(f"{v:.3g}" for v in value)
    if isinstance(value, float):
        if value == math.inf:
            return "identical"  # PSNR of an image and itself
        return f"{value:.3g}" if math.isfinite(value) else str(value)
    return str(value)


def finite(value):
    """JSON has no infinity: PSNR of identical images (the baseline against itself) becomes null."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def markdown_table(columns: dict[str, str], lines: list[tuple[list[str], dict]], first: list[str]) -> str:
    """``lines``: (the names in the ``first`` columns, the record whose ``columns`` fill the rest)."""
    head = "| " + " | ".join([*first, *columns.values()]) + " |\n|" + "---|" * len(first) + "---:|" * len(columns)
    return "\n".join([head, *("| " + " | ".join([*names, *(fmt(values.get(c)) for c in columns)]) + " |"
                              for names, values in lines)]) + "\n"


def rich_table(title: str, columns: dict[str, str], summary: list[dict]) -> Table:
    """One line per row, for the terminal."""
    t = Table(title=title)
    t.add_column("row", overflow="fold")  # a swept row's name is long: wrap it, never cut it
    for name in columns.values():
        t.add_column(name, justify="right")
    for record in summary:
        t.add_row(record["row"], *(fmt(record.get(c)) for c in columns))
    return t


def add_wall_speedups(summary: list[dict], batch_seconds: dict[str, list[float]]) -> None:
    """Wall speed-ups against the first row, the baseline. The range over batches (batch k of a row
    against batch k of the baseline) shows how much load drifted; one batch has none."""
    base = summary[0]
    for record in summary:
        record["speedup_wall"] = base["sec_per_image"] / record["sec_per_image"]
        per_batch = [b / r for b, r in zip(batch_seconds[base["row"]], batch_seconds[record["row"]])]
        record["speedup_wall_range"] = [min(per_batch), max(per_batch)] if len(per_batch) > 1 else None
        mine = batch_seconds[record["row"]]
        record["batch_seconds_spread"] = ((max(mine) - min(mine)) / statistics.median(mine)
                                          if len(mine) > 1 else None)


def batch_seconds(records: list[dict], batch_size: int) -> list[float]:
    """Wall seconds per image of each batch of a row (every sample of a batch has its batch's)."""
    return [r["sec"] for r in records if r["sample"] % batch_size == 0]
