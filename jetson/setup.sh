#!/usr/bin/env bash
# Set up molmo-edge on a Jetson: JetPack 6.1/6.2 (L4T r36.4+, Orin, TensorRT 10.3) or 7.x (L4T r38, Thor,
# TensorRT 10.13). Detects the release, installs the Python side from sources that exist for that JetPack,
# and runs `molmo-edge doctor`. Idempotent: run it again after a JetPack upgrade.
#
#   jetson/setup.sh [--venv DIR] [--no-apt] [--cpu-onnxruntime] [--bundle BUNDLE] [--dry-run]
#
# --dry-run prints every command instead of running it (works anywhere, also off Jetson with
# NV_TEGRA_RELEASE=/path/to/a/copy). The TensorRT plugin build (kernels/, IPluginV3) is not part of this
# script yet: it lands with the plugin.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${MOLMO_EDGE_VENV:-$HOME/.venvs/molmo-edge}"
APT=1
CPU_ORT=0
DRY=0
BUNDLE=""
RELEASE_FILE="${NV_TEGRA_RELEASE:-/etc/nv_tegra_release}"

while [ $# -gt 0 ]; do
  case "$1" in
    --venv) VENV="$2"; shift 2 ;;
    --no-apt) APT=0; shift ;;
    --cpu-onnxruntime) CPU_ORT=1; shift ;;
    --bundle) BUNDLE="$2"; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "[setup] $*" >&2; }
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
die() { echo "error: $*" >&2; exit 1; }

# --- 1. which JetPack -----------------------------------------------------------------------------
[ -r "$RELEASE_FILE" ] || die "$RELEASE_FILE not found: this is not a Jetson (L4T). On a PC use: pip install -e '$REPO'"
line="$(head -n 1 "$RELEASE_FILE")"
major="$(sed -n 's/.*R\([0-9]\+\) (release).*/\1/p' <<<"$line")"
rev="$(sed -n 's/.*REVISION: \([0-9.]\+\).*/\1/p' <<<"$line")"
[ -n "$major" ] && [ -n "$rev" ] || die "cannot read the L4T release from '$line'"
L4T="$major.$rev"
rev_major="${rev%%.*}"
case "$major" in
  36)
    [ "$rev_major" -ge 4 ] || die "L4T $L4T is JetPack 6.0 (TensorRT 8.6): flash JetPack 6.1 or 6.2 (L4T 36.4+) for TensorRT 10.3"
    JETPACK=6; CUDA_MAJOR=12; TRT_WANT=10.3; PYTHON=python3.10
    ORT_INDEX="https://pypi.jetson-ai-lab.io/jp6/cu126"
    CUDA_PY="cuda-python>=12.6,<13" ;;
  38)
    JETPACK=7; CUDA_MAJOR=13; TRT_WANT=10.13; PYTHON=python3.12
    ORT_INDEX="https://pypi.jetson-ai-lab.io/jp7/cu130"
    CUDA_PY="cuda-python>=13,<14" ;;
  *) die "L4T $L4T is not supported: use JetPack 6.1/6.2 (L4T r36.4, Orin) or JetPack 7.0/7.1 (L4T r38, Thor)" ;;
esac
say "L4T $L4T: JetPack $JETPACK line, CUDA $CUDA_MAJOR.x, TensorRT $TRT_WANT, $PYTHON"

# --- 2. system packages: TensorRT's Python bindings come with JetPack, for the system Python --------
if [ "$APT" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  run $SUDO apt-get update
  run $SUDO apt-get install -y --no-install-recommends python3-venv python3-pip python3-libnvinfer python3-libnvinfer-dev \
      v4l-utils
fi

# --- 3. the virtual environment: system site-packages so `import tensorrt` (apt) is visible --------
if [ ! -x "$VENV/bin/python" ]; then
  run "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
run "$PY" -m pip install --upgrade pip
if [ "$DRY" = 0 ] && ! "$PY" -c "import tensorrt" 2>/dev/null; then
  if [ "$JETPACK" = 7 ]; then
    # JetPack 7 is SBSA-aligned: NVIDIA's aarch64 PyPI wheels are built for it (they are not for JetPack 6)
    say "apt's TensorRT bindings are not visible: trying the PyPI wheel for TensorRT $TRT_WANT (must match libnvinfer)"
    run "$PY" -m pip install "tensorrt-cu13==$TRT_WANT.*" || say "warning: no TensorRT wheel; install python3-libnvinfer"
  else
    say "warning: 'import tensorrt' fails: install python3-libnvinfer (JetPack apt) and re-run; PyPI wheels do not fit JetPack 6"
  fi
fi
run "$PY" -m pip install "$CUDA_PY"
if [ "$CPU_ORT" = 1 ]; then
  run "$PY" -m pip install onnxruntime
else
  # onnxruntime-gpu has no aarch64 wheels on PyPI; jetson-ai-lab serves them per JetPack and CUDA
  run "$PY" -m pip install onnxruntime-gpu --extra-index-url "$ORT_INDEX" \
    || { say "warning: onnxruntime-gpu not available from $ORT_INDEX: installing the CPU build"; run "$PY" -m pip install onnxruntime; }
fi
# the runtime only (no torch): export bundles on a PC with `pip install -e '.[export]'` and copy them over
run "$PY" -m pip install -e "$REPO"

# --- 4. TensorRT plugin (IPluginV3 wrapping kernels/): not built yet ----------------------------------
say "TensorRT plugin: not part of this release (kernels/ plugin pending); engines use built-in layers only"

# --- 5. check -----------------------------------------------------------------------------------------
if [ -n "$BUNDLE" ]; then
  run "$VENV/bin/molmo-edge" doctor "$BUNDLE" || true
else
  run "$VENV/bin/molmo-edge" doctor || true
fi
say "done: activate with 'source $VENV/bin/activate'; power mode: 'sudo nvpmodel -q', max clocks: 'sudo jetson_clocks'"
