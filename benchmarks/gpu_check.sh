#!/usr/bin/env bash
# The checks that need a GPU (issue 9), as one short run for a session that is lent one (device tool):
#   run(command="bash benchmarks/gpu_check.sh", timeout_s=480)
# It needs torch with CUDA, diffusers, peft, transformers, pluggy, rich, torchmetrics and pytest there:
# see the device tool's KINDS.md for what the machine has, and carry the missing ones as wheels.
# What it writes under $OUT comes back: the tiny stock pipelines' tests on CUDA, and a small
# testbed ablation on CUDA in bf16 (report and summary).
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src:$PWD/tests${PYTHONPATH:+:$PYTHONPATH}"
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
python3 -c "import torch, diffusers, peft; print(torch.__version__, torch.cuda.get_device_name(0),
diffusers.__version__, peft.__version__)" | tee "$OUT/versions.txt"
DDIT_TEST_DEVICE=cuda python3 -m pytest -q -p no:cacheprovider tests/test_pipelines.py tests/test_progressive.py \
    tests/test_experts.py tests/test_ltx.py tests/test_edit_pipelines.py -k "not ablation" 2>&1 | tee "$OUT/pipelines.log"
python3 -m ddit.ablate.cli --out "$OUT/ablate" --device cuda --dtype bfloat16 --num-per-class 8 \
    --caches none,teacache --batch-size 32 --no-progress 2>&1 | tee "$OUT/ablate.log"
cp "$OUT/ablate/report.md" "$OUT/ablate/summary.json" "$OUT/" 2>/dev/null
