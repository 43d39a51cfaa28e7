"""The ``ddit`` command line: thin argument parsing over the library."""

from __future__ import annotations

import argparse
import sys


def _train_base(args) -> None:
    from .testbed.train_base import BaseTrainConfig, train_base

    config = BaseTrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                             seed=args.seed, num_images=args.num_images, bf16=args.bf16)
    export = train_base(args.out, config, resume=args.resume, checkpoint_minutes=args.checkpoint_minutes)
    print(f"EMA weights written to {export}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddit", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    testbed = commands.add_parser("testbed", help="build and evaluate the embedded testbed")
    testbed_commands = testbed.add_subparsers(dest="testbed_command", required=True)

    p = testbed_commands.add_parser("train-base", help="train the testbed's base DiT")
    p.add_argument("--out", required=True, help="folder for checkpoints and the exported EMA model")
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=20000)
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast; faster only on CPUs with native bf16 (AVX512-BF16, AMX)")
    p.add_argument("--checkpoint-minutes", type=float, default=3.0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    p.set_defaults(func=_train_base)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as err:
        print(f"ddit: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
