"""Side by side, same weights, same machine, one run: the onnxruntime bundle runtime vs the torch
reference on a full-width, reduced-depth random checkpoint (MolmoE-1B by default).

    python benchmarks/bench_runtime.py --family molmoe-1b --layers 2 --workdir /tmp/molmo-bench

Reports vision ms per crop, prefill tokens/s and decode tokens/s for both and their ratios, as
JSON and as a markdown row for benchmarks/RESULTS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np


def machine() -> str:
    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def timed(fn, runs: int) -> float:
    fn()  # warm-up
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="molmoe-1b")
    ap.add_argument("--layers", type=int, default=2, help="decoder layers (full width); the ViT is always full")
    ap.add_argument("--crops", type=int, default=1, help="crops per vision call")
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/tmp/molmo-bench")
    a = ap.parse_args()

    import torch

    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.export.checkpoint import load_reference_model
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.session import Molmo

    ck = os.path.join(a.workdir, f"{a.family}-full-{a.layers}L")
    bundle = ck + ".bundle"
    if not os.path.exists(os.path.join(ck, "config.json")):
        make_random_checkpoint(ck, a.family, size="full", n_layers=a.layers, vocab_size=50280)
    if not os.path.exists(os.path.join(bundle, "manifest.json")):
        export_bundle(ck, bundle, force=True)
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    rt = Molmo.load(bundle)
    model, cfg, _ = load_reference_model(ck)
    rng = np.random.default_rng(0)
    v = cfg.vision
    images = rng.standard_normal((a.crops, v.num_patches, v.patch_dim)).astype(np.float32)
    masks = np.ones((a.crops, v.num_patches), np.float32)
    ti, tm = torch.from_numpy(images), torch.from_numpy(masks)

    res = {"machine": machine(), "family": a.family, "layers": a.layers, "crops": a.crops, "threads": threads,
           "prompt_tokens": a.prompt_tokens, "decode_tokens": a.decode_tokens}
    with torch.no_grad():
        res["vision_ms_per_crop"] = {
            "onnxruntime": timed(lambda: rt.backend.vision(images, masks), a.runs) * 1e3 / a.crops,
            "torch": timed(lambda: model.vision(ti, tm), a.runs) * 1e3 / a.crops}
        ids = rng.integers(0, 50000, a.prompt_tokens)
        x = rt.embed(ids)
        pos = np.arange(a.prompt_tokens)[None]

        def ort_prefill():
            cache = rt.backend.new_cache(a.prompt_tokens + a.decode_tokens + 1)
            rt.backend.decode(x, pos, cache, np.array([a.prompt_tokens - 1]))
            return cache

        tid = torch.from_numpy(ids)[None]
        res["prefill_tokens_per_s"] = {"onnxruntime": a.prompt_tokens / timed(ort_prefill, a.runs),
                                       "torch": a.prompt_tokens / timed(lambda: model(tid), a.runs)}

        def ort_decode():
            cache = ort_prefill()
            tok = 1
            t = time.perf_counter()
            for i in range(a.decode_tokens):
                logits = rt.backend.decode(rt.embed(np.array([tok])), np.array([[a.prompt_tokens + i]]), cache, np.zeros(1, np.int64))
                tok = int(logits[0, -1].argmax())
            return a.decode_tokens / (time.perf_counter() - t)

        def torch_decode():
            out = model(tid)
            past, tok = out.past, 1
            t = time.perf_counter()
            for _ in range(a.decode_tokens):
                step = model(torch.tensor([[tok]]), past=past)
                past, tok = step.past, int(step.logits[0, -1].argmax())
            return a.decode_tokens / (time.perf_counter() - t)

        ort_decode(), torch_decode()  # warm-up
        res["decode_tokens_per_s"] = {"onnxruntime": statistics.median(ort_decode() for _ in range(a.runs)),
                                      "torch": statistics.median(torch_decode() for _ in range(a.runs))}
    res["ratio_ort_over_torch"] = {
        "vision": res["vision_ms_per_crop"]["torch"] / res["vision_ms_per_crop"]["onnxruntime"],
        "prefill": res["prefill_tokens_per_s"]["onnxruntime"] / res["prefill_tokens_per_s"]["torch"],
        "decode": res["decode_tokens_per_s"]["onnxruntime"] / res["decode_tokens_per_s"]["torch"]}
    print(json.dumps(res, indent=2))
    r = res
    print(f"| {a.family} full width, {a.layers} layers | {r['vision_ms_per_crop']['onnxruntime']:.0f} / "
          f"{r['vision_ms_per_crop']['torch']:.0f} ({r['ratio_ort_over_torch']['vision']:.2f}x) | "
          f"{r['prefill_tokens_per_s']['onnxruntime']:.1f} / {r['prefill_tokens_per_s']['torch']:.1f} "
          f"({r['ratio_ort_over_torch']['prefill']:.2f}x) | {r['decode_tokens_per_s']['onnxruntime']:.2f} / "
          f"{r['decode_tokens_per_s']['torch']:.2f} ({r['ratio_ort_over_torch']['decode']:.2f}x) | {r['machine']} |")


if __name__ == "__main__":
    main()
