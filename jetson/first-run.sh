#!/usr/bin/env bash
# First run on a real Jetson: builds the TensorRT engines for a bundle (each checked against onnxruntime on a
# frame and a prefill + 3 decode steps), benchmarks vision / prefill / decode on both backends, and writes ONE
# JSON file to send back (machine, install checks, plan, engine keys, parity report, host memory, timings).
# About 15 minutes at most on an Orin Nano (per-step limits; a failed or killed step is recorded, the rest runs).
#
#   jetson/first-run.sh BUNDLE [--out FILE] [--no-build] [--ort-precision fp32|int8|int4] [--dry-run]
#
# Runs `molmo-edge doctor BUNDLE --verify` from the venv jetson/setup.sh made (MOLMO_EDGE_VENV to override).
# Best in MAXN with fixed clocks: sudo nvpmodel -m 0 && sudo jetson_clocks (the report records the mode).
set -euo pipefail
VENV="${MOLMO_EDGE_VENV:-$HOME/.venvs/molmo-edge}"
[ $# -ge 1 ] && [ "${1#-}" = "$1" ] || { sed -n '2,11p' "$0"; exit 2; }
BIN="$VENV/bin/molmo-edge"
[ -x "$BIN" ] || BIN="$(command -v molmo-edge || true)"
[ -n "$BIN" ] || { echo "error: molmo-edge is not installed: run jetson/setup.sh first" >&2; exit 1; }
exec "$BIN" doctor "$1" --verify "${@:2}"
