"""CPU speed at full depth (issue 12 item 7): one released-size MolmoE-1B, every flavour side by side in one run.

    python benchmarks/bench_full_speed.py --workdir /work/speed [--after PID] [--keep]

Writes a random MolmoE-1B in the real shapes (fp16 safetensors: 14.4 GB, half the fp32 file; the bundle's
graphs are the same fp16 ones either way), exports it straight to the default INT4 decoder (`export --weights
int4 --no-check`: the export's self-check is measured by bench_full_scale.py), then, each in a fresh process:
the roofline of one decode step, `bench` with the fp32 (fp16-stored) vision, the first answer to a new 640x480
frame at the default crops and at --max-crops 2, `calibrate` (INT8 vision from 16 generated frames; --min-cosine 0.9, since random weights are not a trained ViT), `bench`
and the first answers again with the INT8 vision, then the Orin-size INT4 decoder (block 64, fp16 scales,
int8 head) exported the same way, its roofline and `bench`; for the side by side, the default with block 64 alone, the default decoder with the
float LM head (`--head float`, the default before the int8 head), the INT4 decoder in the portable layout with the
experts as routed MatMulNBits branches and a float head (`--no-fused --experts routed --head float`, the default
before QMoE) and in the portable layout with QMoE (`--no-fused`, what `quantize` makes of a float bundle), each
with its roofline and `bench`. --after PID waits for another process (a run
sharing this machine) to end before the timed steps, so the preparation can overlap it.
Free disk needed: about 40 GiB. Results: benchmarks/results/full_speed_molmoe-1b.jsonl.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
from bench_full_scale import du, finish, roofline_cmd, run_step  # noqa: E402

GiB = 2 ** 30
NEEDS_GIB = 40
# the side by side, beside the default decoder: the Orin-size one, block 64 alone, the default before the int8 head,
# and the layouts before QMoE and the fused graph
FLAVOURS = {"orin": ["--block-size", "64", "--scales", "fp16", "--head", "int8"], "block64": ["--block-size", "64"],
            "float_head": ["--head", "float"], "routed": ["--no-fused", "--experts", "routed", "--head", "float"],
            "portable_qmoe": ["--no-fused"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--after", type=int, default=None, metavar="PID", help="wait for this process to end before timing")
    ap.add_argument("--runs", type=int, default=2, help="timed runs per bench stage (default 2)")
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a dry run of the script)")
    ap.add_argument("--tiny", action="store_true", help="tiny test widths (a seconds-long check of this script)")
    ap.add_argument("--calib-samples", type=int, default=16, help="calibrate's --samples (default 16; the INT8 "
                    "vision's speed does not depend on it)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundles")
    ap.add_argument("--flavours", type=lambda v: [f for f in v.split(",") if f], default=list(FLAVOURS),
                    help=f"decoders beside the default, comma-separated (default all: {','.join(FLAVOURS)})")
    ap.add_argument("--out", default=None, help="JSON lines (default benchmarks/results/full_speed_molmoe-1b.jsonl)")
    a = ap.parse_args()
    work = os.path.join(a.workdir, "speed-molmoe-1b")
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free / GiB
    need = (0 if a.tiny or a.layers else NEEDS_GIB) - du(work) / GiB
    if free < need:
        print(f"[full-speed] {work}: {free:.0f} GiB free, this run needs about {need:.0f} GiB", file=sys.stderr)
        return 2
    out = a.out or os.path.join(os.path.dirname(__file__), "results", "full_speed_molmoe-1b.jsonl")
    ck, bundle = (os.path.join(work, n) for n in ("checkpoint", "bundle"))
    unknown = set(a.flavours) - set(FLAVOURS)
    if unknown:
        print(f"[full-speed] unknown --flavours {', '.join(sorted(unknown))}; choose from {', '.join(FLAVOURS)}", file=sys.stderr)
        return 2
    flavours = {k: v for k, v in FLAVOURS.items() if k in a.flavours}
    image, frames = os.path.join(work, "frame.jpg"), os.path.join(work, "frames")
    py, cli = [sys.executable, "-c"], [sys.executable, "-m", "molmo_edge.runtime.cli"]
    size = "tiny" if a.tiny else "full"
    try:
        with open(out, "w") as log:
            import cv2

            from molmo_edge.runtime.device.bench import sample_frame
            from molmo_edge.runtime.machine import machine_info
            log.write(json.dumps({"step": "machine", **machine_info(), "family": "molmoe-1b", "layers": a.layers,
                                  "size": size}) + "\n")
            cv2.imwrite(image, sample_frame()[:, :, ::-1])
            os.makedirs(frames, exist_ok=True)
            for i in range(20):  # distinct frames for calibration (16 samples + 4 held out)
                cv2.imwrite(os.path.join(frames, f"{i:02d}.jpg"), sample_frame(seed=i + 1)[:, :, ::-1])
            if not os.path.exists(os.path.join(ck, "config.json")):
                run_step("checkpoint", py + [
                    "from molmo_edge.export.synthetic import make_random_checkpoint; "
                    f"make_random_checkpoint({ck!r}, 'molmoe-1b', size={size!r}, n_layers={a.layers!r}, "
                    f"{'' if a.tiny else 'vocab_size=50280, '}dtype='float16', shard_bytes=4 << 30)"], work, log)
            export = cli + ["export", ck, "--dtype", "fp16", "--no-check", "--force", "--weights", "int4"]
            run_step("export_int4", export + ["-o", bundle], work, log)
            if a.after:
                print(f"[full-speed] waiting for process {a.after} to end", file=sys.stderr, flush=True)
                while os.path.exists(f"/proc/{a.after}"):
                    time.sleep(5)
            bench = ["bench", "--image", image, "--runs", str(a.runs), "--json", "--precision", "int4"]
            first = ["ask", "--image", image, "Point to the cups.", "--json", "--max-new-tokens", "16"]

            def measure(tag: str) -> None:
                run_step(f"bench_{tag}", cli + [bench[0], bundle] + bench[1:], work, log)
                run_step(f"first_answer_{tag}", cli + [first[0], bundle] + first[1:], work, log)
                run_step(f"first_answer_2crops_{tag}", cli + [first[0], bundle] + first[1:] + ["--max-crops", "2"], work, log)

            run_step("roofline", roofline_cmd(py, bundle), work, log)
            measure("fp32_vision")
            run_step("calibrate", cli + ["calibrate", bundle, "--source", frames, "--samples", str(a.calib_samples),
                                         "--holdout", "4",
                                         "--e2e-frames", "2", "--max-new-tokens", "16", "--min-cosine", "0.9", "--json"], work, log)
            measure("int8_vision")
            for tag, opts in flavours.items():
                run_step(f"export_{tag}", export + ["-o", os.path.join(work, f"bundle-{tag}")] + opts, work, log)
            shutil.rmtree(ck, ignore_errors=True)
            for tag, b in [(t, os.path.join(work, f"bundle-{t}")) for t in flavours]:
                run_step(f"roofline_{tag}", roofline_cmd(py, b), work, log)
                run_step(f"bench_{tag}", cli + [bench[0], b] + bench[1:] + ["--reduced-crops", "0"], work, log)
    finally:
        finish(work, a.keep, out, "full-speed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
