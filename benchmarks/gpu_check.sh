#!/usr/bin/env bash
# The checks that need a GPU (issue 9), as one short run for a session that is lent one (device tool), in a
# session of its own (benchmarks/gpu/run.sh in another: two do not fit one session's 15 minutes):
#   bash benchmarks/gpu/fetch_wheels.sh     # here, once: diffusers, ftfy, gguf, bitsandbytes for the device image
#   run(command="bash benchmarks/gpu_check.sh", carry=["runs/wheels"], timeout_s=450)
# Python and packages: benchmarks/gpu/setup.sh. What it writes under $OUT comes back: the tiny stock
# pipelines' tests on CUDA (a GGUF and a bitsandbytes transformer among them: quantized.log), and a small testbed
# ablation on CUDA in bf16 (report and summary).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-runs/gpu}"
mkdir -p "$OUT"
log() { echo "gpu_check.sh: $*" | tee -a "$OUT/check.log"; }
# shellcheck source=gpu/setup.sh
source benchmarks/gpu/setup.sh
export PYTHONPATH="$PWD/tests:$PYTHONPATH"
DDIT_TEST_DEVICE=cuda timeout -k 10 240 "$PY" -m pytest -q -p no:cacheprovider tests/test_pipelines.py \
    tests/test_progressive.py tests/test_experts.py tests/test_ltx.py tests/test_edit_pipelines.py \
    tests/test_precise_latents.py \
    tests/test_modular.py::test_the_baseline_is_the_stock_modular_pipeline_and_disable_restores_it \
    tests/test_modular.py::test_coarse_steps_run_on_a_quarter_of_the_image_tokens_and_repeat_exactly \
    tests/test_modular.py::test_in_a_mixed_batch_the_fine_sample_equals_its_baseline_twin \
    tests/test_ltx2.py::test_the_stock_pipeline_runs_the_baseline_unchanged_and_disable_restores_it \
    tests/test_ltx2.py::test_coarse_video_steps_in_the_stock_pipeline_and_a_samples_guidance_calls_share_its_size \
    tests/test_ltx2.py::test_image_to_video_runs_coarse_steps_with_its_per_token_timesteps \
    tests/test_ltx2.py::test_feature_caches_run_in_the_stock_pipeline_beside_coarse_steps \
    tests/test_controlnet.py::test_in_the_stock_pipeline_the_fine_sample_equals_stock_and_coarse_steps_see_the_control \
    tests/test_controlnet.py::test_feature_caches_run_beside_the_control_at_coarse_steps \
    tests/test_ip_adapter.py tests/test_style_lora.py -k "not ablation" \
    2>&1 | tee "$OUT/pipelines.log"
DDIT_TEST_DEVICE=cuda timeout -k 10 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_quantized.py \
    -k "(gguf or bitsandbytes) and not commands and not two_processes" 2>&1 | tee "$OUT/quantized.log"
timeout -k 10 120 "$PY" -m ddit.ablate.cli --out "$OUT/ablate" --device cuda --dtype bfloat16 --num-per-class 8 \
    --caches none,teacache --batch-size 32 --no-progress 2>&1 | tee "$OUT/ablate.log"
cp "$OUT/ablate/report.md" "$OUT/ablate/summary.json" "$OUT/" 2>/dev/null
log "done"
