"""What loading a bundle's graphs costs in memory on onnxruntime, estimated from the bundle's own files,
and the guard that refuses a load that cannot fit (one line instead of the kernel's OOM killer).

Measured facts the estimate rests on (onnxruntime 1.32 CPU, this project's graphs):
- Float weights stored fp16 pass through a Cast that onnxruntime constant-folds at load, and MLAS
  prepacks every MatMul weight into its own buffer: a float graph holds its weights as float32 in
  anonymous memory, twice the bytes of an fp16 data file. Except the vision graph on CPU, which the backend
  opens with its Casts run per use (backends/ort.open_session): its fp16 file is mapped, resident during a vision
  pass (file pages, 1x) and dropped after it, and each weight is float32 only while its node runs
  (CAST_WORKING_MATRICES). Full-size MolmoE-1B INT4 ask: peak RSS 6.29 GiB held as float32, 5.77 so.
- MatMulNBits and QMoE weights (int4/int8 + scales) are repacked by MLAS: the nibbles, and per block a float32
  scale and a float32 block sum, which a step reads; fp16-stored scales also keep a float32 copy
  (HELD_BYTES_PER_BLOCK, measured on full-width 2-layer MolmoE-1B INT4 decoders: 729 MiB held for 522 MB of
  nibbles + 118 MB of fp32 scales, 670 MiB for the same nibbles + 31 MB of fp16 scales at block 64).
- The external data itself is memory-mapped (file pages, reclaimable) and released after prepacking: the fp16
  files' pages are resident while their Cast is folded, during load, not while answering. The original scales of
  MatMulNBits and QMoE stay mapped (and resident: they were read to repack) beside the repacked copy, never read
  again (full-size MolmoE-1B INT4: 0.84 GiB of file pages at block 32, 0.45 at block 64); the backend pages them
  out while the graph loads (runtime.machine.paging_out) and drops what is left after it (drop_mapped_pages), so
  they are not counted (a full-width 2-layer MolmoE-1B INT4: load VmHWM 0.998 -> 0.90 GiB, its scales 0.11).
- No CPU memory arena (backends/ort.py): a question's working memory is freed after it, not kept by the arena,
  and glibc's freed heap goes back after each vision pass and question (machine.trim_heap).
- The vision graph runs VISION_CROPS_PER_RUN crops at a time: its working memory is that many crops'.
- A session's KV cache grows to what its questions need, GROW_STEP tokens at a time (runtime.kv_cache: the
  CPU GroupQueryAttention commits the whole buffer it is bound to, so a context-long one cost 0.5 GiB for MolmoE-1B).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.kv_cache import SHARED, grown_capacity, kv_dtype, kv_layout

GiB = 2 ** 30
# Peak RSS of a Python process with the runtime, onnxruntime, tokenizer and numpy loaded and a tiny bundle
# open, before its first question (measured on this project's CPU box: 74-76 MiB).
RUNTIME_BASE_BYTES = 76 << 20
# Crops per vision run on onnxruntime (backends/ort.py). Full-width MolmoE-1B INT8 vision, 7 crops, fresh process:
# +0.57 GiB of working memory all at once, +0.22 two at a time, +0.12 one at a time; the features bit for bit the
# same, the time the same within noise (fp32 vision likewise: +0.60 GiB at 7).
VISION_CROPS_PER_RUN = 2
# float32 copies of the vision's largest matrix alive at once while its Casts run per use (full-width MolmoE-1B,
# 2 crops: 0.22 GiB above the load against 0.17 for the same run with the weights held as float32)
CAST_WORKING_MATRICES = 3
# graph roles the onnxruntime CPU backend opens with their fp16 weight Casts run per use (backends/ort.open_session)
CAST_PER_RUN_ROLES = ("vision",)
# Share of MemAvailable a load may plan to use: the rest is for the page cache and other processes.
USABLE_SHARE = 0.9


# bytes per quantization block onnxruntime holds after loading, by provider and the scales' stored dtype.
# cpu: MLAS's repacked layout (measured, above). cuda: the kernels read the stored nibbles and the scales in the
# op's activation type (MatMulNBits; QMoE prepacks the nibbles into CUTLASS's layout, the same bytes), so a block
# holds its scale as stored; read in onnxruntime's CUDA sources (contrib_ops/cuda/quantization, moe), not yet
# measured on a device.
HELD_BYTES_PER_BLOCK = {"cpu": {"fp32": 8, "fp16": 12}, "cuda": {"fp32": 4, "fp16": 2}}
READ_BYTES_PER_BLOCK = 8
# onnxruntime's CUDA provider registers QMoE for fp16 and bf16 activations only: a decoder quantized with fp32
# scales computes its experts in float32, so on a GPU they run on the CPU provider (and are held as on CPU).
# `--scales fp16` makes the whole quantized decoder fp16 (calibration/weight_quant.py's Casts).
CUDA_FLOAT32_LACKS = "com.microsoft.QMoE"


class InsufficientMemory(MolmoEdgeError):
    """The graphs picked would not fit in the memory this machine has available."""


def resident_weight_bytes(entry: dict[str, Any], device: str = "cpu", cast_per_run: bool = False) -> int:
    """Bytes a graph's weights occupy once onnxruntime has loaded it (see the module doc). The Cast of fp16
    weights is folded by onnxruntime's graph optimizer whatever the provider, so CUDA holds float32 too;
    cast_per_run (the vision graph on CPU): the fp16 file's own pages instead. A quantized graph's scales are
    held at HELD_BYTES_PER_BLOCK a block of the provider that runs them: device "cpu", else CUDA's, except
    experts that only the CPU provider runs (experts_on_cpu)."""
    fp16_factor = 1 if cast_per_run and device == "cpu" else 2
    by_dtype = entry.get("weight_bytes_by_dtype")
    if by_dtype is None:  # bundles from before the breakdown: the stored precision says it
        stored = entry.get("precision", {}).get("weights", "fp32")
        return entry.get("data_bytes", 0) * (fp16_factor if stored == "fp16" else 1)
    scale_dtype = _scales_dtype(entry)
    provider = "cuda" if device != "cpu" and not experts_on_cpu(entry) else "cpu"
    out = 0
    for dtype, n in by_dtype.items():
        if dtype == scale_dtype:  # the graph's other floats of this dtype are norms, a few KB
            out += n // (2 if dtype == "float16" else 4) * HELD_BYTES_PER_BLOCK[provider][entry["quantization"]["scales"]]
        elif dtype == "float16":
            out += fp16_factor * n  # folded to float32, or mapped as it is
        else:
            out += n
    return out


def experts_on_cpu(entry: dict[str, Any]) -> bool:
    """Whether a quantized decoder's experts would run on onnxruntime's CPU provider even on a GPU
    (CUDA_FLOAT32_LACKS): QMoE with fp32 scales computes in float32."""
    q = entry.get("quantization") or {}
    return q.get("experts_op") == CUDA_FLOAT32_LACKS and q.get("scales", "fp32") == "fp32"


def _scales_dtype(entry: dict[str, Any]) -> str | None:
    """The dtype ("float32"/"float16") a quantized graph's scales are stored in; None for a float graph."""
    if "uint8" not in (entry.get("weight_bytes_by_dtype") or {}):
        return None
    return "float16" if entry.get("quantization", {}).get("scales", "fp32") == "fp16" else "float32"


