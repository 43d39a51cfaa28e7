"""Does a better-trained base model make the paper's signal follow the content? (issue 11, part 2)

    python benchmarks/base_signal.py [--bases DIR ...] [--num-per-class 32] [--seed 10000] [--policy-run]

The README blamed `third_order`'s class-blindness on the small base model's step-to-step
jitter. This measures that claim for any number of base models (default: the shipped
one), on their own 50-step trajectories (guidance 2, held-out seeds), with no adapter in
the loop: the shipped adapter only supplies the candidate sizes, and `third_order` with
a tau no signal reaches keeps every step at the base size while recording its signals.

Per base model and class, over the steps where the rule decides (step 3 on):
- ``coarse``: the fraction of steps whose patch-4 signal lies below the default tau
  (what the rule would make coarse at first sight, before restarts);
- ``median``: the median patch-4 signal;
- ``jitter``: the median over samples of the std of log(signal[k+1] / signal[k]);
- ``class share``: per step, the fraction of the log-signal's variance over samples that
  the class explains (eta squared), averaged over steps. 0 = the signal is blind to the
  class; 1 = it is the class alone.
- ``median_per_step`` (in the JSON, and plotted next to it with ``--out``): the median
  signal at each step;
- Kendall's tau between the classes' ``coarse`` and the oracle's coarse fractions at
  `third_order`'s cost (docs/policies.md: glow 0.85, moon 0.76, shapes 0.76,
  stripes 0.36): +1 = the same order as the content's, -1 = reversed.

``--policy-run`` also runs `third_order` at its defaults with the shipped adapter (on the
shipped base, which the adapter was distilled for) and splits the signals it sees by the
size that produced the last three latents: the base size, or a coarse one (the adapter's).
Per class: the fraction of steps it ran coarse, and the median patch-4 signal after three
base-size and after three coarse steps (signals after a mix of sizes are left out); and
the median ratio of each such signal to the clean run's at the same sample and step (the
same seeds: 1 = the coarse steps changed nothing the signal sees).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from scipy.stats import kendalltau

from ddit.policies import ThirdOrderPolicy
from ddit.testbed.adapter import load_multipatch_model
from ddit.testbed.base_model import SHIPPED_BASE, generate
from ddit.testbed.data import PROMPTS
from ddit.testbed.evaluate import balanced_labels

#: The oracle's coarse fraction per class at third_order's token cost (docs/policies.md, seeds 0-127).
ORACLE_COARSE = {"glow": 0.85, "moon": 0.76, "shapes": 0.76, "stripes": 0.36}
NEVER = 1e-12  # a tau no signal reaches: every step at the base size


def signals(base: str | Path, num_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch-4 signals (samples, steps from 3) of the base model's own trajectories, and the labels."""
    labels = balanced_labels(len(PROMPTS) * num_per_class)
    model = load_multipatch_model(base=base)
    samples = generate(model, labels, seed=seed, policy=ThirdOrderPolicy(tau=NEVER), progress=True)
    assert all(r["patch_size"] == model.patch_sizes[0] for trace in samples.traces for r in trace)
    rows = [[r["signals"][4] for r in trace if r["signals"]] for trace in samples.traces]
    return torch.tensor(rows, dtype=torch.float64), labels


def policy_run(num_per_class: int, seed: int, clean: torch.Tensor) -> dict:
    """Where third_order's own signals come from: base-size or coarse (adapter) steps. ``clean``: the
    shipped base model's signals on the same seeds (samples, steps from 3), to compare step by step."""
    labels = balanced_labels(len(PROMPTS) * num_per_class)
    model = load_multipatch_model()
    base = model.patch_sizes[0]
    samples = generate(model, labels, seed=seed, policy=ThirdOrderPolicy(), progress=True)
    result = {}
    for c, name in enumerate(PROMPTS):
        after = {"base": [], "coarse": []}
        ratio = {"base": [], "coarse": []}  # to the clean run's signal at the same sample and step
        mine = [b for b, y in enumerate(labels.tolist()) if y == c]
        for b in mine:
            trace = samples.traces[b]
            for k in range(3, len(trace)):
                made_by = {r["patch_size"] for r in trace[k - 3:k]}
                if trace[k]["signals"] and len(made_by) == 1:
                    kind = "base" if made_by == {base} else "coarse"
                    after[kind].append(trace[k]["signals"][4])
                    ratio[kind].append(trace[k]["signals"][4] / clean[b, k - 3].item())
        median = lambda v: torch.tensor(v).median().item() if v else None  # noqa: E731
        steps = [r for b in mine for r in samples.traces[b]]
        result[name] = {"coarse": sum(r["patch_size"] != base for r in steps) / len(steps),
                        **{f"median_after_{k}": median(v) for k, v in after.items()},
                        **{f"ratio_after_{k}": median(v) for k, v in ratio.items()}}
    order = kendalltau([result[n]["coarse"] for n in PROMPTS], [ORACLE_COARSE[n] for n in PROMPTS])
    return {"classes": result, "kendall_tau_vs_oracle": float(order.statistic)}


