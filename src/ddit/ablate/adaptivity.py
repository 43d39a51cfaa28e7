"""Available vs captured: how much of the content-adaptivity that an oracle finds at some cost a
cheap policy's schedule captures (issue 11).

The oracle (``oracle``, or ``oracle_budget`` fitted to a policy's cost) knows each step's error
at each patch size, so its schedule shows which classes and which steps can afford coarse
patches. A policy that follows the content goes coarse on the same classes, at the same steps.
Each policy row without a cache is paired with the oracle row closest to it in token cost; per
class, both rows' mean patch size and coarse-step fraction, and whether they order the classes
alike (Kendall's tau of their mean patch sizes); per step, both rows' coarse fraction, as a figure.
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure
from scipy.stats import kendalltau

from ..testbed.data import PROMPTS
from .config import BASELINE, NO_CACHE, PROGRESSIVE, AblationConfig

ORACLES = ("oracle", "oracle_budget")


def token_speedup(records: list[dict], base: int) -> float:
    """Tokens of the base schedule over the row's: a step at patch p runs (base / p)^2 of them."""
    sizes = torch.tensor([r["trace"]["patch_size"] for r in records], dtype=torch.float64)
    return sizes.numel() / (base / sizes).square().sum().item()


def compare(config: AblationConfig, records: dict[str, list[dict]], base: int) -> list[dict]:
    """One record per (oracle row, policy row) pair; empty when the run lacks either."""
    plain = {key: row for key, row in config.rows.items() if row.cache == NO_CACHE}
    oracles = [key for key, row in plain.items() if row.policy in ORACLES]
    policies = [key for key, row in plain.items() if row.policy not in (*ORACLES, BASELINE, PROGRESSIVE)]
    if not oracles or not policies:
        return []
    speedups = {key: token_speedup(records[key], base) for key in (*oracles, *policies)}
    pairs = []
    for key in policies:
        oracle = min(oracles, key=lambda o: abs(speedups[o] - speedups[key]))
        classes = {k: _per_class(records[k], base) for k in (oracle, key)}
        agreement = kendalltau([classes[oracle][p]["mean_patch_size"] for p in PROMPTS],
                               [classes[key][p]["mean_patch_size"] for p in PROMPTS]).statistic
        pairs.append({"oracle": oracle, "policy": key,
                      "token_speedup": {oracle: speedups[oracle], key: speedups[key]},
                      "per_class": classes, "kendall_tau": float(agreement),
                      "coarse_per_step": {k: _coarse_per_step(records[k], base) for k in (oracle, key)}})
    return pairs


def _per_class(records: list[dict], base: int) -> dict[str, dict[str, float]]:
    result = {}
    for c, prompt in enumerate(PROMPTS):
        sizes = torch.tensor([r["trace"]["patch_size"] for r in records if r["label"] == c], dtype=torch.float64)
        result[prompt] = {"mean_patch_size": sizes.mean().item(),
                          "coarse_step_fraction": (sizes > base).double().mean().item()}
    return result


def _coarse_per_step(records: list[dict], base: int) -> dict[str, list[float]]:
    """Per class, the fraction of its samples at a coarse size at each step."""
    return {prompt: (torch.tensor([r["trace"]["patch_size"] for r in records if r["label"] == c]) > base)
            .double().mean(dim=0).tolist() for c, prompt in enumerate(PROMPTS)}


def order(per_class: dict[str, dict[str, float]]) -> str:
    """The classes, coarsest first."""
    return " > ".join(sorted(per_class, key=lambda p: -per_class[p]["mean_patch_size"]))


def markdown(pairs: list[dict]) -> str:
    """The report's section: a table per pair, and what the tables mean."""
    if not pairs:
        return ""
    text = ("## Available vs captured\n\n"
            "Each policy beside the oracle row closest to it in token cost (`oracle_budget` is the oracle "
            "fitted to a cost: `--policy-param oracle_budget.speedup=S`, S the policy's token speed-up). "
            "The oracle goes coarse where the adapter's error is small, so its schedule is the adaptivity "
            "available; the policy's is what it captures. Kendall's tau of the two rows' mean patch sizes "
            "over the classes: 1 = the same order.\n\n")
    for pair in pairs:
        oracle, policy, classes = pair["oracle"], pair["policy"], pair["per_class"]
        speed = pair["token_speedup"]
        text += (f"### `{policy}` vs `{oracle}`\n\n"
                 f"Token speed-up {speed[policy]:.2f}x vs {speed[oracle]:.2f}x. Coarsest first: `{policy}` "
                 f"{order(classes[policy])}; `{oracle}` {order(classes[oracle])} (Kendall's tau "
                 f"{pair['kendall_tau']:.2f}).\n\n"
                 f"| class | mean patch, {policy} | mean patch, {oracle} | coarse steps, {policy} | "
                 f"coarse steps, {oracle} |\n|---|---|---|---|---|\n")
        text += "".join(f"| {p} | {classes[policy][p]['mean_patch_size']:.2f} | "
                        f"{classes[oracle][p]['mean_patch_size']:.2f} | "
                        f"{classes[policy][p]['coarse_step_fraction']:.2f} | "
                        f"{classes[oracle][p]['coarse_step_fraction']:.2f} |\n" for p in PROMPTS)
        text += "\n"
    return text


def plot(path: Path, pairs: list[dict]) -> None:
    """Per pair, the coarse fraction per step and class: the policy solid, the oracle dashed."""
    fig = Figure(figsize=(6, 2.8 * len(pairs)), layout="constrained")
    for ax, pair in zip(fig.subplots(len(pairs), 1, squeeze=False)[:, 0], pairs):
        for c, prompt in enumerate(PROMPTS):
            color = f"C{c}"
            ax.plot(pair["coarse_per_step"][pair["policy"]][prompt], color=color, label=f"{prompt}, {pair['policy']}")
            ax.plot(pair["coarse_per_step"][pair["oracle"]][prompt], color=color, linestyle="--",
                    label=f"{prompt}, {pair['oracle']}")
        ax.set_xlabel("step (noise to clean)")
        ax.set_ylabel("fraction of samples coarse")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title(f"{pair['policy']} (solid) vs {pair['oracle']} (dashed)")
        ax.legend(fontsize="x-small", loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    fig.savefig(path, dpi=110)
