#!/usr/bin/env bash
# Issue 10, part 4 on one GPU: the full FLUX.1-dev, SD3.5-medium and Wan2.1-T2V-1.3B transformers (random
# weights, bf16) timed at p, 2p and 4p through ddit.MultiPatchTransformer, and whole 50-step schedules; then,
# if the budget allows, FLUX.1 Kontext editing a 1024x1024 image (flux-kontext: the reference's tokens beside).
# Writes $OUT/real_shapes.json and $OUT/real_shapes.md (naming the card) after each model, so a run cut
# short keeps the models it finished; $OUT/run.log and $OUT/env.txt beside them.
#
#   bash benchmarks/gpu/run.sh                       # OUT defaults to runs/gpu
#   device tool: run(command="bash benchmarks/gpu/run.sh", carry=["runs/wheels"], timeout_s=400)
#
# Time: DDIT_BENCH_BUDGET_S (default 330) bounds the whole script, installs included, so that a 15-minute device
# session, machine start included, leaves time for a rerun. Each model's process gets what is left (timeout),
# and an end-to-end loop predicted to end later is skipped (--deadline); about 4 minutes on an H100 by an
# estimate from FLOP counts, not yet a measurement. Run this script alone in a session (gpu_check.sh in another).
# Python and packages: benchmarks/gpu/setup.sh (wheels carried in runs/wheels, made by fetch_wheels.sh).
# FLUX.2-dev (flux2: 32B parameters, 64 GB of random bf16 weights), Qwen-Image (qwenimage: 20B, 40 GB) and
# Z-Image-Turbo (zimage: 6B), HunyuanVideo-1.5 (hunyuanvideo15: 8.3B, 48,360 tokens a step) and one expert of
# Wan2.2-T2V-A14B (wan14b: 14B, 73,920 tokens a step) and LTX-2 (ltx2: 19B, video and audio) are left out of the
# default list to keep the first run inside its time; DDIT_BENCH_MODELS="flux2 qwenimage zimage hunyuanvideo15
# wan14b ltx2" runs them.
# DDIT_BENCH_ARGS adds arguments to every run, DDIT_BENCH_MODELS picks models: with
# DDIT_BENCH_ARGS="--device cpu --depth 1 --steps 2 --repeats 1" the script runs end to end without a GPU.
set -uo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)
budget=${DDIT_BENCH_BUDGET_S:-330}
args=${DDIT_BENCH_ARGS:-}
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
log() { echo "run.sh: $*" | tee -a "$OUT/run.log"; }
[[ " $args " == *" --device cpu "* || " $args " == *" --device meta "* ]] && export DDIT_ON_CPU=1
# shellcheck source=setup.sh
source benchmarks/gpu/setup.sh

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
