"""The export self-check: the new graphs against the torch reference, like with like, at any model size.

Two different questions, answered apart:

- Is the graph right? The torch reference is given exactly the weights the graph holds (fp16-rounded,
  or quantized and dequantized), so any difference is the graph's fault and the tolerance is tight
  (GRAPH_TOLERANCE; looser only where the graph's kernel itself quantizes activations). The vision
  graph is compared whole; every decoder layer is compared alone: the same input through torch block
  i and a one-layer graph from the same writer and builder, then the head on the last layer's input.
  Memory stays near one layer (torch block + onnxruntime session), whatever the depth.
- What does the storage precision cost? The torch reference with the source (checkpoint) weights
  against the one with the held weights, through every layer: largest logit error, logit cosine and
  argmax agreement, recorded in the manifest. Export fails on it only below PRECISION_BOUNDS.

When the whole bundle fits in memory it is also run end to end through the runtime (Molmo.forward),
which covers the wiring between layers (KV I/O, caches) that one-layer graphs cannot.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.files import Progress
from molmo_edge.runtime.hf_names import lm_head_name
from molmo_edge.runtime.backends.ort_device import ORT_TYPES
from molmo_edge.runtime.kv_cache import APPEND, SHARED, first_pass_feeds
from molmo_edge.runtime.machine import mem_available

from molmo_edge.export.graph import GraphBuilder
from molmo_edge.export.onnx_fused import build_decoder_fused

# Largest difference, relative to max(1, largest reference value), between a graph and the torch
# reference holding the same weights. fp32 compute: rounding-order noise only (~1e-5 measured).
# MatMulNBits at accuracy level 4 quantizes its activations to int8 per block inside the kernel.
GRAPH_TOLERANCE = {"float": 2e-3, "int8-activations": 8e-2}
# LM head rows per slice: torch computes the logits a slice at a time, and the last one-layer graph checks
# its head on the first slice (its rows are built by the same code as all the others)
HEAD_ROWS = 16384
# Lowest logit cosine (held weights vs source weights, whole decoder) before export refuses: the
# storage precision itself would have broken the model. Random-weight models are the worst case.
PRECISION_BOUNDS = {"fp32": 0.99999, "fp16": 0.999, "int8": 0.99, "int4": 0.95}


class HeldWeights(Mapping):
    """The checkpoint's tensors as a graph holds them: fp16-rounded and/or quantized-dequantized (float32 torch)."""

    def __init__(self, source: Mapping, wdtype: np.dtype, cfg, quantizer=None):
        self.source, self.wdtype, self.quantizer = source, np.dtype(wdtype), quantizer
        self.head = lm_head_name(cfg)

    def __getitem__(self, name: str):
        return self.rows(name, 0, None)

    def rows(self, name: str, start: int, stop: int | None):
        """Rows start:stop of a tensor as held (the LM head in slices: quantization blocks run along a row)."""
        import torch
        t = self.source[name][start:stop].float()
        q = self.quantizer
        graph_name = "lm_head.weight" if name == self.head else name  # the name the graph builder asks about
        if q is not None and t.dim() == 2 and q.wants(graph_name):
            w = t.numpy().T  # [in, out], as the graph stores it
            b, s = q.quantize(w, graph_name)
            return torch.from_numpy(np.ascontiguousarray(q.dequantize(b, s, w.shape[0], graph_name).T))
        if self.wdtype == np.float16:
            return t.half().float()
        return t

    def __iter__(self):
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def _part(cfg, tensors: Mapping, prefix: str, make: Callable):
    """A piece of the torch reference (vision, block i, head) with only its own weights loaded."""
    import torch

    from molmo_edge.export.model import hf_source_names
    with torch.device("meta"):
        mod = make()
    state = {}
    for ours, theirs in hf_source_names(cfg).items():
        if not ours.startswith(prefix):
            continue
        if isinstance(theirs, list):  # stacked experts, filled one at a time (no list of copies beside the stack)
            first = tensors[theirs[0]]
            stacked = torch.empty((len(theirs), *first.shape), dtype=first.dtype)
            stacked[0] = first
            del first
            for j, n in enumerate(theirs[1:], 1):
                stacked[j] = tensors[n]
            state[ours[len(prefix):]] = stacked
        else:
            state[ours[len(prefix):]] = tensors[theirs]
    mod.load_state_dict(state, strict=True, assign=True)
    return mod.eval().requires_grad_(False)


