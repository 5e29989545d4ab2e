"""Activation statistics of an ONNX graph run on real inputs, and per-tensor INT8 scales from them.

Every floating-point activation (graph inputs and node outputs that are not computed from weights
alone) is observed: its exact absolute maximum, and a 2048-bin histogram of |x| whose range grows
by doubling (bins merge exactly in pairs), so one pass over the frames suffices whatever order they
come in. Very large tensors are histogrammed on a deterministic prime-strided subsample (every
channel still visited); amax is always exact.

Scale methods (scale = amax / 127, symmetric):
- minmax:     amax = max |x|
- percentile: amax = the given percentile of |x| (default 99.99)
- entropy:    amax = the threshold whose 128-level quantized distribution has the least KL divergence
              from the 2048-bin reference (TensorRT's EntropyCalibration2 recipe, as published:
              2048 bins of |x|, 128 levels, outliers folded into the last kept bin). The search runs
              every 8 bins then bin by bin around the best, with the KL computed per quantization
              group (kl_divergences); _kl_at is the per-bin reference the tests compare it with.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import onnx
from onnx import TensorProto

from molmo_edge.calibration import CalibrationError

BINS = 2048
LEVELS = 128
METHODS = ("entropy", "percentile", "minmax")
HIST_SAMPLE = 1 << 20     # elements per tensor per batch that go into the histogram
FLOAT_TYPES = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def _next_prime(n: int) -> int:
    n = max(2, n)
    while True:
        if n < 4 or all(n % d for d in range(2, int(n ** 0.5) + 1)):
            return n
        n += 1


@dataclass
class TensorStats:
    """Running |x| statistics of one tensor."""
    amax: float = 0.0
    count: int = 0
    hist: np.ndarray | None = None
    width: float = 0.0          # histogram bin width; range is [0, BINS * width)
    nonfinite: int = 0

    def update(self, x: np.ndarray) -> None:
        flat = np.asarray(x).reshape(-1)
        if flat.size == 0:
            return
        if flat.dtype != np.float32:
            flat = flat.astype(np.float32)
        hi = float(max(flat.max(), -flat.min()))
        if not np.isfinite(hi):
            finite = np.isfinite(flat)
            self.nonfinite += int((~finite).sum())
            flat = flat[finite]
            if flat.size == 0:
                return
            hi = float(max(flat.max(), -flat.min()))
        self.amax = max(self.amax, hi)
        self.count += int(flat.size)
        if flat.size > HIST_SAMPLE:
            flat = flat[:: _next_prime(-(-flat.size // HIST_SAMPLE))]
        a = np.abs(flat)
        if self.hist is None:
            self.hist = np.zeros(BINS, np.int64)
            self.width = (hi if hi > 0 else 1e-30) / BINS * (1 + 1e-6)
        while hi >= BINS * self.width:  # grow the range: merge bins pairwise, double the width
            self.hist = np.concatenate([self.hist.reshape(-1, 2).sum(axis=1), np.zeros(BINS // 2, np.int64)])
            self.width *= 2
        idx = np.minimum((a / self.width).astype(np.int64), BINS - 1)
        self.hist += np.bincount(idx, minlength=BINS)


def _kl_at(hist: np.ndarray, tail: np.ndarray, i: int, levels: int) -> float:
    """KL(P || Q) for clipping at bin count i, bin by bin with MXNet's 1e-4 smoothing (the published
    variant of TensorRT's recipe). The reference for kl_divergences, which is what runs."""
    sliced = hist[:i]
    p = sliced.copy()
    p[i - 1] += tail[i]
    nz = p != 0
    per = i // levels
    sums = np.add.reduceat(sliced, np.arange(levels) * per)      # last group takes the remainder
    counts = np.add.reduceat(nz.astype(np.float64), np.arange(levels) * per)
    group = np.minimum(np.arange(i) // per, levels - 1)
    q = np.where(nz, (sums / np.maximum(counts, 1.0))[group], 0.0)
    eps = 1e-4
    for d in (p, q):  # smoothing: empty bins get eps, taken evenly from the others
        zeros = d == 0
        n_zero = int(zeros.sum())
        if n_zero == d.size:
            return np.inf
        d += np.where(zeros, eps, -eps * n_zero / (d.size - n_zero))
    p /= p.sum()
    q /= q.sum()
    return float(np.sum(p * np.log(p / q)))


def kl_divergences(hist: np.ndarray, cands: np.ndarray, levels: int = LEVELS) -> np.ndarray:
    """KL(P || Q) of _kl_at for many candidates at once, computed per quantization group.

    Within a group Q is constant over the non-empty bins, so with T = hist.sum() and C_i =
    hist[:i].sum(): KL = (sum_j P_j log P_j - T log T - sum_g P_g log(S_g / N_g) + T log C_i) / T, with
    S_g, N_g the group's raw sum and non-empty bins, P_g its reference mass. The 1e-4 smoothing of
    empty bins is left out (it moves KL by ~1e-7); a candidate that leaves reference mass on an
    empty quantized group gets KL = inf (smoothing makes it huge)."""
    h = np.asarray(hist, np.float64)
    c = np.asarray(cands, np.int64)
    total = h.sum()
    cum = np.concatenate([[0.0], np.cumsum(h)])
    with np.errstate(divide="ignore", invalid="ignore"):
        hlogh = np.where(h > 0, h * np.log(np.where(h > 0, h, 1.0)), 0.0)
    s_hlogh = np.concatenate([[0.0], np.cumsum(hlogh)])
    nzc = np.concatenate([[0], np.cumsum(h > 0)])
    tail = total - cum[c]
    last = h[c - 1] + tail
    plogp = s_hlogh[c - 1] + np.where(last > 0, last * np.log(np.where(last > 0, last, 1.0)), 0.0)
    per = (c // levels)[:, None]
    g = np.arange(levels)[None, :]
    start = g * per
    stop = np.where(g == levels - 1, c[:, None], start + per)
    sums = cum[stop] - cum[start]
    counts = (nzc[stop] - nzc[start]).astype(np.float64)
    counts[:, -1] += (h[c - 1] == 0) & (tail > 0)
    mass = sums.copy()
    mass[:, -1] += tail
    bad = ((mass > 0) & (sums <= 0)).any(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        term = np.where(mass > 0, mass * np.log(np.where(mass > 0, sums / np.maximum(counts, 1.0), 1.0)), 0.0).sum(axis=1)
        kl = (plogp - total * np.log(total) - term + total * np.log(np.maximum(cum[c], 1e-300))) / total
    return np.where(bad, np.inf, kl)


def entropy_amax(hist: np.ndarray, width: float, levels: int = LEVELS, coarse: int = 8) -> float:
    """KL-divergence threshold search over a |x| histogram (TensorRT's EntropyCalibration2 recipe).

    For every candidate i in [levels, bins]: P = hist[:i] with the outliers folded into bin i-1; Q =
    hist[:i] merged into `levels` groups and spread back uniformly over each group's non-empty bins;
    pick the i with the least KL(P || Q); amax = (i + 0.5) * width. Candidates are searched every
    `coarse` bins, then bin by bin around the best (coarse=1: exhaustive).
    """
    hist = np.asarray(hist, np.float64)
    n = len(hist)
    if hist.sum() == 0:
        return 0.0
    last = int(np.nonzero(hist)[0][-1]) + 1
    if last <= levels:  # everything fits in `levels` bins: no clipping helps
        return last * width
    step = max(1, int(coarse))
    cands = np.arange(levels, n + 1, step)
    i0 = int(cands[int(np.argmin(kl_divergences(hist, cands, levels)))])
    fine = np.arange(max(levels, i0 - step + 1), min(n, i0 + step - 1) + 1)
    best = int(fine[int(np.argmin(kl_divergences(hist, fine, levels)))])
    return min(best + 0.5, n) * width


def percentile_amax(hist: np.ndarray, width: float, percentile: float) -> float:
    """The upper edge of the bin where the cumulative |x| mass reaches `percentile`."""
    total = hist.sum()
    if total == 0:
        return 0.0
    cdf = np.cumsum(hist) / total
    i = int(np.searchsorted(cdf, percentile / 100.0, side="left"))
    return (min(i, len(hist) - 1) + 1) * width


def amax_of(stats: TensorStats, method: str, percentile: float = 99.99) -> float:
    if method == "minmax" or stats.hist is None:
        return stats.amax
    if method == "percentile":
        return min(stats.amax, percentile_amax(stats.hist, stats.width, percentile))
    if method == "entropy":
        return min(stats.amax, entropy_amax(stats.hist, stats.width))
    raise CalibrationError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")


def scales_from(stats: dict[str, TensorStats], method: str, percentile: float = 99.99,
                needed: Iterable[str] = ()) -> tuple[dict[str, float], list[str]]:
    """(name -> float32 scale = amax/127, names that were exactly zero on every frame).

    A tensor that is always zero (e.g. the padding-crop mask on frames without padding crops) gets
    scale 1/127: any positive scale represents 0 exactly. It is an error if such a tensor feeds a
    quantized layer (`needed`), or if many are (degenerate frames: blank, broken)."""
    zero = [n for n, s in stats.items() if s.amax <= 0.0 or s.count == 0]
    bad = [n for n in zero if n in set(needed)]
    if bad or (stats and len(zero) > 0.25 * len(stats)):
        e = (bad or zero)[0]
        raise CalibrationError(f"{len(zero)} of {len(stats)} activations were zero or non-finite on every calibration "
                               f"frame (e.g. {e}); the frames look degenerate (blank or broken): use real camera frames")
    out = {}
    for n, s in stats.items():
        a = amax_of(s, method, percentile) if s.amax > 0 else 1.0
        if not a > 0:
            a = s.amax
        out[n] = float(np.float32(a / 127.0))
    return out, zero


# --- which tensors are activations ---------------------------------------------------------------

@dataclass
class GraphInfo:
    """What stats and Q/DQ need to know about a graph: activation tensors in order, producers, types."""
    model: onnx.ModelProto                     # structure only (external data not loaded)
    activations: list[str]                     # float, not computed from weights alone; graph inputs first
    initializers: set[str]
    producer: dict[str, onnx.NodeProto]
    consumers: dict[str, list[onnx.NodeProto]]
    elem_type: dict[str, int] = field(default_factory=dict)
    computed_constants: set[str] = field(default_factory=set)   # outputs of nodes fed by weights only

    def constant(self, name: str) -> bool:
        return name in self.initializers or name in self.computed_constants


def graph_info(model: onnx.ModelProto) -> GraphInfo:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    types: dict[str, int] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if v.type.HasField("tensor_type"):
            types[v.name] = v.type.tensor_type.elem_type
    inits = {i.name for i in model.graph.initializer}
    for i in model.graph.initializer:
        types.setdefault(i.name, i.data_type)
    const: set[str] = set()
    producer: dict[str, onnx.NodeProto] = {}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    acts = [i.name for i in model.graph.input if i.name not in inits and types.get(i.name) in FLOAT_TYPES]
    for node in model.graph.node:
        for x in node.input:
            if x:
                consumers.setdefault(x, []).append(node)
        is_const = node.op_type != "Shape" and all((not x) or x in inits or x in const for x in node.input)
        for y in node.output:
            if not y:
                continue
            producer[y] = node
            if is_const:
                const.add(y)
            elif types.get(y) in FLOAT_TYPES:
                acts.append(y)
    return GraphInfo(model, acts, inits, producer, consumers, types, const)


# --- running a graph with every activation tapped -------------------------------------------------

def tapped_session(graph_path: str, names: Sequence[str], threads: int | None = None) -> Any:
    """An onnxruntime session of `graph_path` that also returns `names` (its weights stay on disk, shared)."""
    import onnxruntime as ort

    from molmo_edge.runtime.backends.ort import session_options
    model = onnx.load(graph_path, load_external_data=False)
    have = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for n in names:
        if n not in have:
            model.graph.output.append(onnx.ValueInfoProto(name=n))
    opts = session_options(threads)  # no arena matters here too: every tap is a graph output
    # taps must see the graph's own tensors: no fusion that would hide or change them
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                  os.path.dirname(os.path.abspath(graph_path)))
    return ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=["CPUExecutionProvider"])


def tap_bytes(model: onnx.ModelProto, names: Sequence[str], feeds: dict[str, np.ndarray]) -> int:
    """Bytes of the `names` tensors one run on `feeds` returns, from shape inference with the feeds' shapes
    (exact on this project's vision graphs: 3.28 GiB for one MolmoE-1B crop, all 736 taps). A tensor whose
    shape stays unknown counts as the largest known one."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    for i in m.graph.input:
        if i.name in feeds and i.type.HasField("tensor_type"):
            dims = i.type.tensor_type.shape.dim
            for d, n in zip(dims, feeds[i.name].shape):
                d.ClearField("dim_param")
                d.dim_value = int(n)
    inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    sizes: dict[str, int] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        t = v.type.tensor_type
        if t.HasField("shape") and all(d.HasField("dim_value") for d in t.shape.dim):
            item = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize if t.elem_type else 4
            sizes[v.name] = int(np.prod([d.dim_value for d in t.shape.dim], dtype=np.int64)) * item
    largest = max(sizes.values(), default=0)
    return int(sum(sizes.get(n, largest) for n in names))


def run_tapped(sess: Any, feeds: dict[str, np.ndarray], names: Sequence[str]) -> dict[str, np.ndarray]:
    """Graph inputs among `names` come from `feeds`; the rest from the session."""
    inputs = {i.name for i in sess.get_inputs()}
    outs = [n for n in names if n not in inputs]
    vals = sess.run(outs, feeds)
    res = dict(zip(outs, vals))
    for n in names:
        if n in inputs:
            res[n] = feeds[n]
    return res


def crop_batches(images: np.ndarray, masks: np.ndarray | None, batch: int) -> Iterator[dict[str, np.ndarray]]:
    """The vision graph is independent per crop: split [crops, ...] inputs into batches of `batch` crops."""
    for s in range(0, images.shape[0], batch):
        feeds = {"images": np.ascontiguousarray(images[s:s + batch], np.float32)}
        if masks is not None:
            feeds["image_masks"] = np.ascontiguousarray(masks[s:s + batch], np.float32)
        yield feeds
