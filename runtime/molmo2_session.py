"""Molmo2 on a bundle (numpy + a backend; no torch): one forward over the processor's arrays, and
questions about images or a video with the KV prefix reused across questions.

The prompt puts every image/video block before the first user turn (molmo2-spec.md §6), so the
prefix = bos + all image/frame tokens (up to the last one). It is prefilled once, with `token_types`
so its image tokens form one bidirectional block; the question and the answer are causal on top of it.
The next question about the same pixels truncates the cache back to that prefix: no vision pass and
no image prefill (as for Molmo v1).
"""
from __future__ import annotations

import hashlib
import time
from typing import TYPE_CHECKING, Any, Callable, Sequence

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.generate import GenerationOptions, generate
from molmo_edge.runtime.prefix_mask import mm_token_types

if TYPE_CHECKING:
    from molmo_edge.runtime.session import Answer, Molmo

PIXELS_AND_POOLING = (("pixel_values", "image_token_pooling"), ("pixel_values_videos", "video_token_pooling"))


def pooling_chunks(pooling: np.ndarray, n_patch: int, limit: int) -> list[tuple[int, int, int, int]]:
    """Split a request's pooled tokens into runs (row0, row1, crop0, crop1) that read only crops
    crop0..crop1-1, cutting only where no earlier token reads a later crop (between video frames, between
    images), so that no run spans more than `limit` crops where a cut allows it. Each run is an
    independent vision call: a 64-frame video fits an engine profiled for max_crops + 1 crops, and the
    ViT's activations stay those of `limit` crops."""
    crop = np.where(pooling >= 0, pooling // n_patch, -1)
    valid = (crop >= 0).any(-1)
    lo = np.where(valid, np.where(crop >= 0, crop, np.iinfo(np.int64).max).min(-1), -1)
    hi = crop.max(-1)
    runs, row0 = [], 0
    c0 = int(lo[valid][0]) if valid.any() else 0
    cmax = c0
    for r in range(len(pooling)):
        if not valid[r]:
            continue
        if r > row0 and lo[r] > cmax and hi[r] - c0 + 1 > limit:
            runs.append((row0, r, c0, cmax + 1))
            row0, c0 = r, int(lo[r])
        cmax = max(cmax, int(hi[r]))
    runs.append((row0, len(pooling), c0, cmax + 1))
    return runs


def media_features(m: "Molmo", arrays: dict[str, np.ndarray]) -> np.ndarray | None:
    """Connector output [n_im_patch, d] for the images or the video of a request (None for text only),
    in vision calls of at most the backend's crop limit where the request can be cut (pooling_chunks)."""
    given = [(p, q) for p, q in PIXELS_AND_POOLING if p in arrays]
    if len(given) > 1:
        raise MolmoEdgeError("one Molmo2 request takes images or a video, not both")
    if not given:
        return None
    n_patch = m.cfg.vision.num_patches
    pixels = np.asarray(arrays[given[0][0]]).reshape(-1, n_patch, m.cfg.vision.patch_dim)
    pooling = np.asarray(arrays[given[0][1]]).astype(np.int64)
    limit = getattr(m.backend, "max_vision_crops", None) or m.cfg.preprocess.max_crops + 1
    out = []
    for r0, r1, c0, c1 in pooling_chunks(pooling, n_patch, limit):
        rows = pooling[r0:r1]
        out.append(m.backend.vision_pooled(pixels[c0:c1], np.where(rows >= 0, rows - c0 * n_patch, -1)))
    return np.concatenate(out)


def embed(m: "Molmo", ids: np.ndarray, features: np.ndarray | None = None) -> np.ndarray:
    """Token embeddings [1, T, d] with the image features added at the `<im_patch>` positions, in order."""
    x = np.asarray(m.embeddings[np.asarray(ids, np.int64)], dtype=np.float32)
    if features is not None:
        at = np.flatnonzero(ids == m.cfg.image_patch_id)
        if len(at) != len(features):
            raise MolmoEdgeError(f"{len(at)} <im_patch> tokens but {len(features)} image features: the prompt's ids and "
                                 "the pooling index come from different requests; re-run the processor")
        x[at] += features
    return x[None]


def _types(m: "Molmo", arrays: dict[str, np.ndarray], ids: np.ndarray) -> np.ndarray:
    types = arrays.get("mm_token_type_ids")
    return (mm_token_types(m.cfg, ids) if types is None else np.asarray(types)).reshape(1, -1).astype(np.int64)


def forward(m: "Molmo", arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Logits [T, V] for every position and `image_features` (the connector output) of HF-named arrays."""
    ids = np.asarray(arrays["input_ids"], np.int64).reshape(-1)
    feats = media_features(m, arrays)
    cache = m.backend.new_cache(len(ids))
    n = np.arange(len(ids), dtype=np.int64)
    logits = m.backend.run_decoder(embed(m, ids, feats), n[None], cache, n, token_types=_types(m, arrays, ids))[0]
    m._prefix = None
    return {"logits": logits, **({"image_features": feats} if feats is not None else {})}


def processor(m: "Molmo"):
    """The Molmo2 processor (prompt, images, video -> HF arrays) for this bundle, made once."""
    if getattr(m, "_molmo2_processor", None) is None:
        from molmo_edge.runtime.molmo2_processor import Molmo2Processor
        m._molmo2_processor = Molmo2Processor(m.bundle.folder)
    return m._molmo2_processor


def _media_key(arrays: dict[str, np.ndarray]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p, q in PIXELS_AND_POOLING:
        for k in (p, q):
            if k in arrays:
                h.update(k.encode())
                h.update(np.ascontiguousarray(arrays[k]).tobytes())
    return h.hexdigest()


def generate_tokens(m: "Molmo", arrays: dict[str, np.ndarray], opts: GenerationOptions,
                    decode_text: Callable[[list[int]], str] = lambda ids: "", on_text: Callable[[str], None] | None = None
                    ) -> tuple[list[int], str, dict[str, float]]:
    """Generate from HF-named arrays: (token ids, stop reason, timings in ms). The bos + image prefix is
    prefilled once per distinct prefix and pixels (token types: one bidirectional block), the rest causal.
    timings: vision (the ViT), prefill (the whole prompt, of which prefix_prefill is the bos + image part;
    0 when reused), decode."""
    timings: dict[str, float] = {"vision": 0.0}
    ids = np.asarray(arrays["input_ids"], np.int64).reshape(-1)
    types = _types(m, arrays, ids)
    mm = np.flatnonzero(types[0])
    n_prefix = int(mm[-1]) + 1 if len(mm) else 1  # bos (+ every image/frame block)
    prefix, key = ids[:n_prefix], _media_key(arrays)
    t1 = time.perf_counter()
    if m._prefix is None or m._prefix[0] != key or not np.array_equal(m._prefix[1], prefix):
        feats = media_features(m, arrays)
        if feats is not None:
            m.stats["vision_runs"] += 1
        timings["vision"] = (time.perf_counter() - t1) * 1e3
        t_prefix = time.perf_counter()
        m.cache.truncate(0)
        m.cache.reserve(len(ids) + opts.max_new_tokens)  # the whole question at once: a growing cache grows once
        m.backend.run_decoder(embed(m, prefix, feats), np.arange(n_prefix, dtype=np.int64)[None], m.cache,
                         np.zeros(1, np.int64), token_types=types[:, :n_prefix])
        m._prefix = (key, prefix)
        m.stats["prefix_prefills"] += 1
        timings["prefix_prefill"] = (time.perf_counter() - t_prefix) * 1e3
    else:
        m.cache.truncate(n_prefix)
        timings["prefix_prefill"] = 0.0  # reused: the cache keeps bos + the image/frame blocks
    t2 = time.perf_counter()
    rest = ids[n_prefix:]
    if not len(rest):
        raise MolmoEdgeError("the prompt ends with an image block; Molmo2 prompts end with the assistant turn")
    m.cache.reserve(len(rest) + opts.max_new_tokens)

    def run(tokens: np.ndarray, want: int) -> np.ndarray:
        start = m.cache.length
        pos = np.arange(start, start + len(tokens), dtype=np.int64)[None]
        return m.backend.run_decoder(embed(m, tokens), pos, m.cache, np.array([want], np.int64))[0, -1]

    logits = run(rest, len(rest) - 1)
    timings["prefill"] = timings["prefix_prefill"] + (time.perf_counter() - t2) * 1e3  # the whole prompt, as for v1
    t3 = time.perf_counter()
    tokens, reason = generate(logits, lambda t: run(np.array([t]), 0), opts, m.cfg.eos_token_id, decode_text, on_text)
    timings["decode"] = (time.perf_counter() - t3) * 1e3
    return tokens, reason, timings


def ask(m: "Molmo", prompt: str, images: Sequence[Any] = (), video: Any = None, *, max_new_tokens: int = 200,
        temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (),
        max_crops: int | None = None, bgr: bool = False, history: Sequence[tuple[str, str]] = (),
        on_text: Callable[[str], None] | None = None) -> "Answer":
    """Answer one question about `images` (several allowed), a `video`, or nothing. Greedy unless temperature > 0."""
    from molmo_edge.runtime.pointing import parse_count
    from molmo_edge.runtime.session import Answer

    proc = processor(m)
    t0 = time.perf_counter()
    req = proc.prepare(prompt, list(images), video, history=history, max_crops=max_crops, bgr=bgr)
    preprocess_ms = (time.perf_counter() - t0) * 1e3
    tok = proc.tokenizer
    opts = GenerationOptions(max_new_tokens, temperature, top_p, seed, tuple(stop))
    tokens, reason, timings = generate_tokens(m, req.arrays, opts, tok.decode, on_text)
    timings = {"preprocess": preprocess_ms, **timings}
    ids = req.arrays["input_ids"].reshape(-1)
    text = tok.decode(tokens)
    if reason == "stop":
        hit = next(s for s in stop if s and s in text)
        text = text[: text.index(hit)]
    text = text.strip()
    m.stats["questions"] += 1
    sizes, timeline = req.image_sizes, req.timeline
    points = req.parse_points(text)
    steps = len(tokens) - 1
    timings["decode_tokens_per_s"] = steps / max(timings["decode"] / 1e3, 1e-9) if steps else 0.0
    return Answer(prompt, text, tokens, points, parse_count(text, points), reason, len(ids),
                  sizes[0] if sizes else (timeline and (timeline.width, timeline.height)) or None, timings)
