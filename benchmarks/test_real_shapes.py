"""What a coarse step saves on the shapes of FLUX.1-dev (and a FLUX.1 Kontext edit), FLUX.2-dev, Qwen-Image,
Z-Image-Turbo, SD3.5-medium, Sana-1.6B, Wan2.1-T2V-1.3B, HunyuanVideo-1.5 and LTX-Video 2B (issue 10;
Wan2.2-A14B's expert runs only when named: ``real_shapes.py --models wan14b``).

    .venv/bin/python -m pytest benchmarks/test_real_shapes.py -s

Two runs of ``benchmarks/real_shapes.py``: the reduced models timed on this machine's CPU
(fp32; with DDIT_BENCH_DEVICE=cuda, the full models in bf16 on the GPU), and the full
models' FLOPs on the meta device. Tables in ``runs/real_shapes/DEVICE/real_shapes.md``,
printed too. Wall times on a shared CPU move between runs; the FLOP counts do not, and they
are what the asserts check.
"""

import os
import time

import pytest

import real_shapes

#: Seconds after which the timed end-to-end loops are skipped rather than run (the per-step times are kept).
BUDGET_S = float(os.environ.get("DDIT_BENCH_BUDGET_S", 150))


def check(records: dict) -> None:
    """The adapter at the base size is the stock call; each coarser size costs fewer FLOPs, and so does a step
    a cache skips at each size."""
    for name, record in records.items():
        flops = record["flops"]
        sizes = [str(s) for s in record["sizes"]]
        assert flops[sizes[0]] == flops["stock"], name
        assert all(flops[a] > flops[b] for a, b in zip(sizes, sizes[1:])), name
        assert all(flops[f"{s} skipped"] < flops[s] for s in sizes), name  # a cache's skipped step: less


@pytest.mark.parametrize("device", [os.environ.get("DDIT_BENCH_DEVICE", "cpu"), "meta"])
def test_real_shapes(device):
    deadline = time.time() + BUDGET_S
    records = real_shapes.main(["--device", device, "--deadline", str(deadline)])
    check(records)
    if device != "meta":  # the coarsest size runs faster than the stock call, as its FLOPs say it should
        timed = [r for r in records.values() if "median_s" in r]  # a model past the deadline is not timed
        assert timed and all(r["median_s"][str(r["sizes"][-1])] < r["median_s"]["stock"] for r in timed)