def _rel(a: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(a - ref).max() / max(1.0, float(np.abs(ref).max())))


def _session(path: str, vision: bool = False):
    from molmo_edge.runtime.backends.ort import open_session
    return open_session(path, cast_weights_per_run=vision)  # as the runtime opens it


def _one_layer_graph(folder: str, build, cfg, get, i: int, wdtype, opset: int, quantizer, head: bool) -> str:
    """Block i alone (weights renamed to block 0), outputting its hidden state, plus the head when asked: the
    head on its first HEAD_ROWS vocabulary rows (the same graph code for any row count; onnxruntime would hold
    the whole head as float32 beside the layer), compared with those columns of torch's logits."""
    rows = min(HEAD_ROWS, cfg.embedding_size)
    one = cfg.with_(n_layers=1, embedding_size=rows)
    src = "model.transformer.blocks.0."
    dst = f"model.transformer.blocks.{i}."
    head_name = lm_head_name(cfg)

    def get_i(name: str) -> np.ndarray:
        if name == head_name:
            return get(name, rows)
        return get(dst + name[len(src):] if name.startswith(src) else name)

    path = os.path.join(folder, f"layer{i}.onnx")
    g = GraphBuilder(f"check_layer_{i}", path + ".data", wdtype, opset, quantizer=quantizer)
    build(g, one, get_i, hidden=True, head=head)
    g.finish(path)
    return path


def _inputs(bundle_dir: str, cfg) -> dict[str, np.ndarray]:
    from molmo_edge.runtime.processor import MolmoProcessor
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    return MolmoProcessor(bundle_dir, cfg).process("Describe this image.", image, max_crops=2)


def _embed(table, ids: np.ndarray, idx: np.ndarray, feats: np.ndarray) -> np.ndarray:
    x = np.asarray(table[ids], np.float32)
    flat_idx = idx.reshape(-1).astype(np.int64)
    keep = flat_idx >= 0
    np.add.at(x, flat_idx[keep], feats.reshape(-1, feats.shape[-1])[keep])
    return x[None]


def _source_embeddings(source: Mapping, cfg, ids: np.ndarray) -> np.ndarray:
    import torch
    base, extra = source["model.transformer.wte.embedding"], source["model.transformer.wte.new_embedding"]
    # rows first, then float32: a float32 copy of a whole table is 2.2 GB for Molmo-7B-D's fp16/bf16 checkpoints
    b = base[torch.from_numpy(np.clip(ids, 0, len(base) - 1))].float().numpy()
    e = extra[torch.from_numpy(np.clip(ids - len(base), 0, len(extra) - 1))].float().numpy()
    return np.where((ids >= len(base))[:, None], e, b)


