#!/usr/bin/env bash
# One prepared command for a GPU machine (CUDA GPU, Python with torch, nvcc; cuda-python used
# when present, else only the nvcc-built C library runs; nothing is downloaded). Runs the kernel tests (GPU ones included)
# and the micro-benchmarks against torch SDPA (flash backend), and writes one JSON:
# $OUT/gpu_check.json when OUT is set, else ./gpu_check.json. Finishes well under 5 minutes.
#   bash kernels/gpu_check.sh            (from the repository root or anywhere)
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ -n "${OUT:-}" ]; then mkdir -p "$OUT"; JSON="$OUT/gpu_check.json"; else JSON="$PWD/gpu_check.json"; fi
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
export MOLMO_EDGE_KERNEL_CACHE="${MOLMO_EDGE_KERNEL_CACHE:-$WORK/kernel-cache}"

# molmo_edge importable without installing the package: a shim folder of symlinks
if ! "$PY" -c "import molmo_edge.kernels.build" >/dev/null 2>&1; then
  mkdir -p "$WORK/shim/molmo_edge"
  for d in runtime export calibration kernels; do ln -s "$REPO/$d" "$WORK/shim/molmo_edge/$d"; done
  export PYTHONPATH="$WORK/shim${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" - <<'PYEOF' || { echo "gpu_check: molmo_edge.kernels is not importable" >&2; exit 2; }
import molmo_edge.kernels.build as KB
print("kernels from", KB.KERNEL_DIR, "| nvcc:", KB.nvcc_path(), "| nvrtc:", KB.nvrtc_available())
PYEOF

cd "$REPO"
PYTEST_RC=""
if "$PY" -c "import pytest" >/dev/null 2>&1; then
  # -p no:cacheprovider: the tree may be read-only; the budget keeps the bench time intact
  timeout 200 "$PY" -m pytest -p no:cacheprovider -q -rs tests/test_kernels.py \
      --junitxml="$WORK/junit.xml" >"$WORK/pytest.log" 2>&1
  PYTEST_RC=$?
  tail -n 25 "$WORK/pytest.log"
else
  echo "pytest not installed: the benchmark's own correctness checks still run" >"$WORK/pytest.log"
fi

timeout 90 "$PY" "$REPO/kernels/gpu_bench.py" --out "$JSON" --pytest-log "$WORK/pytest.log" \
    ${PYTEST_RC:+--pytest-rc "$PYTEST_RC"} --junit "$WORK/junit.xml"
BENCH_RC=$?
[ -f "$JSON" ] || echo "{\"error\": \"gpu_bench.py exited $BENCH_RC without writing results\", \"pytest_rc\": \"$PYTEST_RC\"}" >"$JSON"
echo "gpu_check: pytest rc=${PYTEST_RC:-n/a}, bench rc=$BENCH_RC, results in $JSON"
[ "${PYTEST_RC:-0}" = "0" ] && [ "$BENCH_RC" = "0" ]
