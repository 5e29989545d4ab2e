"""`molmo-edge bench`: per-stage latency of a bundle on this machine, warm-up excluded, medians with
spread. Stages: preprocess, vision (per crop and per frame, at the bundle's crops and at fewer),
prefill tokens/s, decode tokens/s, and end to end for a 640x480 frame; plus peak memory, backend,
precision and the machine (on Jetson: power mode and a tegrastats sample)."""
from __future__ import annotations

import resource
import statistics
import time
from typing import Any, Callable

import numpy as np

from molmo_edge.runtime.machine import machine_info


def peak_rss_bytes() -> int:
    """This process's peak RSS: VmHWM (reset at exec; ru_maxrss of a child can carry its forking parent's)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def stats(samples: list[float]) -> dict[str, float]:
    s = sorted(samples)
    return {"median": round(statistics.median(s), 3), "min": round(s[0], 3), "max": round(s[-1], 3), "runs": len(s)}


def _time(fn: Callable[[], Any], runs: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def sample_frame(h: int = 480, w: int = 640, seed: int = 0) -> np.ndarray:
    """A deterministic 640x480 RGB frame with structure (gradients and blocks), not flat noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w), (y * 255 // h), ((x + y) * 255 // (w + h))], -1).astype(np.uint8)
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 40), rng.integers(0, w - 40)
        img[y0:y0 + 40, x0:x0 + 40] = rng.integers(0, 256, 3)
    return img


def run_bench(molmo, image: Any = None, runs: int = 5, prompt: str = "Point to the red block.",
              decode_tokens: int = 32, reduced_crops: int = 2) -> dict[str, Any]:
    """Every stage, with tegrastats sampled throughout on a Jetson (nothing is recorded elsewhere)."""
    from molmo_edge.runtime.machine import TegrastatsRecorder

    with TegrastatsRecorder() as rec:
        res = _run_stages(molmo, image, runs, prompt, decode_tokens, reduced_crops)
    if rec.samples:
        res["tegrastats"] = rec.summary()
    return res


def _header(molmo, backend, rgb: np.ndarray) -> dict[str, Any]:
    """What ran where: backend, precision, graphs (and why, with the load estimate, when the session says), machine."""
    res: dict[str, Any] = {"backend": backend.name, "precision": getattr(backend, "precision", "fp32"),
                           "graphs": getattr(backend, "graphs", {}), "device": getattr(backend, "device", "cpu"),
                           "image": [int(rgb.shape[1]), int(rgb.shape[0])], "machine": machine_info()}
    if hasattr(molmo, "describe"):
        res.update(molmo.describe())
    return res


