"""`molmo-edge plan BUNDLE --device ...`: will this model fit a Jetson, and how fast can it be at best?

Memory (GiB; the module's DRAM is shared by CPU and GPU): weights per precision (vision engine,
decoder), KV cache at the maximum sequence (float32, what the decoder graph's I/O is), activations
at the maximum crops and prefill (what TensorRT sizes its context memory for, the largest profile),
I/O buffers, the builder workspace, the OS reserve and the CUDA/TensorRT runtime. The token
embedding table is memory-mapped from the bundle and only its used rows become resident, so it is
listed but not counted.

Latency floors are lower bounds: max(bytes moved / DRAM bandwidth, FLOPs / dense tensor throughput)
per stage, with the device figures of runtime/device/targets.py. Real engines land above them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.device.targets import DeviceSpec
from molmo_edge.runtime.backends.trt_engines import (DEFAULT_MAX_EXTEND, DEFAULT_MAX_LOGITS, decoder_profiles, profile_max, typical_prefill)
from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.hf_names import block_weight_shapes, llm_weight_shapes, vision_weight_shapes
from molmo_edge.runtime.kv_cache import kv_dtype
from molmo_edge.runtime.files import numel

GiB = 2 ** 30
PLAN_PRECISIONS = ("fp16", "int8", "int4")
# what each plan precision means for (vision, decoder weights), and the one backend that runs each part
PRECISION_PARTS = {"fp16": ("fp16", "fp16"), "int8": ("int8", "int8"), "int4": ("int8", "int4")}
PART_BACKENDS = {
    "fp16": {"vision": "tensorrt", "decoder": "tensorrt"},
    "int8": {"vision": "tensorrt", "decoder": "onnxruntime"},     # no TensorRT weight-only INT8 decoder yet
    "int4": {"vision": "onnxruntime", "decoder": "onnxruntime"},  # MatMulNBits; INT8 Q/DQ vision on the same session kind
}
PRECISION_RUNS_ON = {
    "fp16": "TensorRT engines for both graphs (molmo-edge build --precision fp16; --backend tensorrt)",
    "int8": "not runnable yet: the INT8 vision engine is TensorRT's and the INT8 weight-only decoder onnxruntime's, "
            "and no backend runs the two together",
    "int4": "onnxruntime for both graphs (--precision int4): the INT4 MatMulNBits decoder and the calibrated INT8 "
            "Q/DQ vision graph (or the float one when not calibrated)",
}


def runnable(precision: str) -> bool:
    """One backend runs both parts (the runtime has one backend per session)."""
    parts = PART_BACKENDS[precision]
    return parts["vision"] == parts["decoder"]
ACT_BYTES = 2       # fp16 activations inside the engines
KV_BYTES = 4        # the K/V I/O of the portable decoder and its engines is float32 (a bundle's graph may say fp16)
INT4_BLOCK = 32     # weight-only INT4: one fp16 scale per 32 weights


def _is_matrix(shape: tuple[int, ...]) -> bool:
    return len(shape) == 2 and min(shape) > 1


def weight_bytes(shapes: dict[str, tuple[int, ...]], precision: str) -> int:
    """Bytes of a set of weights: matrices at the precision (plus scales), everything else fp16."""
    total = 0
    for s in shapes.values():
        n = numel(s)
        if not _is_matrix(s) or precision == "fp16":
            total += 2 * n
        elif precision == "int8":
            total += n + 2 * s[0]                  # per-output-channel fp16 scale
        elif precision == "int4":
            total += n // 2 + 2 * (n // INT4_BLOCK)
        elif precision == "fp32":
            total += 4 * n
        else:
            raise MolmoEdgeError(f"unknown precision {precision!r}; choose one of {', '.join(PLAN_PRECISIONS)}")
    return total


def vision_shapes_used(cfg: MolmoConfig) -> dict[str, tuple[int, ...]]:
    """The vision weights the vision graph holds: ViT blocks up to the deepest feature layer, the connector."""
    deepest = max(layer % cfg.vision.layers for layer in cfg.vit_layers)
    out = {}
    for k, s in vision_weight_shapes(cfg).items():
        if ".resblocks." in k and int(k.split(".resblocks.")[1].split(".")[0]) > deepest:
            continue
        out[k] = s
    return out


def decoder_shapes(cfg: MolmoConfig) -> dict[str, tuple[int, ...]]:
    """The decoder graph's weights: every LLM tensor but the embedding table (bundle embeddings.npy)."""
    return {k: s for k, s in llm_weight_shapes(cfg).items() if ".wte." not in k}


