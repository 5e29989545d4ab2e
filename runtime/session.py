"""`Molmo`: the Python API of the runtime. Load a bundle, ask questions about images, get answers,
points and counts. numpy + onnxruntime only (no torch).

    from molmo_edge.runtime import Molmo
    m = Molmo.load("bundle/")
    a = m.ask("Point to the red cup", image="frame.jpg")
    print(a.text, a.points, a.count)

Several questions about one image cost one vision pass and one image prefill: the image's
features and the KV of its prefix (BOS + image tokens) are kept, and the next question only
prefills its own text on top of that prefix.
"""
from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from molmo_edge.runtime.bundle import Bundle, load_bundle
from molmo_edge.runtime.generate import GenerationOptions, generate
from molmo_edge.runtime.pointing import Point, parse_count, parse_points
from molmo_edge.runtime.preprocess import ImageCrops, load_image
from molmo_edge.runtime.processor import MolmoProcessor


@dataclass
class Answer:
    prompt: str
    text: str
    token_ids: list[int]
    points: list[Point] = field(default_factory=list)
    count: int | None = None
    stop_reason: str = ""
    prompt_tokens: int = 0
    image_size: tuple[int, int] | None = None        # (width, height) of the original image
    timings: dict[str, float] = field(default_factory=dict)   # milliseconds per stage

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "text": self.text, "token_ids": self.token_ids,
                "points": [p.to_dict() for p in self.points], "count": self.count, "stop_reason": self.stop_reason,
                "prompt_tokens": self.prompt_tokens,
                "image_size": list(self.image_size) if self.image_size else None,
                "timings": {k: round(v, 2) for k, v in self.timings.items()}}


@dataclass
class _ImageEntry:
    crops: ImageCrops
    features: np.ndarray
    size: tuple[int, int]


