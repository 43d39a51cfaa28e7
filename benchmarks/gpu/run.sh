#!/usr/bin/env bash
# Issue 10, part 4 on one GPU: the full FLUX.1-dev, SD3.5-medium and Wan2.1-T2V-1.3B transformers (random
# weights, bf16) timed at p, 2p and 4p through ddit.MultiPatchTransformer, and whole 50-step schedules; then,
# if the budget allows, FLUX.1 Kontext editing a 1024x1024 image (flux-kontext: the reference's tokens beside).
# Writes $OUT/real_shapes.json and $OUT/real_shapes.md (naming the card) after each model, so a run cut
# short keeps the models it finished; $OUT/run.log and $OUT/env.txt beside them.
#
#   bash benchmarks/gpu/run.sh                       # OUT defaults to runs/gpu
#   device tool: run(command="bash benchmarks/gpu/run.sh", carry=["runs/wheels"], timeout_s=540)
#
# Time: DDIT_BENCH_BUDGET_S (default 420) bounds the whole script. Each model's process gets what is left
# (timeout), and an end-to-end loop predicted to end later is skipped (--deadline); about 4 minutes on an
# H100 by an estimate from FLOP counts, not yet a measurement.
# Python: $PYTHON, else the first of .venv/bin/python and python3 whose torch sees CUDA (else pip installs
# torch). Missing packages (the device image lacks diffusers): wheels from $WHEELS (default runs/wheels,
# made by benchmarks/gpu/fetch_wheels.sh where pip reaches a registry), else pip from a registry.
# FLUX.2-dev (flux2: 32B parameters, 64 GB of random bf16 weights), Qwen-Image (qwenimage: 20B, 40 GB) and
# Z-Image-Turbo (zimage: 6B), HunyuanVideo-1.5 (hunyuanvideo15: 8.3B, 48,360 tokens a step) and one expert of
# Wan2.2-T2V-A14B (wan14b: 14B, 73,920 tokens a step) are left out of the default list to keep the first run
# inside its time; DDIT_BENCH_MODELS="flux2 qwenimage zimage hunyuanvideo15 wan14b" runs them.
# DDIT_BENCH_ARGS adds arguments to every run, DDIT_BENCH_MODELS picks models: with
# DDIT_BENCH_ARGS="--device cpu --depth 1 --steps 2 --repeats 1" the script runs end to end without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
budget=${DDIT_BENCH_BUDGET_S:-420}
args=${DDIT_BENCH_ARGS:-}
OUT=${OUT:-runs/gpu}
WHEELS=${WHEELS:-runs/wheels}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "run.sh: $*" | tee -a "$OUT/run.log"; }

pick_python() {  # the first candidate whose torch imports (and sees CUDA unless the run is on the CPU)
    local check="import torch; assert torch.cuda.is_available()"
    [[ " $args " == *" --device cpu "* || " $args " == *" --device meta "* ]] && check="import torch"
    for py in ${PYTHON:-} .venv/bin/python python3; do
        if command -v "$py" >/dev/null && "$py" -c "$check" 2>/dev/null; then echo "$py"; return 0; fi
    done
    return 1
}
PY=$(pick_python) || {
    log "no python with CUDA torch: pip install torch"
    python3 -m pip install -q torch 2>&1 | tail -3
    PY=$(pick_python) || { log "still no torch that sees a GPU: stop"; exit 1; }
}

versions() {  # imports what the benchmark needs and says which versions and card it found
    "$PY" -c "import sys, torch, diffusers, peft, accelerate, ddit
print(sys.executable, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')"
}
if ! versions >"$OUT/env.txt" 2>&1; then
    if compgen -G "$WHEELS/*.whl" >/dev/null; then
        log "installing the wheels in $WHEELS"
        site=/tmp/ddit-site
        "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
        export PYTHONPATH="$PYTHONPATH:$site"  # ahead of site-packages: the carried versions win
    else
        log "no wheels in $WHEELS: pip install -e . from a registry"
        "$PY" -m pip install -q -e . 2>&1 | tail -3
    fi
    versions >"$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; log "cannot import diffusers, peft, accelerate and ddit: stop"; exit 1; }
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/env.txt"
cat "$OUT/env.txt"

for model in ${DDIT_BENCH_MODELS:-flux sd3 wan flux-kontext}; do
    left=$((budget - ($(date +%s) - start)))
    if ((left < 30)); then log "$model skipped: ${left}s of the budget left"; continue; fi
    log "$model: ${left}s left"
    # shellcheck disable=SC2086  # args is a list of words
    timeout -k 10 "$left" "$PY" benchmarks/real_shapes.py --models "$model" --out "$OUT" \
        --deadline $((start + budget - 10)) $args 2>&1 | tee -a "$OUT/run.log"
    status=${PIPESTATUS[0]}
    ((status == 0)) || log "$model ended with status $status (124: out of time); what it wrote stays"
done
log "done in $(($(date +%s) - start))s"
cat "$OUT/real_shapes.md" 2>/dev/null
