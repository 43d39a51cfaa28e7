#!/usr/bin/env bash
# Wheels for benchmarks/gpu/run.sh and gpu_check.sh on a GPU machine that reaches no registry: what ddit
# imports that the device image lacks (diffusers, importlib_metadata with its own needs, ftfy for Wan's prompts;
# gguf and bitsandbytes for gpu_check.sh's quantized tests; torch, peft, accelerate and the rest are there:
# /work/.library/device/KINDS.md), at the versions of this checkout's venv (bitsandbytes, which it lacks, pinned).
# Run where pip reaches a registry; runs/ is git-ignored, and the device tool takes the folder with carry:
#   bash benchmarks/gpu/fetch_wheels.sh
#   run(command="bash benchmarks/gpu/run.sh", carry=["runs/wheels"], timeout_s=400)
set -euo pipefail
cd "$(dirname "$0")/../.."
dest=${WHEELS:-runs/wheels}
py=${PYTHON:-.venv/bin/python}
pins=$("$py" -c 'from importlib.metadata import version as v
print(" ".join(f"{n}=={v(n)}" for n in ("diffusers", "importlib_metadata", "zipp", "lazy-importer", "ftfy", "wcwidth",
                                       "gguf")))')
# gpu_check.sh's quantized tests: diffusers quantizes with bitsandbytes on CUDA only, so this venv lacks it (43 MB
# of the device tool's 64 MiB carry)
pins="$pins bitsandbytes==0.50.2"
mkdir -p "$dest"
# shellcheck disable=SC2086  # pins is a list of words
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux2014_x86_64 -d "$dest" $pins
ls -l "$dest"
