"""``coarse_to_fine`` over a tau sweep (issue 11): the schedule shaped like the oracle's.

    python benchmarks/coarse_to_fine.py [--seed 0] [--out runs/coarse-to-fine]

At ``third_order``'s token cost, ``oracle_budget`` goes coarse early and fine late, each
class at its own time (stripes near step 15, glow near step 40; ``runs/adaptivity-issue11``),
while ``third_order`` switches back and forth. ``coarse_to_fine`` (``ddit.policies``) keeps
the paper's signal but only decides when to leave the coarse size: each sample starts at
2p and turns to the base size for good at the first step whose 2p signal reaches tau. One
resumable ``ddit-ablate`` run over a tau sweep, on the tuning seeds by default.
"""

from __future__ import annotations

import argparse

import torch

import ddit.ablate
from ddit.policies import CoarseToFinePolicy

TAUS = [8e-4, 1.6e-3, 3.2e-3, 6.4e-3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0, help="first sample seed (0: tuning; 10000: held out)")
    parser.add_argument("--out", default="runs/coarse-to-fine")
    parser.add_argument("--num-per-class", type=int, default=32)
    parser.add_argument("--taus", type=lambda text: [float(t) for t in text.split(",")], default=TAUS,
                        help="comma-separated tau values to sweep")
    parser.add_argument("--threads", type=int)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = ddit.ablate.run(args.out, [CoarseToFinePolicy.name], ["none"], fewer_steps=(),
                           num_per_class=args.num_per_class, seed=args.seed, guidance=2.0, steps=50, batch_size=64,
                           sweeps={CoarseToFinePolicy.name: {"tau": args.taus}})
    for r in rows:
        low, high = r["fd_interval"]
        print(f"{r['row']:32s} x FLOPs {r['speedup_flops']:5.2f}  FD {r['fd']:5.1f} ({low:.1f}-{high:.1f})  "
              f"adherence {r['adherence']:.3f}  coarse steps {r['coarse_step_fraction']:.2f}")


if __name__ == "__main__":
    main()
