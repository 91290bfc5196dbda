#!/usr/bin/env bash
# The GPU check in one command, on a bare GPU machine (torch and transformers there; bitsandbytes, peft at
# qbco's version, trl and datasets carried as wheels). Under 8 minutes on one H200: installs the wheels
# (~20 s), runs the CUDA bf16 tests (tests/test_cuda.py, ~1 min), then bench/gpu/gpu_bench.py (model build,
# qbco, TRL default, TRL precompute: ~5 min, under its own 400 s deadline). Figures go to $OUT.
#
#   here, once:      bash bench/gpu/fetch_wheels.sh            # bench/gpu/wheels/, ignored by git
#   on the device:   bash bench/gpu/run.sh                     # with bench/gpu/wheels carried along
#   dry run here:    bash bench/gpu/run.sh --dry-run           # the CPU part: qbco's and TRL's venvs, no GPU
set -uo pipefail
cd "$(dirname "$0")/../.."
OUT=${OUT:-bench/out/gpu}
mkdir -p "$OUT"
start=$(date +%s)
shopt -s nullglob
wheels=(bench/gpu/wheels/*.whl)
[ ${#wheels[@]} -gt 0 ] || { echo "no wheels in bench/gpu/wheels: run bash bench/gpu/fetch_wheels.sh first (here), and carry that folder"; exit 1; }

if [ "${1:-}" = "--dry-run" ]; then
    # The wheels are for the GPU machine's CPython 3.12: here they are only unpacked, to check they install.
    site=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" --only-binary=:all: \
        --python-version 3.12 --implementation cp --platform manylinux_2_24_x86_64 --platform any "${wheels[@]}" \
        && echo "wheels install: $(ls "$site" | grep -c dist-info) distributions into $site" || echo "wheels FAILED to install"
    rm -rf "$site"
    QBCO_CUDA_TESTS_ON_CPU=1 .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -3
    .venv/bin/python bench/gpu/gpu_bench.py --dry-run --out "$OUT" --python-trl bench/.venv-trl/bin/python 2>&1 | tee "$OUT/gpu-bench.log"
    echo "dry run took $(( $(date +%s) - start )) s"
    exit 0
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
echo "installed in $(( $(date +%s) - start )) s"
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
python3 - <<'PY'
import importlib
for name in ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "pyarrow", "trl", "qbco"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({m.__file__})")
    except Exception as err:  # a missing or broken package is reported, and the rest still runs
        print(f"{name}: IMPORT FAILED: {type(err).__name__}: {err}")
PY
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py 2>&1 | tee "$OUT/test_cuda.log" | tail -15
timeout 410 python3 bench/gpu/gpu_bench.py --out "$OUT" 2>&1 | tee "$OUT/gpu-bench.log"
echo "GPU check took $(( $(date +%s) - start )) s"