def mapped_file_bytes(entry: dict[str, Any]) -> int:
    """File pages resident while the graph loads: the fp16 weights' external data (full-width MolmoE-1B vision,
    0.55 GiB of fp16: VmHWM 0.49 GiB above RssAnon at the end of the load). Reclaimable, but counted in RSS.
    fp16 scales of a quantized graph are not among them: they are paged out at load (kept_file_bytes)."""
    fp16 = int((entry.get("weight_bytes_by_dtype") or {}).get("float16", 0))
    return fp16 - kept_file_bytes(entry) if _scales_dtype(entry) == "float16" else fp16


def kept_file_bytes(entry: dict[str, Any]) -> int:
    """File pages onnxruntime keeps mapped after loading a graph: a quantized graph's scales, as stored (see the
    module doc; the graph's other floats of that dtype are norms, a few KB). The backend pages them out."""
    dtype = _scales_dtype(entry)
    return int(entry["weight_bytes_by_dtype"].get(dtype, 0)) if dtype else 0


def _prompt_tokens(cfg) -> int:
    """Tokens of a question about a 4:3 frame at the model's default crops: image tokens (overlapping crops
    share pooled patches; measured 1215 tokens at 12 crops, 759 at 7) plus the text."""
    return round(0.62 * (cfg.preprocess.max_crops + 1) * cfg.tokens_per_crop) + 64


