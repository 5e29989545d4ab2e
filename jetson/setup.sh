#!/usr/bin/env bash
# Set up molmo-edge on a Jetson: JetPack 6.1/6.2 (L4T r36.4+, Orin, TensorRT 10.3) or 7.x (L4T r38, Thor,
# TensorRT 10.13). Detects the release, installs the Python side from sources that exist for that JetPack,
# and runs `molmo-edge doctor`. Idempotent: run it again after a JetPack upgrade.
#
#   jetson/setup.sh [--venv DIR] [--no-apt] [--cpu-onnxruntime] [--bundle BUNDLE] [--dry-run]
#
# It never lets pip replace what JetPack provides: onnxruntime-gpu comes from jetson-ai-lab's index for this
# JetPack (the CPU `onnxruntime` distribution is removed, not layered over it), OpenCV is the system one
# (GStreamer, for csi:// cameras; pip's opencv-python* is removed from the venv), numpy stays 1.x where the
# system modules need it (a constraints file on every pip call), and molmo-edge is installed with the
# [jetson] extra, which pulls neither onnxruntime nor OpenCV.
#
# --dry-run prints every command and the pip plan instead of running them (works anywhere, also off Jetson
# with NV_TEGRA_RELEASE=/path/to/a/copy; MOLMO_EDGE_SYSTEM_NUMPY / MOLMO_EDGE_SYSTEM_CV2 stand in for the
# system's versions). The TensorRT plugin build (kernels/, IPluginV3) is not part of this
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
    -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
    *) echo "error: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "[setup] $*" >&2; }
run() { if [ "$DRY" = 1 ]; then echo "+ $*"; else "$@"; fi; }
die() { echo "error: $*" >&2; exit 1; }

# --- 1. which JetPack -----------------------------------------------------------------------------
[ -r "$RELEASE_FILE" ] || die "$RELEASE_FILE not found: this is not a Jetson (L4T). On a PC use: pip install -e '$REPO[cpu]' (or [gpu])"
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