def summarise(signal: torch.Tensor, labels: torch.Tensor, tau: float) -> dict:
    log = signal.log()
    total = log.var(dim=0, correction=0)
    means = torch.stack([log[labels == c].mean(dim=0) for c in range(len(PROMPTS))])
    weights = torch.bincount(labels, minlength=len(PROMPTS)).double()[:, None] / len(labels)
    between = (weights * (means - log.mean(dim=0)) ** 2).sum(dim=0)
    per_class = {}
    for c, name in enumerate(PROMPTS):
        mine = signal[labels == c]
        per_class[name] = {"coarse": (mine < tau).double().mean().item(), "median": mine.median().item(),
                           "jitter": mine.log().diff(dim=1).std(dim=1).median().item(),
                           "median_per_step": mine.median(dim=0).values.tolist()}
    order = kendalltau([per_class[n]["coarse"] for n in PROMPTS], [ORACLE_COARSE[n] for n in PROMPTS])
    return {"classes": per_class, "class_share": (between / total).mean().item(),
            "kendall_tau_vs_oracle": float(order.statistic)}


def print_bases(results: dict, tau: float) -> None:
    print(f"patch-4 signal on each base model's own trajectories; coarse = below tau {tau:g}")
    print("| base | class share | Kendall tau vs oracle | "
          + " | ".join(f"{n}: coarse / median / jitter" for n in PROMPTS) + " |")
    print("|---|---:|---:|" + "---|" * len(PROMPTS))
    for base, r in results.items():
        cells = " | ".join(f"{c['coarse']:.2f} / {c['median']:.2e} / {c['jitter']:.2f}" for c in r["classes"].values())
        print(f"| {base} | {r['class_share']:.3f} | {r['kendall_tau_vs_oracle']:+.2f} | {cells} |")


def print_policy_run(run: dict) -> None:
    print("third_order's own run (defaults, shipped adapter): Kendall tau vs oracle "
          f"{run['kendall_tau_vs_oracle']:+.2f}")
    print("| class | coarse steps | median signal after base steps | after coarse steps | ratio to the clean run, "
          "after base steps | after coarse steps |\n|---|---:|---:|---:|---:|---:|")
    for name, c in run["classes"].items():
        print(f"| {name} | {c['coarse']:.2f} | {c['median_after_base']:.2e} | {c['median_after_coarse']:.2e} "
              f"| {c['ratio_after_base']:.2f} | {c['ratio_after_coarse']:.2f} |")


def plot(bases: dict, tau: float, path: Path) -> None:
    """One panel per base model: the median patch-4 signal per step and class, with the default tau."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(bases), figsize=(5 * len(bases), 3.6), squeeze=False, sharey=True)
    for ax, (base, r) in zip(axes[0], bases.items()):
        for name, c in r["classes"].items():
            ax.plot(range(3, 3 + len(c["median_per_step"])), c["median_per_step"], label=name)
        ax.axhline(tau, color="k", ls="--", lw=0.8, label=f"tau {tau:g}")
        ax.set(yscale="log", xlabel="step (of 50)", title=Path(base).name, ylabel="median patch-4 signal")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bases", nargs="*", default=[str(SHIPPED_BASE)],
                        help="base model folders (none: only the --policy-run)")
    parser.add_argument("--num-per-class", type=int, default=32)
    parser.add_argument("--seed", type=int, default=10000, help="first seed (held out from tuning)")
    parser.add_argument("--policy-run", action="store_true", help="also split third_order's own signals by "
                        "the size that made them (shipped base and adapter)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here, and the per-step medians as a "
                        "plot beside it (.png)")
    args = parser.parse_args()

    tau = ThirdOrderPolicy.tau
    recorded = {base: signals(base, args.num_per_class, args.seed) for base in args.bases}
    bases = {base: summarise(*pair, tau) for base, pair in recorded.items()}
    if bases:
        print_bases(bases, tau)
    run = None
    if args.policy_run:
        clean = recorded.get(str(SHIPPED_BASE)) or signals(SHIPPED_BASE, args.num_per_class, args.seed)
        run = policy_run(args.num_per_class, args.seed, clean[0])
    if run:
        print_policy_run(run)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"bases": bases, "third_order_run": run}, indent=1))
        if bases:
            plot(bases, tau, args.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
