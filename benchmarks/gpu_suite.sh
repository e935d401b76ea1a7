#!/usr/bin/env bash
# One command for a lent GPU (H100/H200), sized for a few minutes of device time. Every step has
# its own time limit and writes under $OUT as soon as it has a result, so a cut-short run still
# returns what it measured. At most 8 files: suite.log, gpu_check.csv, tests.xml, sanitizer.log,
# build.log, sample/cache benchmark CSVs.
#
#   bash benchmarks/gpu_suite.sh                  # from the repository root (OUT defaults to benchmarks/results/gpu)
#   DRY_RUN=1 bash benchmarks/gpu_suite.sh        # CPU: gpu_check.py --dry-run only (CI runs this)
#
# Order = value per second: the verify check (correctness at production shapes, CUDA graphs,
# torch.compile, timing) first, while the extension builds in the background; then the CUDA cache
# tests, compute-sanitizer on tiny calls, the native Triton test files, the quick benchmarks.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/suite.log") 2>&1
export PYTHONUNBUFFERED=1 SPECDEC_BENCH_NO_PROGRESS=1
PY="${PYTHON:-python3}"
FAILED=()
step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
run_step() {  # run_step NAME SECONDS CMD...: time-limited, logged, never stops the suite
  local name="$1" limit="$2"; shift 2
  step "$name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@"; local rc=$?
  if ((rc == 0)); then echo "--- $name: ok"; else echo "--- $name: FAILED (exit $rc)"; FAILED+=("$name"); fi
}

if [[ -n "${DRY_RUN:-}" ]]; then
  run_step "gpu_check dry run" 300 env TRITON_INTERPRET=1 "$PY" benchmarks/gpu_check.py --dry-run --out "$OUT"
  ((${#FAILED[@]})) && exit 1 || exit 0
fi

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm,clocks.mem --format=csv || true
"$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name(0))' || true
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || FAILED+=("wheels")
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# the extension (CPU + CUDA cache kernels) builds while the Triton checks run
export CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}" MAX_JOBS="${MAX_JOBS:-16}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-$("$PY" -c 'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}"
( timeout 420 "$PY" setup.py -q build_ext --inplace > "$OUT/build.log" 2>&1; echo $? > /tmp/specdec_build.rc ) &
BUILD=$!

run_step "gpu_check" "${CHECK_LIMIT:-240}" "$PY" benchmarks/gpu_check.py --out "$OUT"

step "wait for the extension build"
wait $BUILD
BRC=$(cat /tmp/specdec_build.rc 2>/dev/null || echo 1)
tail -5 "$OUT/build.log"
if ((BRC != 0)); then echo "--- build: FAILED (exit $BRC)"; FAILED+=("build"); fi
"$PY" -c 'import specdec; print(specdec.backends())' || true

run_step "CUDA cache tests" 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_cache.py -k "cuda"
if command -v compute-sanitizer > /dev/null; then
  run_step "compute-sanitizer memcheck" 100 compute-sanitizer --tool memcheck --log-file "$OUT/sanitizer.log" \
    --error-exitcode 3 "$PY" benchmarks/gpu_sanitize.py
fi
run_step "Triton tests, native" "${TEST_LIMIT:-100}" env -u TRITON_INTERPRET "$PY" -m pytest -q -p no:cacheprovider \
  -x --junitxml="$OUT/tests.xml" tests/test_triton_kernels.py
WORK="$(mktemp -d)"
run_step "bench_sample --quick" 60 "$PY" benchmarks/bench_sample.py --device cuda --tag h200 --out "$WORK" --quick
cp "$WORK"/*.csv "$OUT"/ 2>/dev/null
run_step "bench_cache --quick" 60 "$PY" benchmarks/bench_cache.py --device cuda --tag h200 --out "$WORK" --quick
cp "$WORK"/*.csv "$OUT"/ 2>/dev/null

step "done"
ls -la "$OUT"
if ((${#FAILED[@]})); then echo "FAILED steps: ${FAILED[*]}"; exit 1; fi
echo "all steps ok"
