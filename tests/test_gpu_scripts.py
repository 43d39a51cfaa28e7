"""The prepared GPU run (``benchmarks/gpu/run.sh``) on this CPU, end to end, at its smallest: a lent GPU gets
15 minutes, and a script that breaks there (as a change to ``real_shapes.py`` once did, after the per-step rows)
wastes them."""

import json
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_gpu_benchmark_script_runs_end_to_end_on_the_cpu(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "DDIT_BENCH_MODELS": "sd3", "DDIT_BENCH_BUDGET_S": "300",
           "DDIT_BENCH_ARGS": "--device cpu --depth 1 --steps 2 --repeats 1"}
    run = subprocess.run(["bash", "benchmarks/gpu/run.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "ended with status" not in (tmp_path / "run.log").read_text()
    record = json.loads((tmp_path / "real_shapes.json").read_text())["models"]["sd3"]
    assert record["end_to_end"]["measured_speedup"] > 0  # the whole loops ran, after the per-step rows
    assert "End to end, 2 steps" in (tmp_path / "real_shapes.md").read_text()