def activation_bytes(cfg, fused: bool = False, max_new_tokens: int = 200, kv_item: int = 4,
                     vision_casts: bool = False) -> dict[str, int]:
    """Peak working memory of a question at the default crops: vision (VISION_CROPS_PER_RUN crops at a time;
    vision_casts: its weights cast per use, CAST_WORKING_MATRICES float32 matrices more), prefill, and the KV
    cache it fills.
    The float32 attention scores dominate; the multipliers count how many score-sized tensors onnxruntime
    keeps alive at once without its arena, glibc reusing freed heap blocks within a question (fitted on a tiny
    bundle, peak 189-203 MiB run to run on two machines; the 5th is heap that fragmentation keeps): about 3 in
    the ViT, 5 in the portable decoder;
    GroupQueryAttention (the fused layout: decoder.fused, `export --weights`) never materialises them.
    kv_item: bytes per cached K/V value (2 for the fp16 cache of fused fp16 and quantized decoders)."""
    v = cfg.vision
    n = min(cfg.preprocess.max_crops + 1, VISION_CROPS_PER_RUN)
    vision = 4 * n * v.num_pos * (3 * v.width + v.mlp_dim) + 3 * 4 * n * v.heads * v.num_pos * v.num_pos
    if vision_casts:
        vision += CAST_WORKING_MATRICES * 4 * v.width * v.mlp_dim
    t = _prompt_tokens(cfg)
    ffn = cfg.moe_top_k * cfg.ffn_inner * 2 if cfg.is_moe else cfg.ffn_hidden * 2
    prefill = 4 * t * (4 * cfg.d_model + cfg.q_dim + 2 * cfg.kv_dim + ffn) + (0 if fused else 5 * 4 * cfg.n_heads * t * t)
    kv = 2 * cfg.n_layers * grown_capacity(t + max_new_tokens) * cfg.kv_dim * kv_item
    return {"vision": int(vision), "prefill": int(prefill), "kv_cache": int(kv)}


@dataclass
class LoadEstimate:
    graphs: dict[str, int]                 # graph key -> resident (anonymous) weight bytes
    activations: dict[str, int]
    base: int = RUNTIME_BASE_BYTES
    mapped: int = 0                        # file pages resident at the end of a graph's load (reclaimable)
    notes: list[str] = field(default_factory=list)
    while_running: tuple[str, ...] = ()    # the vision graph when its weights are file pages only during a pass

    @property
    def weights(self) -> int:
        """Weights resident for the session's life."""
        return sum(v for k, v in self.graphs.items() if k not in self.while_running)

    def _question(self) -> int:
        """A question's peak above the weights: a vision pass (with its graph's pages) or the prefill."""
        a = self.activations
        return max(a["vision"] + sum(self.graphs[k] for k in self.while_running), a["prefill"])

    @property
    def total(self) -> int:
        """Expected peak RSS of a process that loads these graphs and answers one question: the load's file pages
        and a question's working memory are not resident at the same time."""
        return self.base + self.weights + max(self.mapped, self._question()) + self.activations["kv_cache"]

    @property
    def working(self) -> int:
        """What the load and a question need that the kernel cannot reclaim: weights, activations, KV cache."""
        return self.weights + self._question() + self.activations["kv_cache"]

    def fits(self, available: int) -> bool:
        """The guard's rule: the working set within USABLE_SHARE of `available` (file pages are reclaimable)."""
        return self.working <= int(available * USABLE_SHARE)

    def to_dict(self) -> dict[str, Any]:
        return {"graphs_gib": {k: round(v / GiB, 3) for k, v in self.graphs.items()},
                "activations_gib": {k: round(v / GiB, 3) for k, v in self.activations.items()},
                "runtime_gib": round(self.base / GiB, 3), "mapped_file_gib": round(self.mapped / GiB, 3), "total_gib": round(self.total / GiB, 3), "notes": self.notes,
                "resident_while_running": list(self.while_running)}