def self_check(bundle_dir: str, cfg, source: Mapping, flavours: dict[str, tuple[Callable, Any]], wdtype,
               opset: int, progress: Progress, whole: bool | None = None) -> dict[str, Any]:
    """Check the bundle's vision graph and every decoder flavour in `flavours` (key -> (builder, quantizer));
    raise MolmoEdgeError on a graph error or a precision cost past its bound; return the manifest's "parity"."""
    import torch

    from molmo_edge.export.model import Block, RMSNorm, VisionEncoder, rope_tables

    t0 = time.perf_counter()
    dtype = "fp16" if np.dtype(wdtype) == np.float16 else "fp32"
    inputs = _inputs(bundle_dir, cfg)
    ids = inputs["input_ids"].astype(np.int64)
    held_plain = HeldWeights(source, wdtype, cfg)
    report: dict[str, Any] = {"method": "layer by layer against torch holding the graph's weights",
                              "positions": int(len(ids)), "decoder_layers": cfg.n_layers, "flavours": {}}
    failures: list[str] = []

    # vision: the whole graph against torch with the held weights; the source-weight features for the cost
    with torch.no_grad():
        vis = _part(cfg, held_plain, "vision.", lambda: VisionEncoder(cfg))
        feats_held = vis(torch.from_numpy(inputs["images"]), torch.from_numpy(inputs["image_masks"])).numpy()
        del vis
        vis = _part(cfg, {k: source[k].float() for k in _vision_names(cfg)}, "vision.", lambda: VisionEncoder(cfg))
        feats_src = vis(torch.from_numpy(inputs["images"]), torch.from_numpy(inputs["image_masks"])).numpy()
        del vis
    sess = _session(os.path.join(bundle_dir, "vision.onnx"), vision=True)
    feats_graph = sess.run(["image_features"], {"images": inputs["images"], "image_masks": inputs["image_masks"]})[0]
    del sess
    verr = _rel(feats_graph, feats_held)
    report["vision"] = {"max_rel_diff": verr, "tolerance": GRAPH_TOLERANCE["float"],
                        "precision_cost_max_rel_diff": _rel(feats_held, feats_src)}
    progress(f"[export] check vision: {verr:.2e} against torch with the same weights (tolerance {GRAPH_TOLERANCE['float']:.0e})")
    if not np.isfinite(verr) or verr > GRAPH_TOLERANCE["float"]:
        failures.append(f"vision graph differs from torch by {verr:.3e} (relative; tolerance {GRAPH_TOLERANCE['float']:.0e})")

    table = np.load(os.path.join(bundle_dir, "embeddings.npy"), mmap_mode="r")
    x0_held = _embed(table, ids, inputs["image_input_idx"], feats_held)
    x0_src = _embed(_source_embeddings(source, cfg, ids), np.arange(len(ids)), inputs["image_input_idx"], feats_src)
    positions = torch.arange(len(ids))[None]
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    cos, sin = cos[:, None], sin[:, None]

    def head(tensors, x):
        """Logits through the final norm and the LM head, HEAD_ROWS vocabulary rows at a time: neither a float32
        copy of the whole head (2.2 GB for Molmo-7B-D) nor the whole logits (0.35 GB a chain there) is held."""
        h = _part(cfg, tensors, "ln_f.", lambda: RMSNorm(cfg.d_model, cfg.norm_eps))(x)[0]
        name = lm_head_name(cfg)
        for i in range(0, cfg.embedding_size, HEAD_ROWS):
            yield (h @ tensors.rows(name, i, i + HEAD_ROWS).T).numpy()

    # the source-weight chain once: its logits are what every held chain's precision cost is measured against
    with torch.no_grad():
        x = torch.from_numpy(x0_src)
        src_tensors = _FloatSource(source)
        for i in range(cfg.n_layers):
            x = _part(cfg, src_tensors, f"blocks.{i}.", lambda: Block(cfg))(x, cos, sin)[0]
        x_src = x

    whole_keys = _whole_run_keys(bundle_dir, flavours, whole)  # decided once: they need the held logits kept
    groups: dict[Any, list[str]] = {}
    for key, (_, quantizer) in flavours.items():
        groups.setdefault(quantizer, []).append(key)
    tmp = tempfile.mkdtemp(prefix=".check-", dir=bundle_dir)
    try:
        for quantizer, keys in groups.items():
            held = HeldWeights(source, wdtype, cfg, quantizer)
            get = _numpy_getter(source)
            worst = {k: (0.0, -1) for k in keys}
            per_layer = {k: [] for k in keys}
            head_graph = {}  # key -> the last one-layer graph's logits (each flavour's own head)
            with torch.no_grad():
                x = torch.from_numpy(x0_held)
                for i in range(cfg.n_layers):
                    y = _part(cfg, held, f"blocks.{i}.", lambda: Block(cfg))(x, cos, sin)[0]
                    last = i == cfg.n_layers - 1
                    for key in keys:
                        build, q = flavours[key]
                        path = _one_layer_graph(tmp, build, cfg, get, i, wdtype, opset, q, head=last)
                        layout = SHARED if build is build_decoder_fused else APPEND
                        sess = _session(path)
                        kv = next(ORT_TYPES[v.type] for v in sess.get_inputs() if v.name == "past_key.0")
                        outs = sess.run(["hidden"] + (["logits"] if last else []),
                                        first_pass_feeds(x.numpy(), layout, 1, cfg.n_kv_heads, cfg.head_dim, kv))
                        del sess
                        for f in os.listdir(tmp):
                            os.remove(os.path.join(tmp, f))
                        err = _rel(outs[0], y.numpy())
                        per_layer[key].append(err)
                        if not np.isfinite(err) or err >= worst[key][0]:
                            worst[key] = (err if np.isfinite(err) else float("inf"), i)
                        if last:
                            head_graph[key] = outs[1][0]
                    x = y
                # the held chain's logits against the source chain's and, for a quantized head, the float head's
                # on the same hidden states, one vocabulary chunk at a time
                cost, head_cost = _Agreement(), None
                float_head = quantizer is not None and getattr(quantizer, "quantize_head", False)
                chains = [head(held, x), head(src_tensors, x_src)]
                if float_head:
                    head_cost = _Agreement()
                    chains.append(head(HeldWeights(source, wdtype, cfg), x))
                held_rows = []  # the held logits' chunks: all of them only for the end-to-end run of a small bundle
                keep = any(key in whole_keys for key in keys)
                for chunks in zip(*chains):
                    if keep or not held_rows:
                        held_rows.append(chunks[0])
                    cost.add(chunks[0], chunks[1])
                    if head_cost is not None:
                        head_cost.add(chunks[0], chunks[2])
            cost = cost.result()
            head_cost = head_cost.result() if head_cost is not None else None
            precision = f"int{quantizer.bits}" if quantizer is not None else dtype
            for key in keys:
                compute = "int8-activations" if quantizer is not None and quantizer.accuracy_level == 4 else "float"
                tol = GRAPH_TOLERANCE[compute]
                herr = _rel(head_graph[key], held_rows[0][:, :head_graph[key].shape[-1]])  # the graph's HEAD_ROWS rows
                w_err, w_layer = worst[key]
                entry = {"worst_layer": w_layer, "worst_layer_max_rel_diff": w_err, "per_layer_max_rel_diff": per_layer[key],
                         "head_max_rel_diff": herr, "tolerance": tol, "compute": compute,
                         "precision": precision, "precision_cost": dict(cost, bound_logit_cosine=PRECISION_BOUNDS[precision])}
                if head_cost is not None:
                    entry["quantized_head_cost"] = head_cost
                    progress(f"[export] quantized LM head against the float head (same hidden states): largest logit "
                             f"error {head_cost['max_abs_logit_diff']:.3e}, argmax agreement {head_cost['argmax_agreement']:.1%}")
                progress(f"[export] check {key}: worst layer {w_layer} of {cfg.n_layers} at {w_err:.2e}, head {herr:.2e} "
                         f"(tolerance {tol:.0e}, same weights as the graph)")
                progress(f"[export] {precision} storage costs: largest logit error {cost['max_abs_logit_diff']:.3e}, cosine "
                         f"{cost['logit_cosine']:.5f}, argmax agreement {cost['argmax_agreement']:.1%} against the "
                         f"checkpoint's weights (bound: cosine >= {PRECISION_BOUNDS[precision]})")
                if not np.isfinite(w_err) or w_err > tol:
                    failures.append(f"{key} layer {w_layer} differs from torch by {w_err:.3e} (relative; tolerance {tol:.0e})")
                if not np.isfinite(herr) or herr > tol:
                    failures.append(f"{key} head differs from torch by {herr:.3e} (relative; tolerance {tol:.0e})")
                if not cost["logit_cosine"] >= PRECISION_BOUNDS[precision]:
                    failures.append(f"{precision} storage changes the logits too much (cosine {cost['logit_cosine']:.4f} < "
                                    f"{PRECISION_BOUNDS[precision]})")
                report["flavours"][key] = entry
                if keep:
                    report["flavours"][key]["_logits"] = np.concatenate(held_rows, -1)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if not failures:
        _whole_bundle(bundle_dir, cfg, inputs, report, failures, progress, whole_keys)
    for entry in report["flavours"].values():
        entry.pop("_logits", None)
    if failures:
        raise MolmoEdgeError("export self-check failed: " + "; ".join(failures) + "; nothing was written. "
                             "Please report this with the checkpoint's config.json")
    first = next(iter(report["flavours"].values()))
    report.update({"max_abs_logit_diff": first["precision_cost"]["max_abs_logit_diff"],
                   "argmax_agreement": first["precision_cost"]["argmax_agreement"],
                   "decoder_layers_checked": cfg.n_layers, "seconds": round(time.perf_counter() - t0, 1)})
    return report


