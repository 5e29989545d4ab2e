"""`build` verifies what it built: the engines and onnxruntime run the same sample inputs, and an engine
whose outputs differ beyond a stated tolerance is refused (never registered), naming the first output
that differs.

Samples: vision, one deterministic 640x480 frame at min(2, max crops) crops; decoder, a 24-token prefill of
fixed token embeddings and 3 teacher-forced decode steps (the tokens onnxruntime picks are fed to both, so
one early flip cannot derail the rest). Compared, in this order: image_features; then every layer's K/V
over all 27 positions (read back from the engine's device cache), layer by layer, so the first failure
points at the earliest layer that went wrong; then the logits of each call.

Tolerance per output (`TOLERANCES`): max |engine - onnxruntime| / max |onnxruntime| and the cosine of the
two, flattened; any NaN/Inf fails. fp16: relative 2e-2, cosine 0.999; int8 (the calibrated vision graph):
relative 0.1, cosine 0.99 (the engine and onnxruntime round INT8 differently).

Memory: the onnxruntime reference (CPU provider, fp32) runs first and is freed before the engines are
loaded, so the peak is one of them, not both.
"""
from __future__ import annotations

import gc
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np

from molmo_edge.runtime.backends.trt_engines import EngineError
from molmo_edge.runtime.bundle import Bundle


@dataclass(frozen=True)
class Tolerance:
    max_rel: float          # max abs difference / max abs reference value
    min_cosine: float


TOLERANCES = {"fp16": Tolerance(2e-2, 0.999), "int8": Tolerance(0.1, 0.99)}
PROMPT_TOKENS = 24
DECODE_STEPS = 3
PARITY_CROPS = 2


class ParityError(EngineError):
    """An engine's outputs differ from onnxruntime's on the same inputs beyond the tolerance."""


def compare(name: str, got: np.ndarray, want: np.ndarray, tol: Tolerance) -> dict[str, Any]:
    g = np.asarray(got, np.float64).reshape(-1)
    w = np.asarray(want, np.float64).reshape(-1)
    res: dict[str, Any] = {"output": name, "shape": list(np.shape(want))}
    if g.shape != w.shape:
        return {**res, "ok": False, "why": f"shape {list(np.shape(got))} instead of {list(np.shape(want))}"}
    if not np.all(np.isfinite(g)):
        return {**res, "ok": False, "why": f"{int((~np.isfinite(g)).sum())} non-finite values (NaN/Inf)"}
    scale = float(np.max(np.abs(w))) if w.size else 0.0
    max_abs = float(np.max(np.abs(g - w))) if w.size else 0.0
    rel = max_abs / max(scale, 1e-12)
    norms = float(np.linalg.norm(g) * np.linalg.norm(w))
    cos = float(g @ w / norms) if norms > 0 else (1.0 if max_abs == 0 else 0.0)
    ok = rel <= tol.max_rel and cos >= tol.min_cosine
    res.update(max_abs=round(max_abs, 6), max_rel=round(rel, 6), cosine=round(cos, 6), ok=ok)
    if not ok:
        res["why"] = (f"max relative error {rel:.3g} (limit {tol.max_rel:g}), cosine {cos:.6f} "
                      f"(limit {tol.min_cosine:g})")
    return res