def _time_decoder(stages: dict[str, Any], backend, x: np.ndarray, n_prompt: int, decode_tokens: int, runs: int,
                  embed: Callable[[np.ndarray], np.ndarray], **step: Any) -> None:
    """Prefill of the prompt (`step`: extra prefill inputs such as Molmo2's token_types) and greedy decode steps."""
    def prefill():
        cache = backend.new_cache(n_prompt + decode_tokens + 1)
        backend.run_decoder(x, np.arange(n_prompt)[None], cache, np.array([n_prompt - 1]), **step)
        return cache

    pre = _time(prefill, runs)
    stages["prefill_ms"] = stats(pre)
    stages["prefill_tokens"] = n_prompt
    stages["prefill_tokens_per_s"] = round(n_prompt / (statistics.median(pre) / 1e3), 2)

    def decode_run() -> float:
        cache = prefill()
        tok = 0
        t = time.perf_counter()
        for i in range(decode_tokens):
            logits = backend.run_decoder(embed(np.array([tok])), np.array([[n_prompt + i]]), cache, np.zeros(1, np.int64))
            tok = int(logits[0, -1].argmax())
        return decode_tokens / (time.perf_counter() - t)

    decode_run()
    stages["decode_tokens_per_s"] = stats([decode_run() for _ in range(max(1, runs // 2))])
    stages["decode_tokens"] = decode_tokens


def _finish(res: dict[str, Any], stages: dict[str, Any], e2e: list[float]) -> dict[str, Any]:
    stages["end_to_end_ms"] = stats(e2e)
    stages["preprocess_share_of_end_to_end"] = round(stages["preprocess_ms"]["median"] / statistics.median(e2e), 4)
    res["stages"] = stages
    res["peak_rss_mib"] = round(peak_rss_bytes() / 2**20, 1)
    if res.get("estimated_peak_gib"):
        res["estimate_vs_peak_rss"] = round(res["estimated_peak_gib"] * 1024 / res["peak_rss_mib"], 3)
    return res


def _run_stages(molmo, image: Any, runs: int, prompt: str, decode_tokens: int, reduced_crops: int) -> dict[str, Any]:
    from molmo_edge.runtime.preprocess import load_image

    rgb = load_image(image) if image is not None else sample_frame()
    cfg = molmo.cfg
    if cfg.is_molmo2:
        return _run_stages_molmo2(molmo, rgb, runs, prompt, decode_tokens, reduced_crops)
    proc, backend = molmo.processor, molmo.backend
    res = _header(molmo, backend, rgb)
    stages: dict[str, Any] = {}
    crops = proc.image(rgb)
    stages["preprocess_ms"] = stats(_time(lambda: proc.image(rgb), runs))
    vis = _time(lambda: backend.vision(crops.images, crops.image_masks), runs)
    stages["vision_ms_per_frame"] = stats(vis)
    stages["vision_ms_per_crop"] = stats([v / crops.n_crops for v in vis])
    stages["crops"] = crops.n_crops
    if reduced_crops and reduced_crops < cfg.preprocess.max_crops:
        small = proc.image(rgb, max_crops=reduced_crops)
        stages[f"vision_ms_per_frame_max_crops_{reduced_crops}"] = stats(
            _time(lambda: backend.vision(small.images, small.image_masks), runs))
        stages[f"crops_at_max_crops_{reduced_crops}"] = small.n_crops
    inputs = proc.process(prompt, crops=crops)
    n_prompt = int(inputs["input_ids"].shape[0])
    feats = backend.vision(crops.images, crops.image_masks)
    x = molmo.embed(inputs["input_ids"].astype(np.int64), inputs["image_input_idx"], feats)
    _time_decoder(stages, backend, x, n_prompt, decode_tokens, runs, molmo.embed)

    def end_to_end():
        molmo._images.clear()
        molmo._prefix = None
        molmo.ask(prompt, rgb, max_new_tokens=decode_tokens, stop=())

    return _finish(res, stages, _time(end_to_end, max(1, runs // 2)))


CLIP_FRAMES = 16  # the real-scale benchmark's clip (issue 15): 16 frames at 2 fps


def _run_stages_molmo2(molmo, rgb: np.ndarray, runs: int, prompt: str, decode_tokens: int,
                       reduced_crops: int) -> dict[str, Any]:
    """The same stages for Molmo2 (its processor, pooled vision, prefix mask), plus a 16-frame clip."""
    from molmo_edge.runtime import molmo2_session as m2

    proc, backend = m2.processor(molmo), molmo.backend
    res = _header(molmo, backend, rgb)
    stages: dict[str, Any] = {}
    img = proc.image(rgb)
    stages["preprocess_ms"] = stats(_time(lambda: proc.image(rgb), runs))
    vis = _time(lambda: backend.vision_pooled(img.pixel_values, img.token_pooling), runs)
    stages["vision_ms_per_frame"] = stats(vis)
    stages["vision_ms_per_crop"] = stats([v / img.num_crops for v in vis])
    stages["crops"] = img.num_crops
    if reduced_crops and reduced_crops < molmo.cfg.preprocess.max_crops:
        small = proc.image(rgb, max_crops=reduced_crops)
        stages[f"vision_ms_per_frame_max_crops_{reduced_crops}"] = stats(
            _time(lambda: backend.vision_pooled(small.pixel_values, small.token_pooling), runs))
        stages[f"crops_at_max_crops_{reduced_crops}"] = small.num_crops
    clip = proc.video(np.repeat(rgb[None], CLIP_FRAMES, 0), fps=2.0)
    stages[f"vision_ms_clip_{CLIP_FRAMES}_frames"] = stats(
        _time(lambda: backend.vision_pooled(clip.pixel_values, clip.token_pooling), max(1, runs // 2)))
    arrays = proc.prepare(prompt, [img]).arrays
    ids = arrays["input_ids"].reshape(-1)
    n_prompt = len(ids)
    x = m2.embed(molmo, ids, backend.vision_pooled(arrays["pixel_values"], arrays["image_token_pooling"]))
    _time_decoder(stages, backend, x, n_prompt, decode_tokens, runs, lambda t: m2.embed(molmo, t),
                  token_types=arrays["mm_token_type_ids"])

    def end_to_end():
        molmo._prefix = None
        molmo.ask(prompt, rgb, max_new_tokens=decode_tokens, stop=())

    return _finish(res, stages, _time(end_to_end, max(1, runs // 2)))


def format_table(res: dict[str, Any]) -> str:
    s = res["stages"]
    rows = [("preprocess", f"{s['preprocess_ms']['median']:.1f} ms"),
            (f"vision ({s['crops']} crops)", f"{s['vision_ms_per_frame']['median']:.0f} ms/frame, "
                                             f"{s['vision_ms_per_crop']['median']:.0f} ms/crop"),
            ("prefill", f"{s['prefill_tokens']} tokens in {s['prefill_ms']['median']:.0f} ms "
                        f"({s['prefill_tokens_per_s']:.1f} tokens/s)"),
            ("decode", f"{s['decode_tokens_per_s']['median']:.2f} tokens/s "
                       f"(min {s['decode_tokens_per_s']['min']:.2f}, max {s['decode_tokens_per_s']['max']:.2f})"),
            ("end to end", f"{s['end_to_end_ms']['median']:.0f} ms ({s['decode_tokens']} new tokens)"),
            ("peak memory", f"{res['peak_rss_mib']:.0f} MiB")]
    for k, v in s.items():
        if k.startswith("vision_ms_clip_"):
            rows.insert(2, (f"vision ({k.split('_')[3]}-frame clip)", f"{v['median']:.0f} ms/clip"))
        if k.startswith("vision_ms_per_frame_max_crops_"):
            n = k.rsplit("_", 1)[-1]
            rows.insert(2, (f"vision (max_crops {n}: {s['crops_at_max_crops_' + n]} crops)", f"{v['median']:.0f} ms/frame"))
    m = res["machine"]
    head = f"{res['backend']} ({res['precision']}, {res['device']}) on {m['cpu']}, {m['cores']} cores"
    if res.get("graphs"):
        head += "\n  graphs: " + ", ".join(f"{k} {v}" for k, v in res["graphs"].items())
        head += f" ({res['reason']})" if res.get("reason") else ""
    if m.get("power_mode"):
        head += f", power mode {m['power_mode']}"
    width = max(len(r[0]) for r in rows)
    return "\n".join([head] + [f"  {k:<{width}}  {v}" for k, v in rows])