def _whole_run_keys(bundle_dir: str, keys, whole: bool | None) -> set[str]:
    """The flavours the end-to-end run checks: all or none when asked, else those that fit in memory easily."""
    if whole is not None:
        return set(keys) if whole else set()
    from molmo_edge.runtime.bundle import load_bundle
    graphs = load_bundle(bundle_dir).manifest["graphs"]
    free = mem_available()
    return {k for k in keys if 3 * (graphs[k]["data_bytes"] + graphs["vision"]["data_bytes"]) < 0.4 * free}


def _whole_bundle(bundle_dir: str, cfg, inputs, report: dict, failures: list[str], progress: Progress,
                  whole_keys: set[str]) -> None:
    """Run the real bundle end to end when each flavour fits in memory easily (covers cross-layer wiring)."""
    from molmo_edge.runtime.backends.ort import OrtBackend
    from molmo_edge.runtime.bundle import GraphChoice, load_bundle
    from molmo_edge.runtime.session import Molmo
    bundle = load_bundle(bundle_dir)
    for key, entry in report["flavours"].items():
        if key not in whole_keys:
            entry["whole_bundle"] = "skipped: larger than the memory this check allows itself"
            continue
        m = Molmo(bundle, OrtBackend(bundle, providers=["CPUExecutionProvider"],
                                     choice=GraphChoice("vision", key, key, "export self-check")))
        got = m.forward(inputs)["logits"]
        del m
        err = _rel(got, entry["_logits"])
        entry["whole_bundle_max_rel_diff"] = err
        progress(f"[export] check {key} end to end through the runtime: {err:.2e}")
        if not np.isfinite(err) or err > entry["tolerance"] * 5:  # the graph's own vision features feed it
            failures.append(f"{key} run end to end differs from torch by {err:.3e} (relative)")