# --- 2. system packages: TensorRT's Python bindings and OpenCV (with GStreamer, for csi://) come with JetPack,
#        for the system Python; the venv sees them and pip never installs a second copy of either -----------
SYS_CV2="${MOLMO_EDGE_SYSTEM_CV2:-$("$PYTHON" -c 'import cv2; print(cv2.__version__)' 2>/dev/null || true)}"
if [ "$APT" = 1 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  run $SUDO apt-get update
  run $SUDO apt-get install -y --no-install-recommends python3-venv python3-pip python3-libnvinfer python3-libnvinfer-dev \
      v4l-utils
  if [ -z "$SYS_CV2" ]; then
    # JetPack's OpenCV (nvidia-opencv) is built with GStreamer; its Python module is libopencv-python
    run $SUDO apt-get install -y --no-install-recommends libopencv-python \
      || say "warning: JetPack's OpenCV Python module is not installable: csi:// cameras need it (sudo apt install nvidia-opencv)"
    [ "$DRY" = 1 ] || SYS_CV2="$("$PYTHON" -c 'import cv2; print(cv2.__version__)' 2>/dev/null || true)"
  fi
fi

# --- 3. numpy: keep the major version the system's OpenCV and TensorRT bindings were built against ---------
# JetPack 6 (Ubuntu 22.04, Python 3.10) ships numpy 1.21 and its OpenCV/TensorRT modules are built against
# numpy 1.x: a numpy 2 in the venv makes `import cv2` fail ("compiled using NumPy 1.x cannot be run in NumPy
# 2"). On JetPack 7 the same holds whenever the system numpy is 1.x.
SYS_NUMPY="${MOLMO_EDGE_SYSTEM_NUMPY:-$("$PYTHON" -c 'import numpy; print(numpy.__version__)' 2>/dev/null || true)}"
NUMPY_PIN=""
if [ "$JETPACK" = 6 ] || [ "${SYS_NUMPY%%.*}" = 1 ]; then NUMPY_PIN="numpy<2"; fi
say "system numpy ${SYS_NUMPY:-none}, system OpenCV ${SYS_CV2:-none}: venv numpy ${NUMPY_PIN:-unconstrained}"

# --- 4. the virtual environment: system site-packages so `import tensorrt` and `import cv2` (apt) are visible --
if [ ! -x "$VENV/bin/python" ]; then
  run "$PYTHON" -m venv --system-site-packages "$VENV"
fi
PY="$VENV/bin/python"
CONSTRAINTS="$VENV/molmo-edge-constraints.txt"
# every pip call below is constrained, so no dependency can pull in numpy 2
if [ "$DRY" = 1 ]; then echo "+ write $CONSTRAINTS: ${NUMPY_PIN:-(empty)}"; else printf '%s\n' $NUMPY_PIN > "$CONSTRAINTS"; fi
PIP=("$PY" -m pip install -c "$CONSTRAINTS")
run "$PY" -m pip install --upgrade pip
if [ "$DRY" = 0 ] && ! "$PY" -c "import tensorrt" 2>/dev/null; then
  if [ "$JETPACK" = 7 ]; then
    # JetPack 7 is SBSA-aligned: NVIDIA's aarch64 PyPI wheels are built for it (they are not for JetPack 6)
    say "apt's TensorRT bindings are not visible: trying the PyPI wheel for TensorRT $TRT_WANT (must match libnvinfer)"
    run "${PIP[@]}" "tensorrt-cu13==$TRT_WANT.*" || say "warning: no TensorRT wheel; install python3-libnvinfer"
  else
    say "warning: 'import tensorrt' fails: install python3-libnvinfer (JetPack apt) and re-run; PyPI wheels do not fit JetPack 6"
  fi
fi
run "${PIP[@]}" "$CUDA_PY"
# onnxruntime and onnxruntime-gpu are two distributions of one `onnxruntime/` package: installing one over the
# other silently replaces the CUDA provider, and uninstalling one deletes files the other needs. So when the
# unwanted flavour is in the venv, both go and the wanted one is installed clean (pip never touches the
# system site-packages from a venv). Earlier versions of this script pip-installed opencv-python-headless,
# which shadows JetPack's GStreamer OpenCV: that goes too.
has() { [ "$DRY" = 1 ] || "$PY" -m pip show -q "$1" >/dev/null 2>&1; }
if [ "$CPU_ORT" = 1 ]; then
  if has onnxruntime-gpu; then run "$PY" -m pip uninstall -y onnxruntime-gpu onnxruntime; fi
  run "${PIP[@]}" onnxruntime
  ORT_PLAN="onnxruntime (CPU, PyPI)"
else
  if has onnxruntime; then run "$PY" -m pip uninstall -y onnxruntime onnxruntime-gpu; fi
  # onnxruntime-gpu has no aarch64 wheels on PyPI; jetson-ai-lab serves them per JetPack and CUDA
  run "${PIP[@]}" onnxruntime-gpu --extra-index-url "$ORT_INDEX" \
    || die "onnxruntime-gpu is not available from $ORT_INDEX: check the network, or re-run with --cpu-onnxruntime"
  ORT_PLAN="onnxruntime-gpu ($ORT_INDEX)"
fi
if [ -n "$SYS_CV2" ] || [ "$DRY" = 1 ]; then
  run "$PY" -m pip uninstall -y opencv-python opencv-python-headless opencv-contrib-python
fi
# the runtime only (no torch), extra [jetson]: no onnxruntime, no OpenCV from pip. Bundles are exported on a PC
# (`pip install -e '.[cpu,export]'`) and copied over
run "${PIP[@]}" -e "$REPO[jetson]"
say "pip plan: install $ORT_PLAN, $CUDA_PY, molmo-edge[jetson] (editable; tokenizers, pillow); numpy ${NUMPY_PIN:-as is}; \
remove pip onnxruntime$([ "$CPU_ORT" = 1 ] && echo '-gpu') and pip opencv-python*; keep JetPack's TensorRT, OpenCV ${SYS_CV2:-(apt)} and numpy ${SYS_NUMPY:-?}"

# --- 5. TensorRT plugin (IPluginV3 wrapping kernels/): not built yet ----------------------------------
say "TensorRT plugin: not part of this release (kernels/ plugin pending); engines use built-in layers only"

# --- 6. check -----------------------------------------------------------------------------------------
if [ -n "$BUNDLE" ]; then
  run "$VENV/bin/molmo-edge" doctor "$BUNDLE" || true
else
  run "$VENV/bin/molmo-edge" doctor || true
fi
say "done: activate with 'source $VENV/bin/activate'; power mode: 'sudo nvpmodel -q', max clocks: 'sudo jetson_clocks'"