def estimate_load(manifest: dict[str, Any], cfg, graphs: dict[str, str], device: str = "cpu") -> LoadEstimate:
    """The estimate for loading `graphs` (role -> graph key) of a bundle on `device`."""
    entries = manifest["graphs"]
    dec = entries.get(graphs.get("decoder"), {})
    per_run = {role: role in CAST_PER_RUN_ROLES and device == "cpu" and _fp16(entries[key]) for role, key in graphs.items()}
    est = LoadEstimate({key: resident_weight_bytes(entries[key], device, per_run[role]) for role, key in graphs.items()},
                       activation_bytes(cfg, fused=kv_layout(dec) == SHARED, kv_item=kv_dtype(dec).itemsize,
                                        vision_casts=per_run.get("vision", False)),
                       # graphs load one after the other, each one's pages released, paged out or dropped by its end
                       # (a graph cast per run: its pages are resident during its passes, dropped after each)
                       mapped=max(0 if per_run[role] else mapped_file_bytes(entries[k]) for role, k in graphs.items()),
                       while_running=tuple(k for role, k in graphs.items() if per_run[role]))
    for role, key in graphs.items():
        if _fp16(entries[key]) and not per_run[role]:
            est.notes.append(f"{key}: fp16 weights are held as float32 by onnxruntime (twice the file)")
    return est


def _fp16(entry: dict[str, Any]) -> bool:
    return entry.get("precision", {}).get("weights") == "fp16"


def fitting_advice(manifest: dict[str, Any], cfg, graphs: dict[str, str], available: int, device: str = "cpu") -> str:
    """Which --precision (present in the bundle) or `quantize` would make the load fit."""
    have = manifest["graphs"]
    for bits in ("int4", "int8"):
        key = f"decoder.{bits}"
        if key in have and graphs.get("decoder") != key:
            alt = estimate_load(manifest, cfg, dict(graphs, decoder=key), device)
            if alt.working <= available:
                return f"run with --precision {bits} (this bundle's {key} needs {alt.working / GiB:.1f} GiB)"
    if "decoder.int4" not in have:
        return "make a smaller decoder with `molmo-edge quantize BUNDLE --weights int4` and run with --precision int4"
    return "free memory (close other programs) or use a machine with more memory"


def check_fits(manifest: dict[str, Any], cfg, graphs: dict[str, str], name: str, device: str = "cpu",
               available: int | None = None) -> LoadEstimate:
    """Raise InsufficientMemory (one line: needed, available, how to fit) before anything is loaded."""
    from molmo_edge.runtime import machine
    est = estimate_load(manifest, cfg, graphs, device)
    avail = machine.mem_available() if available is None else available
    usable = int(avail * USABLE_SHARE)
    if device == "cpu" and not est.fits(avail):
        parts = ", ".join(f"{k} {v / GiB:.1f}" for k, v in est.graphs.items())
        raise InsufficientMemory(
            f"{name} needs about {est.working / GiB:.1f} GiB to load and answer ({parts} GiB of weights"
            f"{' held as float32' if est.notes else ''}, plus working memory) but {avail / GiB:.1f} GiB are available; "
            + fitting_advice(manifest, cfg, graphs, usable, device))
    return est
