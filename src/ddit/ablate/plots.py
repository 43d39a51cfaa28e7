"""Figures of an ablation: where each policy went coarse, why (the paper's Fig. 3), what it
cost in quality (Pareto), and what the images look like beside their baseline twins.

Figures are built on ``matplotlib.figure.Figure`` directly: no pyplot state, no GUI backend.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from matplotlib.figure import Figure

from ..images import save_grid
from .config import BASELINE, AblationConfig
from .metrics import step_profile
from .runner import make_policy, read_calibration

GRID_SAMPLES = 8


#: How much a grid amplifies a row's difference from its baseline twin, so residual noise shows.
DIFFERENCE_GAIN = 4


def plot_all(out: Path, config: AblationConfig, records: dict[str, list[dict]], summary: list[dict],
             images: dict[str, torch.Tensor], base: int) -> dict[str, str]:
    """Write every figure under ``out``; returns {title: path relative to out}."""
    (out / "plots").mkdir(exist_ok=True)
    (out / "grids").mkdir(exist_ok=True)
    policies = [key for key, row in config.rows.items() if row.policy != BASELINE]
    figures = {}
    if policies:
        _patch_sizes(out / "plots/patch_sizes.png", records, policies, base)
        figures["Patch size per step and class"] = "plots/patch_sizes.png"
    signals = {key: step_profile(records[key], "signals", str(2 * base)) for key in policies}
    signals = {key: profile for key, profile in signals.items() if profile}
    if signals:
        calibrated = read_calibration(out)
        policies = {key: make_policy(config.rows[key], calibrated.get(key)) for key in signals}
        taus = {key: policy.threshold(2 * base) if hasattr(policy, "threshold") else None
                for key, policy in policies.items()}
        _signals(out / "plots/signals.png", signals, taus)
        figures[f"Policy signal at patch size {2 * base} per step and class (Fig. 3)"] = "plots/signals.png"
    pareto(out / "plots/pareto.png", summary)
    figures["Quality vs wall speed-up"] = "plots/pareto.png"
    k = min(GRID_SAMPLES, config.num_samples)
    baseline = images[next(iter(config.rows))][:k]
    for key in list(config.rows)[1:]:
        difference = ((images[key][:k] - baseline) * DIFFERENCE_GAIN).clamp(-1, 1)
        save_grid(torch.cat([baseline, images[key][:k], difference]), out / "grids" / f"{key}.png", ncol=k,
                  row_labels=["baseline", key, f"difference x{DIFFERENCE_GAIN}"])
        figures[f"Baseline (top), {key} (middle), their difference x{DIFFERENCE_GAIN} (bottom, grey = none)"] = (
            f"grids/{key}.png")
    return figures


def _panels(n: int, width: float = 4.5, height: float = 2.6) -> tuple[Figure, list]:
    cols = min(n, 2)
    fig = Figure(figsize=(width * cols, height * math.ceil(n / cols)), layout="constrained")
    axes = fig.subplots(math.ceil(n / cols), cols, squeeze=False).flatten()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, list(axes[:n])


def _patch_sizes(path: Path, records: dict[str, list[dict]], keys: list[str], base: int) -> None:
    coarsest = max(p for key in keys for r in records[key] for p in r["trace"]["patch_size"])
    fig, axes = _panels(len(keys))
    for ax, key in zip(axes, keys):
        profile = step_profile(records[key], "patch_size")
        image = ax.imshow([profile[p] for p in profile], aspect="auto", cmap="viridis", interpolation="nearest",
                          vmin=base, vmax=max(coarsest, base + 1))
        ax.set_yticks(range(len(profile)), list(profile))
        ax.set_xlabel("step (noise to clean)")
        ax.set_title(key)
        fig.colorbar(image, ax=ax, label="mean patch size")
    fig.savefig(path, dpi=110)


def _signals(path: Path, signals: dict[str, dict[str, list[float]]], taus: dict[str, float | None]) -> None:
    fig, axes = _panels(len(signals))
    for ax, (key, profile) in zip(axes, signals.items()):
        for prompt, values in profile.items():
            ax.plot(values, label=prompt)
        ax.set_xlim(0, len(values) - 1)
        if taus[key]:
            ax.axhline(taus[key], color="black", linestyle="--", linewidth=0.8, label=f"tau = {taus[key]:.2g}")
        ax.set_yscale("log")
        ax.set_xlabel("step (noise to clean)")
        ax.set_ylabel("signal (below tau: coarser)")
        ax.set_title(key)
        ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.savefig(path, dpi=110)


def pareto(path: Path, summary: list[dict]) -> None:
    """Each method's quality against its wall speed-up, one curve per method (a policy with a
    cache, over its sweep; the baseline at fewer steps; progressive over its switches), and
    the front of the rows that no other row beats on both (lower FD / spectral FD, higher
    adherence) as a dashed line."""
    fig, axes = _panels(3)
    for ax, metric, lower_is_better in ((axes[0], "fd", True), (axes[1], "sfd", True), (axes[2], "adherence", False)):
        points = [(r["speedup_wall"], r[metric], r) for r in summary if r[metric] is not None]
        curves: dict[str, list] = {}
        for x, y, r in points:
            curves.setdefault(_method(r), []).append((x, y, r["row"]))
        for i, (method, curve) in enumerate(curves.items()):
            curve.sort()
            ax.plot([x for x, _, _ in curve], [y for _, y, _ in curve], "o-", color=f"C{i % 10}", label=method,
                    markersize=4, linewidth=1)
        front, best = [], math.inf
        # fastest first: keep the rows better than all faster ones
        for x, y, _ in sorted(points, key=lambda p: p[:2], reverse=True):
            score = y if lower_is_better else -y
            if score < best:
                front.append((x, y))
                best = score
        ax.plot(*zip(*front), color="black", linestyle="--", linewidth=0.8, label="front")
        ax.set_xlabel("wall speed-up vs baseline")
        title = {"sfd": "spectral FD", "fd": "FD"}.get(metric, metric)
        ax.set_ylabel(f"{title} ({'lower' if lower_is_better else 'higher'} is better)")
    axes[0].legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.savefig(path, dpi=110)


def _method(record: dict) -> str:
    """The curve a row belongs to: its policy and cache, sweeps joined; the baseline's step counts are one curve."""
    if record["policy"] == BASELINE and record["cache"] == "none":
        return "baseline, fewer steps"
    return record["policy"] if record["cache"] == "none" else f"{record['policy']}+{record['cache']}"