def expert_shapes(cfg: MolmoConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    for i in range(cfg.n_layers):
        out.update({k: s for k, s in block_weight_shapes(cfg, i).items() if ".experts." in k})
    return out


@dataclass
class PlanSettings:
    precision: str = "fp16"
    max_crops: int = 12
    max_seq: int = 4096
    workspace_mb: int = 1024
    super_mode: bool = False
    max_extend: int = DEFAULT_MAX_EXTEND
    max_logits: int = DEFAULT_MAX_LOGITS


@dataclass
class Plan:
    device: str
    settings: dict[str, Any]
    memory_gib: dict[str, float]          # item -> GiB (counted)
    info_gib: dict[str, float]            # listed, not counted (mapped embeddings)
    total_gib: float
    module_gib: float                     # the module's DRAM
    available_gib: float                  # module memory - OS reserve - runtime overhead
    fits: bool
    floors_ms: dict[str, float]
    decode_tokens_per_s_ceiling: float
    runs_on: str
    build_host_gib: dict[str, Any] = field(default_factory=dict)   # `molmo-edge build`'s peak host memory
    runnable: bool = True
    backends: dict[str, str] = field(default_factory=dict)   # part -> the backend that runs it
    sizes_from: dict[str, str] = field(default_factory=dict)  # part -> "bundle file X" or "computed from the config"
    suggestions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def activation_bytes(cfg: MolmoConfig, s: PlanSettings) -> dict[str, int]:
    """Peak live intermediates of each engine at its largest profile (fp16), a coarse upper estimate."""
    v = cfg.vision
    n, L, W, H, M = s.max_crops + 1, v.num_pos, v.width, v.heads, v.mlp_dim
    attn = n * L * W * 5 + n * H * L * L
    mlp = n * L * (2 * W + M)
    feats = n * L * W * len(cfg.vit_layers)
    vision = ACT_BYTES * (max(attn, mlp) + feats)

    profiles = decoder_profiles(cfg, s.max_seq, s.max_crops, s.max_extend, s.max_logits)
    best = 0
    for p in profiles:
        t = p.shapes["inputs_embeds"].max[1]
        past = p.shapes["past_key.0"].max[1]
        k = p.shapes["logit_positions"].max[0]
        S = past + t
        per_layer = (t * cfg.d_model * 3 + t * (cfg.q_dim + 2 * cfg.kv_dim) + 2 * cfg.n_heads * t * S
                     + (t * cfg.moe_top_k * cfg.ffn_inner * 2 + t * cfg.moe_top_k * cfg.d_model if cfg.is_moe
                        else t * cfg.ffn_hidden * 2))
        kv_concat = 2 * S * cfg.kv_dim * KV_BYTES
        logits = k * cfg.embedding_size * 4
        best = max(best, ACT_BYTES * per_layer + kv_concat + logits)
    return {"vision": vision, "decoder": best}


def io_bytes(cfg: MolmoConfig, s: PlanSettings) -> int:
    v = cfg.vision
    n = s.max_crops + 1
    vision = 4 * n * (v.num_patches * v.patch_dim + v.num_patches + cfg.tokens_per_crop * cfg.d_model)
    mx = profile_max(decoder_profiles(cfg, s.max_seq, s.max_crops, s.max_extend, s.max_logits))
    t, k = mx["inputs_embeds"][1], mx["logit_positions"][0]
    return vision + 4 * t * cfg.d_model + 8 * t + 8 * k + 4 * k * cfg.embedding_size


def bundle_graph(manifest: dict[str, Any] | None, part: str, precision: str) -> str | None:
    """The bundle graph that part will load at a plan precision, when the bundle has it."""
    if not manifest:
        return None
    graphs = manifest.get("graphs", {})
    vp, dp = PRECISION_PARTS[precision]
    if part == "decoder":
        key = "decoder" if dp == "fp16" else f"decoder.{dp}"
    else:
        key = "vision.int8" if vp == "int8" else "vision"
        if precision == "int4" and key not in graphs:
            key = "vision"  # --precision int4 runs the float vision graph when there is no calibrated one
    return key if key in graphs else None


def onnxruntime_graph(manifest: dict[str, Any] | None, part: str, precision: str) -> str | None:
    """bundle_graph, when onnxruntime is the backend that runs that part at that precision."""
    key = bundle_graph(manifest, part, precision)
    return key if key is not None and PART_BACKENDS[precision][part] == "onnxruntime" else None


def kv_bytes(manifest: dict[str, Any] | None, precision: str) -> int:
    """Bytes per cached K/V value: what the bundle's decoder for that precision declares, else KV_BYTES."""
    key = bundle_graph(manifest, "decoder", precision)
    return kv_dtype(manifest["graphs"][key]).itemsize if key else KV_BYTES


def part_bytes(cfg: MolmoConfig, s: PlanSettings, part: str, manifest: dict[str, Any] | None = None) -> tuple[int, str]:
    """(bytes, where the figure comes from) of one part's weights as they will be held. Parts onnxruntime runs:
    the bundle's own graph file when it has it, as onnxruntime's CUDA provider holds it (float weights as float32,
    quantized ones as stored: runtime/memory.py). TensorRT
    parts (engines are built on the device) and graphs the bundle lacks: computed from the config."""
    vp, dp = PRECISION_PARTS[s.precision]
    key = onnxruntime_graph(manifest, part, s.precision)
    if key is not None:
        from molmo_edge.runtime.memory import resident_weight_bytes
        entry = manifest["graphs"][key]
        return (resident_weight_bytes(entry, "cuda"),
                f"{entry.get('data') or entry['file']} as onnxruntime's CUDA provider holds it")
    shapes = decoder_shapes(cfg) if part == "decoder" else vision_shapes_used(cfg)
    how = "TensorRT engine" if PART_BACKENDS[s.precision][part] == "tensorrt" else "not in this bundle yet"
    return weight_bytes(shapes, dp if part == "decoder" else vp), f"computed from the config ({how})"


def memory(cfg: MolmoConfig, s: PlanSettings, dev: DeviceSpec,
           manifest: dict[str, Any] | None = None) -> tuple[dict[str, float], dict[str, float]]:
    vp, dp = PRECISION_PARTS[s.precision]
    act = activation_bytes(cfg, s)
    vbytes, _ = part_bytes(cfg, s, "vision", manifest)
    dbytes, _ = part_bytes(cfg, s, "decoder", manifest)
    kvb = kv_bytes(manifest, s.precision)
    vlabel = "float" if bundle_graph(manifest, "vision", s.precision) == "vision" and vp == "int8" else vp
    items = {
        f"vision weights ({vlabel})": vbytes,
        f"decoder weights ({dp})": dbytes,
        f"KV cache ({s.max_seq} tokens, fp{8 * kvb})": 2 * cfg.n_layers * s.max_seq * cfg.kv_dim * kvb,
        f"vision activations ({s.max_crops + 1} crops)": act["vision"],
        "decoder activations (largest profile)": act["decoder"],
        "I/O buffers": io_bytes(cfg, s),
        f"builder workspace ({s.workspace_mb} MB)": s.workspace_mb * 2**20 if "tensorrt" in PART_BACKENDS[s.precision].values() else 0,
        "OS reserve (assumed)": dev.os_reserve_gb * GiB,
        "CUDA/TensorRT runtime (assumed)": dev.runtime_overhead_gb * GiB,
    }
    emb = (cfg.embedding_size + cfg.additional_vocab_size) * cfg.d_model * 2
    return ({k: round(v / GiB, 3) for k, v in items.items()},
            {"token embeddings (memory-mapped fp16, used rows only)": round(emb / GiB, 3)})


def floors(cfg: MolmoConfig, s: PlanSettings, dev: DeviceSpec) -> dict[str, float]:
    """Lower bounds in ms: vision per frame at max crops, image prefill (640x480 frame), one decode step."""
    vp, dp = PRECISION_PARTS[s.precision]
    bw = dev.bandwidth_gbs * 1e9
    fp16 = dev.fp16_tflops * 1e12
    mm_vision = dev.int8_tops * 1e12 if vp == "int8" else fp16
    v = cfg.vision
    n, L = s.max_crops + 1, v.num_pos
    vshapes = vision_shapes_used(cfg)
    vit_mm = sum(numel(sh) for k, sh in vshapes.items() if _is_matrix(sh) and ".resblocks." in k)
    blocks = max(layer % v.layers for layer in cfg.vit_layers) + 1
    conn_mm = sum(numel(sh) for k, sh in vshapes.items() if _is_matrix(sh) and ".image_vit." not in k)
    v_flops = n * (2 * vit_mm * L + 4 * blocks * L * L * v.heads * v.head_dim + 2 * conn_mm * cfg.tokens_per_crop)
    vision = max(weight_bytes(vshapes, vp) / bw, v_flops / mm_vision)

    t = min(typical_prefill(cfg, s.max_crops), s.max_seq)
    dshapes = decoder_shapes(cfg)
    exp = expert_shapes(cfg)
    dense = {k: sh for k, sh in dshapes.items() if k not in exp}
    dense_mm = sum(numel(sh) for sh in dense.values() if _is_matrix(sh))
    exp_params = sum(numel(sh) for sh in exp.values())
    active_exp = exp_params * (cfg.moe_top_k / cfg.moe_num_experts) if cfg.is_moe else 0
    touched = min(1.0, t * cfg.moe_top_k / cfg.moe_num_experts) if cfg.is_moe else 0
    p_bytes = weight_bytes(dense, dp) + touched * weight_bytes(exp, dp) + 2 * cfg.n_layers * t * cfg.kv_dim * KV_BYTES
    p_flops = 2 * t * (dense_mm + active_exp) + 2 * cfg.n_layers * t * t * cfg.q_dim
    prefill = max(p_bytes / bw, p_flops / fp16)

    past = t
    frac = cfg.moe_top_k / cfg.moe_num_experts if cfg.is_moe else 0.0
    d_bytes = (weight_bytes(dense, dp) + frac * weight_bytes(exp, dp)
               + 2 * cfg.n_layers * past * cfg.kv_dim * KV_BYTES)
    d_flops = 2 * (dense_mm + active_exp) + 4 * cfg.n_layers * past * cfg.q_dim
    decode = max(d_bytes / bw, d_flops / fp16)
    return {"vision_per_frame": round(vision * 1e3, 2), "image_prefill": round(prefill * 1e3, 2),
            "decode_per_token": round(decode * 1e3, 3), "prefill_tokens": t}


def build_memory(cfg: MolmoConfig, s: PlanSettings, graph_bytes: dict[str, int] | None = None,
                 measured: dict[str, Any] | None = None) -> dict[str, Any]:
    """Peak host memory of `molmo-edge build` (GiB), staged as build.py runs it: graphs one after the other,
    each parse holding the ONNX weights once as stored in the bundle (`graph_bytes`; fp32 when unknown), the
    builder adding the engine's fp16 weights and the workspace; the parity check afterwards holds one model at a
    time. `measured`: engine.json's host_memory of a build on a device (peak RSS per stage), shown as well."""
    vp = PRECISION_PARTS[s.precision][0]
    engine = {"vision": weight_bytes(vision_shapes_used(cfg), vp), "decoder": weight_bytes(decoder_shapes(cfg), "fp16")}
    onnx = dict(graph_bytes or {})
    onnx.setdefault("vision", weight_bytes(vision_shapes_used(cfg), "fp32"))
    onnx.setdefault("decoder", weight_bytes(decoder_shapes(cfg), "fp32"))
    ws = s.workspace_mb * 2**20
    built = [r for r in ("vision", "decoder") if PART_BACKENDS[s.precision][r] == "tensorrt"]
    if not built:  # onnxruntime runs both graphs: no engine to build
        return {"vision": 0.0, "decoder": 0.0, "peak": 0.0, "basis": "no TensorRT engine: onnxruntime runs both graphs"}
    per = {r: round((onnx[r] + engine[r] + ws) / GiB, 3) if r in built else 0.0 for r in ("vision", "decoder")}
    out: dict[str, Any] = {**per, "peak": max(per.values()),
                           "basis": "estimate: ONNX weights as stored + fp16 engine weights + workspace, one graph at a time"}
    if measured and measured.get("peak_rss_mib"):
        out["measured_peak"] = round(measured["peak_rss_mib"] / 1024, 3)
        out["measured_stages"] = {k: round(v["peak_rss_mib"] / 1024, 3) for k, v in measured.get("stages", {}).items()}
    return out


def _total(cfg: MolmoConfig, s: PlanSettings, dev: DeviceSpec, manifest: dict[str, Any] | None = None) -> float:
    return round(sum(memory(cfg, s, dev, manifest)[0].values()), 3)


_CROP_STEPS = (12, 9, 6, 4, 2, 1)
_SEQ_STEPS = (4096, 2048, 1024, 512)
_PREC_STEPS = ("fp16", "int8", "int4")


def make_plan(cfg: MolmoConfig, dev: DeviceSpec, s: PlanSettings, graph_bytes: dict[str, int] | None = None,
              measured_build: dict[str, Any] | None = None, manifest: dict[str, Any] | None = None) -> Plan:
    """manifest: a bundle's; its graph files then give the weight sizes (what will really load)."""
    if s.precision not in PLAN_PRECISIONS:
        raise MolmoEdgeError(f"--precision {s.precision} is not one of {', '.join(PLAN_PRECISIONS)}")
    if s.max_seq > cfg.max_sequence_length:
        raise MolmoEdgeError(f"--max-seq {s.max_seq} exceeds the model's context {cfg.max_sequence_length}")
    d = dev.at(s.super_mode)
    mem, info = memory(cfg, s, d, manifest)
    total = round(sum(mem.values()), 3)
    ok = runnable(s.precision)
    fits = total <= d.memory_gb and ok
    fl = floors(cfg, s, d)
    plan = Plan(device=d.name, settings=asdict(s), memory_gib=mem, info_gib=info, total_gib=total, module_gib=d.memory_gb,
                available_gib=round(d.memory_gb - d.os_reserve_gb - d.runtime_overhead_gb, 3), fits=fits,
                floors_ms={k: v for k, v in fl.items() if k != "prefill_tokens"},
                decode_tokens_per_s_ceiling=round(1e3 / fl["decode_per_token"], 1), runs_on=PRECISION_RUNS_ON[s.precision],
                build_host_gib=build_memory(cfg, s, graph_bytes, measured_build),
                runnable=ok, backends=dict(PART_BACKENDS[s.precision]),
                sizes_from={p: part_bytes(cfg, s, p, manifest)[1] for p in ("vision", "decoder")})
    if plan.build_host_gib["peak"] > d.memory_gb - d.os_reserve_gb:
        plan.notes.append(f"building the engines on this device needs ~{plan.build_host_gib['peak']:.1f} GiB of host memory "
                          f"(more than its {d.memory_gb - d.os_reserve_gb:.1f} GiB after the OS): export the bundle with "
                          "--dtype fp16 (halves the ONNX weights the parser holds) or add swap for the build")
    plan.notes.append(f"image prefill floor is for a 640x480 frame at {s.max_crops} crops ({fl['prefill_tokens']} tokens); "
                      "decode floor at that context")
    if cfg.is_moe:
        plan.notes.append("MoE: every expert's weights are resident; a decode step reads only top-k of them "
                          "(routed NonZero/Gather branches; TensorRT's handling of those data-dependent shapes is "
                          "unverified on a device)")
    dec = onnxruntime_graph(manifest, "decoder", s.precision)
    if dec is not None:
        from molmo_edge.runtime.memory import experts_on_cpu
        if experts_on_cpu(manifest["graphs"][dec]):
            plan.notes.append(f"{dec} has fp32 scales, so its QMoE experts compute in float32, which onnxruntime's CUDA "
                              "provider has no kernel for: they would run on the CPU cores (held as on CPU, counted so). "
                              "Quantize with --scales fp16 (the Orin-size --block-size 64 --scales fp16) to keep the "
                              "whole decoder on the GPU")
    if not fits:
        plan.suggestions = suggest(cfg, d, s, manifest=manifest)
    return plan


def suggest(cfg: MolmoConfig, dev: DeviceSpec, s: PlanSettings, limit: int = 4,
            manifest: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Smallest changes that make it fit: one knob first (precision, then crops, then max sequence), then pairs,
    then all three; each with its total."""
    prec = [p for p in _PREC_STEPS[_PREC_STEPS.index(s.precision) + 1:] if runnable(p)]  # never a combination no backend runs
    crops = [c for c in _CROP_STEPS if c < s.max_crops]
    seqs = [q for q in _SEQ_STEPS if q < s.max_seq]
    cands: list[PlanSettings] = []
    cands += [replace(s, precision=p) for p in prec]
    cands += [replace(s, max_crops=c) for c in crops]
    cands += [replace(s, max_seq=q) for q in seqs]
    cands += [replace(s, precision=p, max_crops=c) for p in prec for c in crops]
    cands += [replace(s, precision=p, max_seq=q) for p in prec for q in seqs]
    cands += [replace(s, max_crops=c, max_seq=q) for c in crops for q in seqs]
    cands += [replace(s, precision=p, max_crops=c, max_seq=q) for p in prec for c in crops for q in seqs]
    out: list[dict[str, Any]] = []
    for c in cands:
        if not runnable(c.precision):
            continue
        total = _total(cfg, c, dev, manifest)
        if total <= dev.memory_gb:
            change = {k: v for k, v in asdict(c).items() if asdict(s)[k] != v}
            if any(all(prev["change"].get(k) == v for k, v in prev["change"].items()) and set(prev["change"]) <= set(change)
                   for prev in out):
                continue  # a smaller change already fits
            out.append({"change": change, "total_gib": total})
            if len(out) >= limit:
                break
    return out


def format_plan(p: Plan) -> str:
    lines = [f"{p.device}: precision {p.settings['precision']}, max crops {p.settings['max_crops']}, "
             f"max sequence {p.settings['max_seq']}, workspace {p.settings['workspace_mb']} MB", "", "memory (GiB)"]
    for k, v in p.memory_gib.items():
        lines.append(f"  {k:<48} {v:8.2f}")
    lines.append(f"  {'total':<48} {p.total_gib:8.2f}")
    for k, v in p.info_gib.items():
        lines.append(f"  ({k}: {v:.2f}, not counted)")
    mem = p.total_gib
    lines.append("runs: " + ", ".join(f"{k} on {v}" for k, v in p.backends.items()) + "; weights from: "
                 + "; ".join(f"{k} {v}" for k, v in p.sizes_from.items()))
    if not p.runnable:
        lines.append(f"NOT RUNNABLE YET: {p.runs_on}")
    if p.fits:
        lines.append(f"FITS: {mem:.2f} GiB with the OS reserve and runtime, of the module's {p.module_gib:.2f} GiB "
                     f"({p.module_gib - mem:.2f} GiB spare)")
    else:
        if mem > p.module_gib:
            lines.append(f"DOES NOT FIT: needs {mem:.2f} GiB with the OS reserve and runtime, the module has "
                         f"{p.module_gib:.2f} GiB")
        if p.suggestions:
            lines.append("fits with (runnable combinations only):")
            for sgg in p.suggestions:
                knobs = ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in sgg["change"].items())
                lines.append(f"  {knobs}  ({sgg['total_gib']:.2f} GiB)")
        else:
            lines.append("no combination of precision, crops and max sequence fits this device: choose a larger one")
    lines += ["", "latency floors (lower bounds; real engines are slower)"]
    for k, v in p.floors_ms.items():
        lines.append(f"  {k.replace('_', ' '):<32} {v:10.2f} ms")
    lines.append(f"  decode ceiling                   {p.decode_tokens_per_s_ceiling:10.1f} tokens/s")
    b = p.build_host_gib
    if b:
        lines += ["", f"build on the device (molmo-edge build): peak host memory ~{b['peak']:.2f} GiB "
                      f"(vision {b['vision']:.2f}, decoder {b['decoder']:.2f}; {b['basis']})"]
        if "measured_peak" in b:
            lines.append(f"  measured on this bundle's engine build: {b['measured_peak']:.2f} GiB peak RSS ("
                         + ", ".join(f"{k} {v:.2f}" for k, v in b["measured_stages"].items()) + ")")
    lines += ["", f"runs on: {p.runs_on}"] + [f"note: {n}" for n in p.notes]
    return "\n".join(lines)
