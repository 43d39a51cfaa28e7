"""Does wall time follow FLOPs? Every row's wall speed-up against its FLOP speed-up (issue 12).

    pytest -s benchmarks/test_wall_vs_flops.py

One ``ddit-ablate`` run on the testbed (50 steps, 64 images per row in one batch,
rows interleaved batch by batch, seeds 20000+: used for nothing else), rows
``third_order`` and ``third_order+teacache`` (TeaCache at delta 0.1, the rate the README's row was
measured at) with the baseline; the run's folder is named by its configuration. Target: each row's wall
speed-up is at least 0.85x its FLOP speed-up on a quiet machine. Where it is not, the
printed split says why: the runtime's own Python (time outside the model's calls), and
what one call of each patch size achieves in FLOP/s, since a coarse call multiplies fewer
tokens and a small matrix product runs at a lower rate than a large one.
"""

import collections
import hashlib
import json
import statistics
from pathlib import Path

import pytest

from ddit.ablate import build_config, run_ablation, summarize
from ddit.ablate.models import fingerprint, folders, load_model
from ddit.ablate.runner import read_results
from ddit.testbed.evaluator import load_evaluator

TARGET = 0.85
RUNS = Path(__file__).parents[1] / "runs"


@pytest.fixture(scope="module")
def run():
    config = build_config(["third_order"], ["none", "teacache"], steps=50, fewer_steps=(), num_per_class=16,
                          cache_params={"teacache": {"delta": 0.1}}, seed=20_000, guidance=2.0, batch_size=64,
                          model=fingerprint(folders(None, None)))
    digest = hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode()).hexdigest()[:8]
    out = RUNS / f"benchmark-wall-vs-flops-{digest}"
    run_ablation(config, load_model(folders(None, None)), out, progress=False)
    rows = {r["row"]: r for r in summarize(config, out, load_evaluator())}
    return rows, read_results(out)


def test_wall_follows_flops(run):
    rows, records = run
    lines, misses = [], {}
    for key, row in rows.items():
        ratio = row["speedup_wall"] / row["speedup_flops"]
        lines.append(f"{key:24s} wall {row['speedup_wall']:.2f}x  FLOPs {row['speedup_flops']:.2f}x  ratio {ratio:.2f}")
        if ratio < TARGET:
            misses[key] = round(ratio, 3)
    rates = collections.defaultdict(list)  # FLOP/s of one model call, per patch size (cached calls apart)
    outside = {}
    for key in rows:
        mine = [r for r in records if r["row"] == key]
        model = sum(r["model_sec"] for r in mine) / len(mine)
        outside[key] = 1 - model / statistics.mean(r["sec"] for r in mine)
        for r in mine:
            t = r["trace"]
            for size, sec, flops, cached in zip(t["patch_size"], t["seconds"], t["flops"], t["cached"]):
                if sec > 0 and not cached:
                    rates[size].append(flops / sec)
    print("\n" + "\n".join(lines))
    print("time outside the model's calls: " + ", ".join(f"{k} {v:.1%}" for k, v in outside.items()))
    print("GFLOP/s of a model call: " + ", ".join(f"patch {p}: {statistics.median(v) / 1e9:.1f}"
                                                  for p, v in sorted(rates.items())))
    assert not misses, f"wall speed-up below {TARGET}x the FLOP speed-up: {misses}"