def first_failure(results: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in results if not r["ok"]), None)


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------
def sample_frame(h: int = 480, w: int = 640) -> np.ndarray:
    """A deterministic RGB frame with gradients and blocks (flat noise would not exercise the ViT)."""
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([x * 255 // w, y * 255 // h, (x + y) * 255 // (w + h)], -1).astype(np.uint8)
    rng = np.random.default_rng(0)
    for _ in range(12):
        y0, x0 = rng.integers(0, h - 40), rng.integers(0, w - 40)
        img[y0:y0 + 40, x0:x0 + 40] = rng.integers(0, 256, 3)
    return img


def vision_sample(bundle: Bundle, max_crops: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, image_masks); Molmo2: (pixel_values, pooling index)."""
    n = max(1, min(PARITY_CROPS, max_crops))
    if bundle.config.is_molmo2:
        from molmo_edge.runtime.molmo2_preprocess import ImageSettings, preprocess_image as molmo2_image
        im = molmo2_image(sample_frame(), ImageSettings.from_folder(bundle.folder), max_crops=n)
        return im.pixel_values, im.token_pooling.astype(np.int64)
    from molmo_edge.runtime.preprocess import preprocess_image
    crops = preprocess_image(sample_frame(), bundle.config, max_crops=n)
    return crops.images, crops.image_masks


def _vision_feeds(cfg: Any, a: np.ndarray, b: np.ndarray) -> dict[str, np.ndarray]:
    return {"pixel_values": a, "pooling": b} if cfg.is_molmo2 else {"images": a, "image_masks": b}


def prefill_token_types(cfg: Any, n: int) -> np.ndarray | None:
    """Molmo2: a block of 8 'image' tokens inside the sample prefill, so the prefix mask is compared too."""
    if not cfg.is_molmo2:
        return None
    types = np.zeros((1, n), np.int64)
    types[0, 4:12] = 1
    return types


def decoder_sample(bundle: Bundle) -> np.ndarray:
    """[PROMPT_TOKENS] token ids: fixed, spread over the vocabulary."""
    v = bundle.config.embedding_size
    return (np.arange(PROMPT_TOKENS, dtype=np.int64) * 7919 + 11) % v


def _embed(table: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.asarray(table[np.asarray(ids, np.int64)], np.float32)[None]


# ---------------------------------------------------------------------------------------------
# onnxruntime reference (host arrays, the graph's own I/O)
# ---------------------------------------------------------------------------------------------
def _session(path: str, providers: list[str] | None, vision: bool = False) -> Any:
    """The reference runs on onnxruntime's CPU provider by default: plain fp32 (no TF32 MatMuls as the CUDA
    provider may use), the path the project checks against AI2's golden outputs, and one copy of the weights
    (no second one in GPU memory during session start)."""
    from molmo_edge.runtime.backends.ort import open_session
    return open_session(path, providers, cast_weights_per_run=vision)


def reference_vision(bundle: Bundle, graph: str, images: np.ndarray, masks: np.ndarray,
                     providers: list[str] | None = None) -> np.ndarray:
    sess = _session(bundle.graph_path(graph), providers, vision=True)
    out = sess.run(["image_features"], _vision_feeds(bundle.config, images, masks))[0]
    del sess
    gc.collect()
    return out


def reference_decoder(bundle: Bundle, graph: str, ids: np.ndarray, providers: list[str] | None = None) -> dict[str, Any]:
    """Prefill `ids`, then DECODE_STEPS greedy steps; the tokens picked, the logits of every call, and every
    layer's K/V over all positions [positions, kv_heads, head_dim]."""
    cfg = bundle.config
    table = bundle.embeddings()
    sess = _session(bundle.graph_path(graph), providers)
    keys = [np.zeros((1, 0, cfg.n_kv_heads, cfg.head_dim), np.float32) for _ in range(cfg.n_layers)]
    values = [k.copy() for k in keys]
    out_names = ["logits"] + [f"new_{kind}.{i}" for i in range(cfg.n_layers) for kind in ("key", "value")]
    logits, tokens = [], []
    step_ids = ids
    for call in range(DECODE_STEPS + 1):
        start = keys[0].shape[1]
        feeds = {"inputs_embeds": _embed(table, step_ids),
                 "position_ids": np.arange(start, start + len(step_ids), dtype=np.int64)[None],
                 "logit_positions": np.array([len(step_ids) - 1], np.int64)}
        for i in range(cfg.n_layers):
            feeds[f"past_key.{i}"], feeds[f"past_value.{i}"] = keys[i], values[i]
        if cfg.is_molmo2:
            types = prefill_token_types(cfg, len(step_ids)) if call == 0 else None
            feeds["token_types"] = np.zeros((1, len(step_ids)), np.int64) if types is None else types
        res = dict(zip(out_names, sess.run(out_names, feeds)))
        for i in range(cfg.n_layers):
            keys[i] = np.concatenate([keys[i], res[f"new_key.{i}"]], axis=1)
            values[i] = np.concatenate([values[i], res[f"new_value.{i}"]], axis=1)
        logits.append(res["logits"])
        if call < DECODE_STEPS:
            tokens.append(int(res["logits"][0, -1].argmax()))
            step_ids = np.array([tokens[-1]], np.int64)
    del sess
    gc.collect()
    return {"tokens": tokens, "logits": logits, "keys": [k[0] for k in keys], "values": [v[0] for v in values]}


# ---------------------------------------------------------------------------------------------
# the engines on the same inputs
# ---------------------------------------------------------------------------------------------
def engine_decoder(backend: Any, bundle: Bundle, ids: np.ndarray, tokens: list[int]) -> dict[str, Any]:
    """The same calls through the TensorRT backend (device KV cache), K/V read back at the end."""
    table = bundle.embeddings()
    cache = backend.new_cache(len(ids) + len(tokens) + 1)
    logits = []
    steps = [ids] + [np.array([t], np.int64) for t in tokens]
    try:
        for n, step_ids in enumerate(steps):
            start = cache.length
            types = prefill_token_types(bundle.config, len(step_ids)) if n == 0 else None
            logits.append(backend.run_decoder(_embed(table, step_ids),
                                              np.arange(start, start + len(step_ids), dtype=np.int64)[None], cache,
                                              np.array([len(step_ids) - 1], np.int64),
                                              **({"token_types": types} if types is not None else {})))
        kv = [cache.read_back(i) for i in range(bundle.config.n_layers)]
    finally:
        cache.close()
    return {"logits": logits, "keys": [k for k, _ in kv], "values": [v for _, v in kv]}


def check_vision(features: np.ndarray, want: np.ndarray, tol: Tolerance) -> list[dict[str, Any]]:
    return [compare("image_features", features, want, tol)]


def check_decoder(got: dict[str, Any], want: dict[str, Any], tol: Tolerance) -> list[dict[str, Any]]:
    out = []
    for i, (gk, gv, wk, wv) in enumerate(zip(got["keys"], got["values"], want["keys"], want["values"])):
        out.append(compare(f"new_key.{i}", gk, wk, tol))
        out.append(compare(f"new_value.{i}", gv, wv, tol))
    for n, (g, w) in enumerate(zip(got["logits"], want["logits"])):
        out.append(compare("logits (prefill)" if n == 0 else f"logits (decode step {n})", g, w, tol))
    return out


def verify_engines(bundle: Bundle, graphs: dict[str, str], precisions: dict[str, str], max_crops: int,
                   open_backend: Callable[[], Any], progress: Callable[[str], None],
                   providers: list[str] | None = None) -> dict[str, Any]:
    """Run onnxruntime then the engines on the samples; returns the report ({role: {...}}). Raises ParityError
    naming the first output beyond its tolerance."""
    images, masks = vision_sample(bundle, max_crops)
    ids = decoder_sample(bundle)
    progress(f"parity: onnxruntime reference ({graphs['vision']}: {len(images)} crops; {graphs['decoder']}: "
             f"{len(ids)}-token prefill + {DECODE_STEPS} decode steps) ...")
    ref_v = reference_vision(bundle, graphs["vision"], images, masks, providers)
    ref_d = reference_decoder(bundle, graphs["decoder"], ids, providers)
    progress("parity: the engines on the same inputs ...")
    backend = open_backend()
    try:
        got_v = backend.vision_pooled(images, masks) if bundle.config.is_molmo2 else backend.vision(images, masks)
        got_d = engine_decoder(backend, bundle, ids, ref_d["tokens"])
    finally:
        backend.close()
    report: dict[str, Any] = {}
    for role, results in (("vision", check_vision(got_v, ref_v, TOLERANCES[precisions["vision"]])),
                          ("decoder", check_decoder(got_d, ref_d, TOLERANCES[precisions["decoder"]]))):
        tol = TOLERANCES[precisions[role]]
        bad = first_failure(results)
        worst = max(results, key=lambda r: r.get("max_rel", float("inf")))
        report[role] = {"graph": graphs[role], "tolerance": asdict(tol), "ok": bad is None,
                        "first_failure": bad, "worst": worst, "outputs": results}
        progress(f"parity: {role} {'ok' if bad is None else 'FAILED'} (worst {worst['output']}: max rel "
                 f"{worst.get('max_rel', '?')}, cosine {worst.get('cosine', '?')})")
    report["inputs"] = {"vision_crops": int(len(images)), "prompt_tokens": int(len(ids)), "decode_steps": DECODE_STEPS,
                        "reference_tokens": ref_d["tokens"]}
    return report


def refusal(report: dict[str, Any]) -> ParityError | None:
    """The error for the first role whose engine failed, or None."""
    for role in ("vision", "decoder"):
        r = report.get(role)
        if r and not r["ok"]:
            f = r["first_failure"]
            return ParityError(f"the {role} engine was NOT registered: its {f['output']} differs from onnxruntime's on "
                               f"the same inputs ({f['why']}); the report is in {report.get('report_path', 'engines/')}; "
                               "keep --backend onnxruntime, and send the report (jetson/first-run.sh collects it)")
    return None