class _Agreement:
    """Largest logit error, cosine and argmax agreement of two logit arrays that arrive in vocabulary chunks
    (same order for both sides)."""

    def __init__(self) -> None:
        self.max_abs, self.ab, self.aa, self.bb, self.offset = 0.0, 0.0, 0.0, 0.0, 0
        self.best: list[tuple[np.ndarray, np.ndarray]] = []  # per side: (best value, its index) per position

    def add(self, got: np.ndarray, want: np.ndarray) -> None:
        a, b = got.astype(np.float64), want.astype(np.float64)
        self.max_abs = max(self.max_abs, float(np.abs(a - b).max()))
        self.ab, self.aa, self.bb = self.ab + float((a * b).sum()), self.aa + float((a * a).sum()), self.bb + float((b * b).sum())
        chunk = [(m.max(-1), m.argmax(-1) + self.offset) for m in (a, b)]
        if not self.best:
            self.best = chunk
        else:  # strictly greater: ties keep the earlier index, as argmax over the whole row does
            self.best = [(np.where(v > bv, v, bv), np.where(v > bv, i, bi)) for (bv, bi), (v, i) in zip(self.best, chunk)]
        self.offset += a.shape[-1]

    def result(self) -> dict[str, float]:
        return {"max_abs_logit_diff": self.max_abs, "logit_cosine": self.ab / float(np.sqrt(self.aa * self.bb)),
                "argmax_agreement": float((self.best[0][1] == self.best[1][1]).mean())}


def _vision_names(cfg) -> list[str]:
    from molmo_edge.export.model import hf_source_names
    out = []
    for ours, theirs in hf_source_names(cfg).items():
        if ours.startswith("vision."):
            out += theirs if isinstance(theirs, list) else [theirs]
    return out


class _FloatSource(Mapping):
    """Checkpoint tensors as float32 torch tensors (read lazily)."""

    def __init__(self, source: Mapping):
        self.source = source

    def __getitem__(self, name: str):
        return self.source[name].float()

    def rows(self, name: str, start: int, stop: int | None):
        return self.source[name][start:stop].float()

    def __iter__(self):
        return iter(self.source)

    def __len__(self) -> int:
        return len(self.source)


def _numpy_getter(source: Mapping) -> Callable[..., np.ndarray]:
    def get(name: str, rows: int | None = None) -> np.ndarray:
        t = source[name][:rows]
        return t.float().numpy() if hasattr(t, "float") else np.asarray(t, np.float32)
    return get
