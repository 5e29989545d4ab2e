"""One run, same weights, same machine: our runtime's flavours against the torch reference on
full-width, reduced-depth random checkpoints, with decode placed on a memory-bandwidth roofline.

    python benchmarks/bench_cpu.py --workdir /tmp/molmo-bench [--families molmoe-1b molmo-7b-d] [--layers 2]

For each family it builds (once) a checkpoint with the real widths and `--layers` decoder layers
(the ViT is always the full 23-block tower), exports a bundle with both decoder flavours, and times:
- vision ms/crop: torch eager fp32 vs onnxruntime fp32 (and INT8 Q/DQ when the bundle has it);
- prefill tokens/s and decode tokens/s: torch eager fp32 vs the portable and fused onnxruntime
  decoders (and INT8/INT4 weight-only decoders when present);
- the machine's read bandwidth, and for each decoder the bytes one decode step reads in the layout
  onnxruntime holds (decode_step_bytes: MoE only the routed top-k experts, the KV cache) divided by
  the step time, as a fraction of it;
- preprocessing's share of the end-to-end time for a 640x480 frame.
Writes JSON (--out) and a stage-breakdown PNG (--plot) and prints markdown rows for RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time

import numpy as np


def _best_rate(work, moved: int, parts: int, repeats: int) -> float:
    """Best bytes/s over `repeats` of work(i) run for i in range(parts) in as many threads at once."""
    best = 0.0
    for _ in range(repeats):
        ts = [threading.Thread(target=work, args=(i,)) for i in range(parts)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        best = max(best, moved / (time.perf_counter() - t))
    return best


def stream_bandwidth(mib: int = 512, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a multi-threaded streaming copy (read + write counted), best of `repeats`."""
    threads = threads or os.cpu_count() or 1
    src = np.ones(mib * 2**20 // 4, np.float32)
    dst = np.empty_like(src)
    cuts = np.linspace(0, src.size, threads + 1).astype(int)
    return _best_rate(lambda i: np.copyto(dst[cuts[i]:cuts[i + 1]], src[cuts[i]:cuts[i + 1]]), 2 * src.nbytes, threads, repeats)


def read_bandwidth(mib: int = 512, threads: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a multi-threaded read stream (max over uint64: as fast as a hand-written AVX-512 read loop,
    measured on the CPU box), best of `repeats`. A decode step only reads, so this is its roofline's bandwidth."""
    threads = threads or os.cpu_count() or 1
    src = np.ones(mib * 2**20 // 8, np.uint64)
    cuts = np.linspace(0, src.size, threads + 1).astype(int)
    return _best_rate(lambda i: src[cuts[i]:cuts[i + 1]].max(), src.nbytes, threads, repeats)


# quantized ops whose weights MLAS repacks at load: {op: {data input index: its scales' input index}}
_PACKED = {"MatMulNBits": {1: 2}, "QMoE": {2: 3, 5: 6}}
_DTYPE_BYTES = {1: 4, 10: 4, 16: 4, 7: 8, 6: 4, 2: 1, 3: 1, 9: 1}  # float16/bfloat16 weights are held as float32


def decode_step_bytes(model, cfg, past: int = 0, kv_itemsize: int = 4) -> dict[str, int]:
    """Bytes one decode step reads on onnxruntime's CPU provider, in the layout it holds them after load, not the
    file's (measured, onnxruntime 1.32): float16 weights are folded to float32; MatMulNBits and QMoE weights are
    repacked by MLAS with a float32 scale and a float32 block sum per block (READ_BYTES_PER_BLOCK; a 16384x4096
    4-bit matrix holds 32 MiB of nibbles + 16 MiB at block 32). Of a MoE layer's
    experts a step reads top_k of n_experts; of the RoPE tables one row. Plus the KV cache at `past` positions
    and the step's embedding row. model: an onnx.ModelProto (external data not loaded)."""
    import onnx

    from molmo_edge.runtime.memory import READ_BYTES_PER_BLOCK
    if isinstance(model, (str, os.PathLike)):
        model = onnx.load(model, load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    via_cast = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast" and n.input[0] in inits}
    packed, routed, one_row = {}, set(), set()
    for n in model.graph.node:
        for data, scales in _PACKED.get(n.op_type, {}).items():
            packed[via_cast.get(n.input[scales], n.input[scales])] = READ_BYTES_PER_BLOCK
            packed[via_cast.get(n.input[data], n.input[data])] = 1
            if n.op_type == "QMoE":
                routed.update(via_cast.get(n.input[i], n.input[i]) for i in (data, scales))
        if n.op_type == "GroupQueryAttention" and len(n.input) > 8:
            one_row.update(via_cast.get(n.input[i], n.input[i]) for i in (7, 8))  # cos/sin caches
    weights = 0
    for name, t in inits.items():
        n = int(np.prod(t.dims)) if t.dims else 1
        if name in one_row or name.startswith("rope."):
            n = t.dims[-1] if t.dims else 1
        nbytes = n * packed.get(name, _DTYPE_BYTES.get(t.data_type, 4))
        if name in routed and cfg.is_moe:
            nbytes = nbytes * cfg.moe_top_k // cfg.moe_num_experts
        weights += nbytes
    kv = 2 * cfg.n_layers * past * cfg.kv_dim * kv_itemsize
    return {"weights": weights, "kv": kv, "total": weights + kv + cfg.d_model * 4}


def _median_time(fn, runs: int) -> float:
    fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def add_quantized_flavours(bundle: str, workdir: str, frames: int = 4) -> None:
    """vision.int8 (calibrated on generated 640x480 scenes; latency only, so no accuracy gate) and
    decoder.int4 / decoder.int8 (weight-only), as `calibrate` and `quantize` would add them."""
    from molmo_edge.calibration.calibrate import calibrate_bundle
    from molmo_edge.calibration.scenes import write_images
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights
    from molmo_edge.runtime.bundle import load_bundle

    graphs = load_bundle(bundle).manifest["graphs"]
    fdir = os.path.join(workdir, "frames")
    if not os.path.isdir(fdir):
        write_images(fdir, frames + 2, seed=0, height=480, width=640, ext=".jpg")
    if "vision.int8" not in graphs:
        calibrate_bundle(bundle, fdir, samples=frames, holdout=2, max_crops=1, e2e_frames=0, min_cosine=0.0)
    for bits in (4, 8):
        if f"decoder.int{bits}" not in graphs:
            quantize_decoder_weights(bundle, bits, 32)


def bench_family(family: str, layers: int, workdir: str, runs: int, prompt_tokens: int, decode_tokens: int,
                 bandwidth: float, quant: bool = False) -> dict:
    import torch

    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.export.checkpoint import load_reference_model
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.device.bench import run_bench
    from molmo_edge.runtime.bundle import load_bundle
    from molmo_edge.runtime.session import Molmo

    ck = os.path.join(workdir, f"{family}-full-{layers}L")
    bundle = ck + ".bundle"
    if not os.path.exists(os.path.join(ck, "config.json")):
        make_random_checkpoint(ck, family, size="full", n_layers=layers, vocab_size=50280 if family == "molmoe-1b" else 152064)
    if not os.path.exists(os.path.join(bundle, "manifest.json")):
        export_bundle(ck, bundle, force=True)
    if quant:
        add_quantized_flavours(bundle, workdir)
    b = load_bundle(bundle)
    cfg = b.config
    graphs = b.manifest["graphs"]
    rng = np.random.default_rng(0)
    v = cfg.vision
    images = rng.standard_normal((1, v.num_patches, v.patch_dim)).astype(np.float32)
    masks = np.ones((1, v.num_patches), np.float32)
    ids = rng.integers(0, 50000, prompt_tokens)
    res: dict = {"family": family, "layers": layers, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
                 "vision_ms_per_crop": {}, "prefill_tokens_per_s": {}, "decode_tokens_per_s": {}, "decode_bandwidth_fraction": {},
                 "decode_step_bytes": {}}

    def time_runtime(label: str, **load):
        m = Molmo.load(bundle, **load)
        be = m.backend
        if label.startswith("ort-fp32") or label == "ort-int8":
            res["vision_ms_per_crop"][label if label != "ort-fp32-portable" else "ort-fp32"] = \
                _median_time(lambda: be.vision(images, masks), runs) * 1e3
        x = m.embed(ids)

        def prefill():
            cache = be.new_cache(prompt_tokens + decode_tokens + 1)
            be.run_decoder(x, np.arange(prompt_tokens)[None], cache, np.array([prompt_tokens - 1]))
            return cache

        res["prefill_tokens_per_s"][label] = prompt_tokens / _median_time(prefill, runs)

        def decode() -> float:
            cache, tok = prefill(), 1
            t = time.perf_counter()
            for i in range(decode_tokens):
                tok = int(be.run_decoder(m.embed(np.array([tok])), np.array([[prompt_tokens + i]]), cache, np.zeros(1, np.int64))[0, -1].argmax())
            return decode_tokens / (time.perf_counter() - t)

        decode()
        tps = statistics.median(decode() for _ in range(max(1, runs // 2)))
        res["decode_tokens_per_s"][label] = tps
        step = decode_step_bytes(b.graph_path(be.graphs["decoder"]), cfg, prompt_tokens + decode_tokens // 2,
                                 be.kv_dtype.itemsize)["total"]
        res["decode_step_bytes"][label] = step
        res["decode_bandwidth_fraction"][label] = step * tps / bandwidth

    time_runtime("ort-fp32-portable", fused=False)
    if "decoder.fused" in graphs:
        time_runtime("ort-fp32-fused")
    for prec in ("int8", "int4"):
        if (prec == "int8" and "vision.int8" in graphs) or f"decoder.{prec}" in graphs:
            time_runtime(f"ort-{prec}", precision=prec)
    # end to end at default crops (fused fp32) and preprocessing's share
    e2e = run_bench(Molmo.load(bundle), runs=max(2, runs // 2), decode_tokens=decode_tokens, reduced_crops=0)["stages"]
    res["end_to_end_ms_640x480"] = e2e["end_to_end_ms"]["median"]
    res["preprocess_ms_640x480"] = e2e["preprocess_ms"]["median"]
    res["preprocess_share"] = e2e["preprocess_share_of_end_to_end"]
    res["stage_ms_640x480"] = {"preprocess": e2e["preprocess_ms"]["median"], "vision": e2e["vision_ms_per_frame"]["median"],
                               "prefill": e2e["prefill_ms"]["median"],
                               "decode": 1e3 * decode_tokens / e2e["decode_tokens_per_s"]["median"]}

    # torch reference, same weights
    torch.set_num_threads(os.cpu_count() or 1)
    model, _, _ = load_reference_model(ck)
    ti, tm, tid = torch.from_numpy(images), torch.from_numpy(masks), torch.from_numpy(ids)[None]
    with torch.no_grad():
        res["vision_ms_per_crop"]["torch"] = _median_time(lambda: model.vision(ti, tm), runs) * 1e3
        res["prefill_tokens_per_s"]["torch"] = prompt_tokens / _median_time(lambda: model(tid), runs)

        def tdecode() -> float:
            out = model(tid)
            past, tok = out.past, 1
            t = time.perf_counter()
            for _ in range(decode_tokens):
                step = model(torch.tensor([[tok]]), past=past)
                past, tok = step.past, int(step.logits[0, -1].argmax())
            return decode_tokens / (time.perf_counter() - t)

        tdecode()
        res["decode_tokens_per_s"]["torch"] = statistics.median(tdecode() for _ in range(max(1, runs // 2)))
    model = None  # frees it before the summary (the closures above hold the name)
    t = res["decode_tokens_per_s"]["torch"]
    res["decode_speedup_vs_torch"] = {k: v / t for k, v in res["decode_tokens_per_s"].items() if k != "torch"}
    res["vision_speedup_vs_ort_fp32"] = {k: res["vision_ms_per_crop"]["ort-fp32"] / v for k, v in res["vision_ms_per_crop"].items()}
    return res


def plot(results: list[dict], path: str) -> None:
    """A stacked bar per family: where the 640x480 end-to-end time goes (PNG, drawn with OpenCV)."""
    import cv2
    colors = {"preprocess": (80, 180, 80), "vision": (200, 120, 40), "prefill": (60, 60, 200), "decode": (150, 60, 150)}
    w, bar_h, pad = 900, 46, 20
    img = np.full((pad * 3 + len(results) * (bar_h + pad) + 40, w, 3), 255, np.uint8)
    longest = max(sum(r["stage_ms_640x480"].values()) for r in results)
    scale = (w - 260) / longest
    for i, r in enumerate(results):
        y = pad + i * (bar_h + pad)
        cv2.putText(img, f"{r['family']} ({r['layers']}L)", (8, y + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        x = 200
        for k, ms in r["stage_ms_640x480"].items():
            x2 = x + max(1, int(ms * scale))
            cv2.rectangle(img, (x, y), (x2, y + bar_h), colors[k], -1)
            x = x2
        cv2.putText(img, f"{sum(r['stage_ms_640x480'].values()) / 1e3:.1f} s", (x + 6, y + 28), cv2.FONT_HERSHEY_SIMPLEX, 0.5,
                    (0, 0, 0), 1, cv2.LINE_AA)
    x = 200
    y = img.shape[0] - 30
    for k, c in colors.items():
        cv2.rectangle(img, (x, y), (x + 16, y + 16), c, -1)
        cv2.putText(img, k, (x + 22, y + 13), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1, cv2.LINE_AA)
        x += 140
    cv2.imwrite(path, img)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", nargs="+", default=["molmoe-1b", "molmo-7b-d"])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 1], help="decoder layers per family (in order)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--workdir", default="/tmp/molmo-bench")
    ap.add_argument("--quant", action="store_true", help="also add and time INT8 vision and INT4/INT8 decoders")
    ap.add_argument("--out", default="benchmarks/results/cpu.json")
    ap.add_argument("--plot", default="benchmarks/results/cpu_stages.png")
    a = ap.parse_args()
    from molmo_edge.runtime.device.bench import machine_info

    bw = read_bandwidth()
    results = []
    for fam, layers in zip(a.families, a.layers + a.layers[-1:] * len(a.families)):
        r = bench_family(fam, layers, a.workdir, a.runs, a.prompt_tokens, a.decode_tokens, bw, a.quant)
        results.append(r)
        print(json.dumps(r), flush=True)
    out = {"machine": machine_info(), "read_gb_per_s": bw / 1e9, "results": results}
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=2)
    plot(results, a.plot)
    for r in results:
        for k, tps in r["decode_tokens_per_s"].items():
            print(f"| {r['family']} {r['layers']}L | {k} | {r['vision_ms_per_crop'].get(k.replace('-portable', '').replace('-fused', ''), float('nan')):.0f} | "
                  f"{r['prefill_tokens_per_s'][k]:.1f} | {tps:.2f} | {r['decode_bandwidth_fraction'].get(k, float('nan')):.0%} |")


if __name__ == "__main__":
    main()
