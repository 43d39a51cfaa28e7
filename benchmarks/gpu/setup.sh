# Sourced by benchmarks/gpu/run.sh and benchmarks/gpu_check.sh: picks the Python whose torch sees the GPU and
# makes ddit's imports work there. The device image has torch, peft, accelerate, transformers, pytest... but
# no diffusers or ftfy, and reaches no registry: those come as wheels carried in $WHEELS (default runs/wheels,
# made here by benchmarks/gpu/fetch_wheels.sh). Stops at once, saying why, when they cannot be had.
# Needs: OUT, and log() (which writes a line to the script's log). Sets: PY, PYTHONPATH.
WHEELS=${WHEELS:-runs/wheels}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

pick_python() {  # the first candidate whose torch imports (and sees CUDA unless told the run is on the CPU)
    local check="import torch; assert torch.cuda.is_available()"
    [[ "${DDIT_ON_CPU:-0}" == 1 ]] && check="import torch"
    for py in ${PYTHON:-} .venv/bin/python python3; do
        if command -v "$py" >/dev/null && "$py" -c "$check" 2>/dev/null; then echo "$py"; return 0; fi
    done
    return 1
}
PY=$(pick_python) || { log "no python whose torch sees a GPU (this machine reaches no registry to get one): stop"; exit 1; }

imports() {  # what ddit needs, with the versions and the card it found
    "$PY" -c "import sys, torch, diffusers, peft, accelerate, ftfy, ddit
from packaging.version import Version
assert Version(peft.__version__) >= Version('0.17'), f'peft {peft.__version__} < 0.17: carry a newer wheel'
print(sys.executable, 'torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__,
      'peft', peft.__version__, 'accelerate', accelerate.__version__)
if torch.cuda.is_available(): print(torch.cuda.get_device_name(), torch.cuda.get_device_properties(0).total_memory // 2**30, 'GiB')"
}
if ! imports >"$OUT/env.txt" 2>&1; then
    if ! compgen -G "$WHEELS/*.whl" >/dev/null; then
        cat "$OUT/env.txt"
        log "ddit cannot import here and $WHEELS holds no wheels: run benchmarks/gpu/fetch_wheels.sh where pip reaches a registry and carry runs/wheels; stop"
        exit 1
    fi
    log "installing the wheels in $WHEELS"
    site=/tmp/ddit-site
    "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$PYTHONPATH:$site"
    imports >"$OUT/env.txt" 2>&1 || { cat "$OUT/env.txt"; log "still cannot import what ddit needs: stop"; exit 1; }
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >>"$OUT/env.txt"
cat "$OUT/env.txt"