class Molmo:
    def __init__(self, bundle: Bundle, backend: Any, image_cache_size: int = 4):
        self.bundle = bundle
        self.cfg = bundle.config
        self.backend = backend
        # Molmo2 bundles use their own processor (runtime/molmo2_session.py makes it on first ask)
        self.processor = None if self.cfg.is_molmo2 else MolmoProcessor(bundle.folder, self.cfg)
        self.tokenizer = self.processor.tokenizer if self.processor else None
        self.embeddings = bundle.embeddings()
        self.cache = backend.new_cache()
        self._prefix: tuple[Any, np.ndarray] | None = None   # (image key, prefix ids) held in self.cache
        self._images: OrderedDict[Any, _ImageEntry] = OrderedDict()
        self._image_cache_size = image_cache_size
        self.stats = {"vision_runs": 0, "prefix_prefills": 0, "questions": 0}
        self.choice: Any = None      # runtime.bundle.GraphChoice when loaded through Molmo.load on onnxruntime
        self.estimate: Any = None    # runtime.memory.LoadEstimate likewise

    @classmethod
    def load(cls, path: str, backend: str = "onnxruntime", *, precision: str = "auto", fused: bool | None = None,
             check_memory: bool = True, **backend_options) -> "Molmo":
        """Open a bundle. precision: auto (default; on CPU a quantized decoder for large models when the bundle
        has one), fp32, int8 or int4 (exactly those graphs, or a one-line error saying how to make them).
        check_memory: on onnxruntime CPU, estimate what the chosen graphs need and raise InsufficientMemory
        (needed, available, how to fit) before loading anything, instead of being killed by the kernel."""
        from molmo_edge.runtime.backends import open_backend
        bundle = load_bundle(path)
        choice = estimate = None
        if backend == "onnxruntime":
            from molmo_edge.runtime.backends.ort import default_providers, provider_device
            from molmo_edge.runtime.bundle import choose_graphs
            from molmo_edge.runtime.memory import check_fits, estimate_load
            device = provider_device(backend_options.get("providers") or default_providers())
            choice = choose_graphs(bundle.manifest, precision, fused, device)
            graphs = {"vision": choice.vision, "decoder": choice.decoder}
            estimate = (check_fits(bundle.manifest, bundle.config, graphs, path, device) if check_memory
                        else estimate_load(bundle.manifest, bundle.config, graphs, device))
            b = open_backend(bundle, backend, choice=choice, **backend_options)
        else:
            if fused is not None:
                backend_options["fused"] = fused
            b = open_backend(bundle, backend, precision="fp32" if precision == "auto" else precision, **backend_options)
        m = cls(bundle, b)
        m.choice, m.estimate = choice, estimate
        return m

    def describe(self) -> dict[str, Any]:
        """What runs: backend, device, precision, graph per role and why (for --json and bench)."""
        b = self.backend
        out = {"backend": b.name, "device": getattr(b, "device", "cpu"), "precision": getattr(b, "precision", "fp32"),
               "graphs": dict(getattr(b, "graphs", {}))}
        if self.choice is not None:
            out["reason"] = self.choice.reason
        if self.estimate is not None:
            out["estimated_peak_gib"] = round(self.estimate.total / 2**30, 3)
            if self.estimate.notes:
                out["notes"] = list(self.estimate.notes)
        return out

    # --- building blocks -----------------------------------------------------------------------
    def embed(self, ids: np.ndarray, image_input_idx: np.ndarray | None = None,
              features: np.ndarray | None = None) -> np.ndarray:
        """Token embeddings [1, T, d]; with an image, its features are added (not substituted, as in AI2's
        code) at the positions `image_input_idx` gives (the processor's convention: -100 = dropped)."""
        x = np.asarray(self.embeddings[np.asarray(ids, np.int64)], dtype=np.float32)
        if features is not None:
            idx = image_input_idx.reshape(-1).astype(np.int64)
            keep = (idx >= 0) & (idx < len(x))
            np.add.at(x, idx[keep], features.reshape(-1, features.shape[-1])[keep])
        return x[None]

    def _prefill(self, x: np.ndarray, logit_positions: np.ndarray) -> np.ndarray:
        start = self.cache.length
        pos = np.arange(start, start + x.shape[1], dtype=np.int64)[None]
        return self.backend.run_decoder(x, pos, self.cache, logit_positions)

    def image_entry(self, image: Any, max_crops: int | None = None, bgr: bool = False) -> tuple[Any, _ImageEntry, float, float]:
        """(key, crops + features, preprocess ms, vision ms); vision runs once per distinct image."""
        t0 = time.perf_counter()
        rgb = load_image(image, bgr=bgr)
        key = (hashlib.blake2b(rgb.tobytes(), digest_size=16).hexdigest(), rgb.shape, max_crops)
        if key in self._images:
            self._images.move_to_end(key)
            return key, self._images[key], (time.perf_counter() - t0) * 1e3, 0.0
        crops = self.processor.image(rgb, max_crops=max_crops)
        t1 = time.perf_counter()
        feats = self.backend.vision(crops.images, crops.image_masks)
        self.stats["vision_runs"] += 1
        entry = _ImageEntry(crops, feats, (rgb.shape[1], rgb.shape[0]))
        self._images[key] = entry
        while len(self._images) > self._image_cache_size:
            self._images.popitem(last=False)
        return key, entry, (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3

    # --- public API ----------------------------------------------------------------------------
    def forward(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Logits [T, V] for every position (and image_features) of preprocessed inputs, in one pass."""
        if self.cfg.is_molmo2:
            from molmo_edge.runtime import molmo2_session
            return molmo2_session.forward(self, inputs)
        ids = inputs["input_ids"].astype(np.int64).reshape(-1)
        out: dict[str, np.ndarray] = {}
        feats = None
        if "images" in inputs:
            feats = self.backend.vision(inputs["images"], inputs["image_masks"])
            out["image_features"] = feats
        cache = self.backend.new_cache(len(ids))
        x = self.embed(ids, inputs.get("image_input_idx"), feats)
        out["logits"] = self.backend.run_decoder(x, np.arange(len(ids), dtype=np.int64)[None], cache,
                                            np.arange(len(ids), dtype=np.int64))[0]
        self._prefix = None
        return {k: out[k] for k in ("logits", "image_features") if k in out}

    def ask(self, prompt: str, image: Any = None, *, max_new_tokens: int = 200, temperature: float = 0.0,
            top_p: float = 1.0, seed: int | None = None, stop: Sequence[str] = (), max_crops: int | None = None,
            bgr: bool = False, history: Sequence[tuple[str, str]] = (),
            on_text: Callable[[str], None] | None = None, **molmo2_kw: Any) -> Answer:
        """Answer one question (about an image, or text only). Greedy unless temperature > 0.
        Molmo2 also takes `images=[...]` (several) or `video=` (file, .npz, frames) as keyword arguments."""
        if self.cfg.is_molmo2:
            from molmo_edge.runtime import molmo2_session
            media = molmo2_kw.pop("images", None) or ([] if image is None else [image])
            return molmo2_session.ask(self, prompt, media, molmo2_kw.pop("video", None), max_new_tokens=max_new_tokens,
                                      temperature=temperature, top_p=top_p, seed=seed, stop=stop, max_crops=max_crops,
                                      bgr=bgr, history=history, on_text=on_text)
        if molmo2_kw:
            raise TypeError(f"ask() got unexpected arguments {sorted(molmo2_kw)} (images/video are for Molmo2 bundles)")
        timings: dict[str, float] = {}
        entry = None
        key: Any = None
        if image is not None:
            key, entry, timings["preprocess"], timings["vision"] = self.image_entry(image, max_crops, bgr)
        t0 = time.perf_counter()
        inputs = self.processor.process(prompt, crops=entry.crops if entry else None, history=history)
        ids = inputs["input_ids"].astype(np.int64)
        timings["preprocess"] = timings.get("preprocess", 0.0) + (time.perf_counter() - t0) * 1e3
        n_prefix = 1 + (len(entry.crops.image_tokens) if entry else 0)
        prefix = ids[:n_prefix]
        t1 = time.perf_counter()
        if self._prefix is None or self._prefix[0] != key or not np.array_equal(self._prefix[1], prefix):
            self.cache.truncate(0)
            self.cache.reserve(len(ids) + max_new_tokens)  # the whole question at once: a growing cache grows once
            self._prefill(self.embed(prefix, inputs.get("image_input_idx"), entry.features if entry else None),
                          np.zeros(1, np.int64))
            self._prefix = (key, prefix)
            self.stats["prefix_prefills"] += 1
        else:
            self.cache.truncate(n_prefix)
        rest = ids[n_prefix:]
        self.cache.reserve(len(rest) + max_new_tokens)
        logits = self._prefill(self.embed(rest), np.array([len(rest) - 1], np.int64))[0, -1]
        timings["prefill"] = (time.perf_counter() - t1) * 1e3
        t2 = time.perf_counter()

        def step(tok: int) -> np.ndarray:
            return self._prefill(self.embed(np.array([tok])), np.zeros(1, np.int64))[0, -1]

        opts = GenerationOptions(max_new_tokens, temperature, top_p, seed, tuple(stop))
        tokens, reason = generate(logits, step, opts, self.tokenizer.eos_id, self.tokenizer.decode, on_text)
        timings["decode"] = (time.perf_counter() - t2) * 1e3
        text = self.tokenizer.decode(tokens)
        if reason == "stop":
            hit = next(s for s in stop if s and s in text)
            text = text[: text.index(hit)]
        text = text.strip()
        self.stats["questions"] += 1
        size = entry.size if entry else None
        points = parse_points(text, *(size or (None, None)))
        steps = len(tokens) - 1  # the first token comes from the prefill's logits
        timings["decode_tokens_per_s"] = steps / max(timings["decode"] / 1e3, 1e-9) if steps else 0.0
        return Answer(prompt, text, tokens, points, parse_count(text, points), reason, len(ids), size, timings)
