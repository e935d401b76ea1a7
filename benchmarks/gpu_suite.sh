#!/usr/bin/env bash
# One command for a lent GPU (H100/H200): install carried wheels, build the extension with its CUDA
# kernels, run the GPU tests (Triton kernels natively, CUDA cache kernels) and the kernel
# benchmarks, and leave everything under $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_suite.sh                # from the repository root
#   QUICK=1 bash benchmarks/gpu_suite.sh        # the benchmarks' --quick subset (a minute)
#   SKIP_TESTS=1 / SKIP_BUILD=1 / SKIP_BENCH=1  # leave a part out
#
# Through the device tool (a session's `run`): carry `.whl` when it holds wheels (e.g. flashinfer;
# the image already has torch, triton, transformers, matplotlib, tqdm, pytest), command:
#   bash benchmarks/gpu_suite.sh
# At most 8 files come back from $OUT, so the suite writes: suite.log, tests.xml, the benchmark CSVs
# (verify/sample/cache) and plots.tar.gz (every PNG). Commit the CSVs under benchmarks/results/.
# A failing step is logged and the suite goes on; the exit status is non-zero if any step failed.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-$ROOT/benchmarks/results/gpu}"
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/specdec_gpu_suite.XXXXXX)"
LOG="$OUT/suite.log"
exec > >(tee -a "$LOG") 2>&1
export PYTHONUNBUFFERED=1 SPECDEC_BENCH_NO_PROGRESS=1
PY="${PYTHON:-python3}"
FAILED=()

step() { echo; echo "=== $* ($(date +%H:%M:%S))"; }
run_step() {  # run_step NAME CMD...: log, keep going, remember failures
  local name="$1"; shift
  step "$name"
  if "$@"; then echo "--- $name: ok"; else local rc=$?; echo "--- $name: FAILED (exit $rc)"; FAILED+=("$name"); fi
}

step "machine"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv || true
"$PY" - <<'EOF' || true
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
try:
    import triton; print("triton", triton.__version__)
except Exception as e: print("triton missing:", e)
for m in ("transformers", "flashinfer", "matplotlib", "tqdm", "pytest"):
    try:
        mod = __import__(m); print(m, getattr(mod, "__version__", "?"))
    except Exception as e: print(m, "missing:", type(e).__name__)
EOF

if compgen -G ".whl/*.whl" > /dev/null; then
  step "install carried wheels"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || FAILED+=("wheels")
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if [[ -z "${SKIP_BUILD:-}" ]]; then
  if [[ -z "${CUDA_HOME:-}" && -d /usr/local/cuda ]]; then export CUDA_HOME=/usr/local/cuda; fi
  if [[ -z "${TORCH_CUDA_ARCH_LIST:-}" ]]; then
    TORCH_CUDA_ARCH_LIST="$("$PY" -c 'import torch; m, n = torch.cuda.get_device_capability(); print(f"{m}.{n}")' 2>/dev/null || echo 9.0)"
    export TORCH_CUDA_ARCH_LIST
  fi
  export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
  run_step "build specdec._C (CUDA_HOME=${CUDA_HOME:-none}, arch $TORCH_CUDA_ARCH_LIST)" \
    "$PY" setup.py -q build_ext --inplace
  "$PY" -c 'import specdec; print(specdec.backends())' || true
fi

if [[ -z "${SKIP_TESTS:-}" ]]; then
  TESTS=()
  for t in tests/test_triton_kernels.py tests/test_verify.py tests/test_sample.py tests/test_cache.py; do
    [[ -f "$t" ]] && TESTS+=("$t")
  done
  if ((${#TESTS[@]})); then
    # TRITON_INTERPRET unset: the Triton kernels run natively on the GPU
    TO=()
    "$PY" -c 'import pytest_timeout' 2>/dev/null && TO=(--timeout=900)
    run_step "GPU tests" env -u TRITON_INTERPRET "$PY" -m pytest -q -rs -p no:cacheprovider "${TO[@]}" \
      --junitxml="$OUT/tests.xml" "${TESTS[@]}"
  fi
fi

if [[ -z "${SKIP_BENCH:-}" ]]; then
  TAG="$("$PY" -c 'import torch; n = torch.cuda.get_device_name(0).lower(); print(next((k for k in ("h200", "h100", "a100", "l40", "l4") if k in n), "gpu"))' 2>/dev/null || echo gpu)"
  Q=()
  [[ -n "${QUICK:-}" ]] && Q=(--quick)
  run_step "bench_verify" "$PY" benchmarks/bench_verify.py --device cuda --tag "$TAG" --out "$WORK" "${Q[@]}" \
    --modes sampled
  run_step "bench_sample" "$PY" benchmarks/bench_sample.py --device cuda --tag "$TAG" --out "$WORK" "${Q[@]}"
  if [[ -f benchmarks/bench_cache.py ]]; then
    run_step "bench_cache" "$PY" benchmarks/bench_cache.py --device cuda --tag "$TAG" --out "$WORK" "${Q[@]}"
  fi
  cp "$WORK"/*.csv "$OUT"/ 2>/dev/null || true
  if compgen -G "$WORK/*.png" > /dev/null; then
    tar -C "$WORK" -czf "$OUT/plots.tar.gz" $(cd "$WORK" && ls *.png)
  fi
fi

step "done"
ls -la "$OUT"
if ((${#FAILED[@]})); then
  echo "FAILED steps: ${FAILED[*]}"
  exit 1
fi
echo "all steps ok"
