"""`molmo-edge bench BUNDLE`: measure each stage of a bundle on this machine."""
from __future__ import annotations

import argparse
import json
import sys


def cmd_bench(a: argparse.Namespace) -> int:
    from molmo_edge.runtime.device.bench import format_table, run_bench
    from molmo_edge.runtime.cli.main import _backend_for, _model_folder, _runtime

    folder = _model_folder(a.bundle)
    m = _runtime(folder, _backend_for(folder, a.backend or "onnxruntime"), a.precision)
    print(f"benchmarking {folder}: {a.runs} runs per stage after a warm-up ...", file=sys.stderr, flush=True)
    res = run_bench(m, a.image, runs=a.runs, decode_tokens=a.decode_tokens, reduced_crops=a.reduced_crops)
    print(json.dumps(res) if a.json else format_table(res))
    return 0


def add_commands(sub) -> None:
    s = sub.add_parser("bench", help="measure each stage of a bundle (preprocess, vision, prefill, decode, end to end)",
                       description="Latency of each stage on this machine, warm-up excluded, medians with min/max: "
                                   "preprocess, vision per crop and per frame (default and reduced crops), prefill and "
                                   "decode tokens/s, end to end for a 640x480 frame, peak memory. On Jetson it also "
                                   "records the power mode and a tegrastats sample.")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--image", help="frame to use (default: a generated 640x480 frame)")
    s.add_argument("--runs", type=int, default=5, help="timed runs per stage (default 5)")
    s.add_argument("--decode-tokens", type=int, default=32, help="tokens per decode measurement (default 32)")
    s.add_argument("--reduced-crops", type=int, default=2, help="also time vision at this max_crops (0 to skip)")
    from molmo_edge.runtime.cli.main import add_runtime_options
    add_runtime_options(s, ("onnxruntime", "tensorrt"))
    s.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    s.set_defaults(fn=cmd_bench)
