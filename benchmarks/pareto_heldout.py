"""Every method's speed/quality curve on held-out seeds (issue 11, part 6).

    python benchmarks/pareto_heldout.py --targets runs/benchmark-targets-HASH [--out runs/pareto-heldout]

The targets benchmark (``benchmarks/test_targets.py``, 256 images per row, seeds 10000+)
samples the references' curves (fewer steps, TeaCache alone, progressive resolution) and
``third_order`` at its default. This run adds the ddit policies' own curves on the same
seeds and count: ``third_order`` and ``coarse_to_fine`` over tau. Each run's wall speed-ups
are against its own baseline, interleaved batch by batch; FD compares across the two runs,
which sample the same seeds and classes (their baselines are the same images). Writes
``pareto.png`` (FD, spectral FD and adherence against wall speed-up, one curve per method)
and ``pareto.md`` (the table) into --out, beside the run.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import ddit.ablate
from ddit.ablate.plots import pareto
from ddit.policies import CoarseToFinePolicy, ThirdOrderPolicy

#: Around the defaults: third_order's 8e-4 is in the targets run; coarse_to_fine's fast setting is 2.2e-3.
SWEEPS = {ThirdOrderPolicy.name: {"tau": [4e-4, 1.2e-3]}, CoarseToFinePolicy.name: {"tau": [1.6e-3, 2.2e-3, 3.2e-3]}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", type=Path, required=True, help="the targets benchmark's run folder")
    parser.add_argument("--out", type=Path, default=Path("runs/pareto-heldout"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    targets = json.loads((args.targets / "summary.json").read_text())
    settings = json.loads((args.targets / "config.json").read_text())
    torch.set_num_threads(args.threads)
    rows = ddit.ablate.run(args.out, list(SWEEPS), ["none"], fewer_steps=(), progressive=(), sweeps=SWEEPS,
                           steps=settings["steps"], num_per_class=settings["num_per_class"], seed=settings["seed"],
                           guidance=settings["guidance"], batch_size=settings["batch_size"])
    both = targets + [r for r in rows if r["row"] != "baseline"]
    pareto(args.out / "pareto.png", both)
    lines = ["| row | wall | FLOPs | FD (90% interval) | adherence |", "|---|---|---|---|---|"]
    for r in sorted(both, key=lambda r: (r["policy"], r["cache"], r["speedup_wall"])):
        low, high = r["fd_interval"]
        lines.append(f"| {r['row']} | {r['speedup_wall']:.2f}x | {r['speedup_flops']:.2f}x | "
                     f"{r['fd']:.1f} ({low:.1f}-{high:.1f}) | {r['adherence']:.3f} |")
    (args.out / "pareto.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
