"""INT8 vision and INT4/INT8 weight-only decoder vs fp32, side by side in one run, on this CPU.

    python benchmarks/bench_int8.py --workdir /tmp/molmo-int8 [--layers 1] [--frames 4] [--runs 7]

Builds (once, reused from --workdir) a random-weight MolmoE-1B checkpoint at full width: the real
ViT-L/14-336 tower (23 blocks) + connector, and `--layers` decoder layers of the real width (d 2048,
64 experts of 1024, top-8); exports it (fp32, with the fused decoder), calibrates the vision graph on
generated 640x480 scenes (`molmo-edge calibrate`), adds decoder.int4 and decoder.int8 (`molmo-edge
quantize`). Then, with onnxruntime on the CPU, interleaving the variants round by round so that
load from other jobs hits them alike, it times:
- vision: ms per crop for one crop and for a 640x480 frame at max_crops=1 (2 crops), fp32 vs INT8 Q/DQ;
- decoder: prefill of --prefill tokens and decode steps after it, for decoder (fp32 portable),
  decoder.fused (fp32, onnxruntime contrib ops), decoder.int4 and decoder.int8 (MatMulNBits,
  accuracy_level 4, the default), and INT4 at accuracy_level 0 (fp32 compute) for comparison.
Medians and minimums of --runs rounds; also the calibration report's feature cosine. The weights
are random (untrained): latency is representative, answers are not. Writes JSON to --out.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def build(workdir: str, layers: int, frames: int) -> str:
    from molmo_edge.calibration.calibrate import calibrate_bundle
    from molmo_edge.calibration.scenes import write_images
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights
    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.bundle import load_bundle

    ck, bundle, fdir = (os.path.join(workdir, n) for n in (f"ckpt-molmoe-{layers}l", f"bundle-molmoe-{layers}l", "frames"))
    if not os.path.exists(os.path.join(ck, "config.json")):
        _say(f"[bench] random full-width MolmoE checkpoint, {layers} decoder layer(s) -> {ck}")
        make_random_checkpoint(ck, "molmoe-1b", size="full", n_layers=layers)
    if not os.path.exists(os.path.join(bundle, "manifest.json")):
        export_bundle(ck, bundle, check=False, fused=True, progress=_say)
    graphs = load_bundle(bundle).manifest["graphs"]
    if not os.path.isdir(fdir):
        write_images(fdir, frames + 2, seed=0, height=480, width=640, ext=".jpg")
    if "vision.int8" not in graphs:
        calibrate_bundle(bundle, fdir, samples=frames, holdout=2, max_crops=1, e2e_frames=0, min_cosine=0.0, progress=_say)
    for bits in (4, 8):
        g = graphs.get(f"decoder.int{bits}")
        if g is None or g["precision"]["accuracy_level"] != 4:
            quantize_decoder_weights(bundle, bits, 32, progress=_say)
    # INT4 with fp32 compute (accuracy_level 0), outside the manifest, to show why level 4 is the default
    al0 = os.path.join(workdir, "int4-level0", "decoder.int4.onnx")
    if not os.path.exists(al0):
        from molmo_edge.calibration.weight_quant import make_quantizer, quantize_graph
        os.makedirs(os.path.dirname(al0), exist_ok=True)
        quantize_graph(os.path.join(bundle, "decoder.onnx"), al0, make_quantizer(4, 32, 0), "lm_head.weight", progress=_say,
                       top_k=load_bundle(bundle).config.moe_top_k)
    return bundle


def _time(fn, *args) -> float:
    t = time.perf_counter()
    fn(*args)
    return (time.perf_counter() - t) * 1e3


def run(bundle_dir: str, runs: int, prefill: int, decode: int, threads: int | None) -> dict:
    from molmo_edge.calibration.scenes import scene
    from molmo_edge.runtime.backends.ort import OrtBackend
    from molmo_edge.runtime.bundle import load_bundle
    from molmo_edge.runtime.processor import MolmoProcessor

    bundle = load_bundle(bundle_dir)
    cfg = bundle.config
    crops = MolmoProcessor(bundle_dir, cfg).image(scene(1234, 480, 640), max_crops=1)
    vision = {p: OrtBackend(bundle, providers=["CPUExecutionProvider"], threads=threads, precision=p, fused=False)
              for p in ("fp32", "int8")}
    decoders = {"decoder": ("fp32", False), "decoder.fused": ("fp32", True), "decoder.int4": ("int4", False),
                "decoder.int8": ("int8", False)}
    dec = {}
    for key, (precision, fused) in decoders.items():
        if key in bundle.manifest["graphs"]:
            b = OrtBackend(bundle, providers=["CPUExecutionProvider"], threads=threads, precision=precision, fused=fused)
            assert b.graphs["decoder"] == key, (key, b.graphs)
            dec[key] = b
    al0 = os.path.join(os.path.dirname(os.path.abspath(bundle_dir)), "int4-level0", "decoder.int4.onnx")
    if os.path.exists(al0) and "decoder.int4" in bundle.manifest["graphs"]:
        from molmo_edge.runtime.bundle import Bundle
        man = json.loads(json.dumps(bundle.manifest))
        man["graphs"]["decoder.int4"]["file"] = os.path.relpath(al0, bundle_dir)
        dec["decoder.int4 (accuracy_level 0)"] = OrtBackend(Bundle(bundle.folder, man, cfg), providers=["CPUExecutionProvider"],
                                                            threads=threads, precision="int4")
    rng = np.random.default_rng(0)
    emb = bundle.embeddings()
    x_prefill = np.asarray(emb[rng.integers(0, cfg.vocab_size, prefill)], np.float32)[None]
    x_step = np.asarray(emb[rng.integers(0, cfg.vocab_size, 1)], np.float32)[None]
    res: dict[str, dict[str, list[float]]] = {}

    def add(name: str, ms: float) -> None:
        res.setdefault(name, []).append(ms)

    for r in range(runs + 1):  # round 0 is the warm-up
        for p, b in vision.items():
            one = _time(b.vision, crops.images[:1], crops.image_masks[:1])
            frame = _time(b.vision, crops.images, crops.image_masks)
            if r:
                add(f"vision {p}: 1 crop (ms)", one)
                add(f"vision {p}: 640x480 frame, 2 crops (ms)", frame)
        for key, b in dec.items():
            cache = b.new_cache(prefill + decode + 1)
            pos = np.arange(prefill, dtype=np.int64)[None]
            t_pre = _time(b.run_decoder, x_prefill, pos, cache, np.array([prefill - 1], np.int64))
            steps = []
            for i in range(decode):
                steps.append(_time(b.run_decoder, x_step, np.array([[prefill + i]], np.int64), cache, np.zeros(1, np.int64)))
            if r:
                add(f"{key}: prefill {prefill} tokens (ms)", t_pre)
                add(f"{key}: decode step (ms)", statistics.median(steps))
        _say(f"[bench] round {r}/{runs} done" + (" (warm-up)" if r == 0 else ""))
    out = {k: {"median": statistics.median(v), "min": min(v), "runs": len(v)} for k, v in res.items()}
    cal = bundle.manifest.get("calibration", {})
    sizes = {k: g.get("data_bytes", 0) for k, g in bundle.manifest["graphs"].items()}
    return {"timings_ms": out, "graph_bytes": sizes, "calibration": cal.get("summary"), "method": cal.get("method"),
            "config": {"decoder_layers": cfg.n_layers, "d_model": cfg.d_model, "experts": cfg.moe_num_experts,
                       "top_k": cfg.moe_top_k, "vit_width": cfg.vision.width, "prefill": prefill, "decode_steps": decode}}


def machine() -> dict:
    import onnxruntime as ort
    info = {"python": platform.python_version(), "onnxruntime": ort.__version__, "cpus": os.cpu_count(),
            "loadavg_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        info["cpu"] = platform.processor()
    return info


def table(result: dict) -> str:
    t = result["timings_ms"]
    rows = ["| measurement | fp32 median (min) | quantized median (min) | speed-up median (min) |", "|---|---:|---:|---:|"]

    def row(label: str, a: str, b: str) -> None:
        if a in t and b in t:
            (ra, ma), (rb, mb) = (t[a]["median"], t[a]["min"]), (t[b]["median"], t[b]["min"])
            rows.append(f"| {label} | {ra:.1f} ({ma:.1f}) ms | {rb:.1f} ({mb:.1f}) ms | {ra / rb:.2f}x ({ma / mb:.2f}x) |")

    for what in ("1 crop", "640x480 frame, 2 crops"):
        row(f"vision, {what}: fp32 vs INT8 Q/DQ", f"vision fp32: {what} (ms)", f"vision int8: {what} (ms)")
    p = result["config"]["prefill"]
    for q in ("decoder.int4", "decoder.int4 (accuracy_level 0)", "decoder.int8"):
        for base in ("decoder", "decoder.fused"):
            row(f"prefill {p} tokens: {base} vs {q}", f"{base}: prefill {p} tokens (ms)", f"{q}: prefill {p} tokens (ms)")
            row(f"decode step: {base} vs {q}", f"{base}: decode step (ms)", f"{q}: decode step (ms)")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/molmo-int8")
    ap.add_argument("--layers", type=int, default=1, help="decoder layers of the random checkpoint (default 1)")
    ap.add_argument("--frames", type=int, default=4, help="calibration frames (default 4)")
    ap.add_argument("--runs", type=int, default=7, help="timed rounds after one warm-up (default 7)")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--decode", type=int, default=16, help="decode steps per round (median taken)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="write the JSON result here")
    a = ap.parse_args()
    os.makedirs(a.workdir, exist_ok=True)
    info = machine()
    bundle = build(a.workdir, a.layers, a.frames)
    result = run(bundle, a.runs, a.prefill, a.decode, a.threads)
    info["loadavg_end"] = os.getloadavg()
    result["machine"] = info
    print(json.dumps(result, indent=2))
    print(table(result))
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
