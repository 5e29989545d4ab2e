"""Weight-only quantization of the decoder: "decoder.int4" / "decoder.int8" bundle flavours.

Every MatMul of the decoder whose weight is a constant of attention (att_proj, attn_out), the
dense FFN (ff_proj, ff_out) or any MoE expert (gate_proj, up_proj, down_proj) becomes an
onnxruntime `com.microsoft.MatMulNBits` node: the weight is quantized symmetrically in blocks of
`block_size` (32/64/128) along the input dimension, one float32 scale per block and output column,
no zero points (MatMulNBits' implicit zero point 8 / 128 = symmetric signed int4 / int8). Kept in
float: the MoE router (`mlp.gate`), whose top-k choice is sensitive, the LM head, norms and RoPE.

The graph keeps the decoder's inputs and outputs, so the runtime's backend runs it unchanged.
Weights are streamed tensor by tensor from the decoder's external data into the new file, so a
decoder larger than memory (MolmoE-1B: 29 GB of fp32) is quantized in bounded memory.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass
import os
import re
import sys
import time
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from molmo_edge.runtime.backends.ort import open_session
from molmo_edge.runtime.external_data import ExternalDataWriter, external_tensor, tensor_proto
from molmo_edge.runtime.kv_cache import first_pass_feeds, kv_dtype, kv_layout
from molmo_edge.runtime.machine import mem_available, return_large_frees
from molmo_edge.runtime.ort_ops import in_fp16

from molmo_edge.calibration import CalibrationError
from molmo_edge.calibration.staging import commit, staging

BLOCK_SIZES = (32, 64, 128)
_DTYPES = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}
_KINDS = (("experts", re.compile(r"\.experts\.\d+\.(gate_proj|up_proj|down_proj)\.weight$")),
          ("attention", re.compile(r"\.(att_proj|attn_out)\.weight$")),
          ("ffn", re.compile(r"\.(ff_proj|ff_out)\.weight$")))


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def weight_kind(name: str, lm_head: str) -> str | None:
    """attention | ffn | experts for weights that are quantized; None (kept float) otherwise."""
    if name in (lm_head, "lm_head.weight"):  # the graph names the head lm_head.weight (molmo-edge export)
        return None
    for kind, pat in _KINDS:
        if pat.search(name):
            return kind
    return None


# output columns quantized at once: a whole Molmo-7B-D LM head (152,064 columns) made ~4 GB of float32
# temporaries (its Orin-size export peaked at 6.3 GiB anonymous); 8192 columns make ~0.5 GB at most
QUANT_COLUMNS = 8192


def quantize_blockwise(w: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric blockwise quantization of a [K, N] ([in, out]) weight in MatMulNBits layout.

    Returns (B uint8 [N, n_blocks, block_size * bits / 8], scales float32 [N * n_blocks]);
    q = clip(rint(w / s), -qmax, qmax) with s = max|block| / qmax, qmax = 7 (int4) or 127 (int8),
    stored as q + 8 (two per byte, low nibble first) or q + 128."""
    if bits not in (4, 8):
        raise CalibrationError(f"--weights int{bits} is not supported; use int4 or int8")
    k, n = w.shape
    if n > QUANT_COLUMNS:  # columns are independent: a slice at a time keeps the float32 temporaries small
        parts = [quantize_blockwise(w[:, i:i + QUANT_COLUMNS], bits, block_size) for i in range(0, n, QUANT_COLUMNS)]
        return np.concatenate([b for b, _ in parts]), np.concatenate([sc for _, sc in parts])
    nb = -(-k // block_size)
    wt = np.zeros((n, nb * block_size), np.float32)
    wt[:, :k] = np.asarray(w, np.float32).T
    blocks = wt.reshape(n, nb, block_size)
    qmax = 7 if bits == 4 else 127
    amax = np.abs(blocks).max(axis=-1)
    scale = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
    q = np.clip(np.rint(blocks / scale[..., None]), -qmax, qmax).astype(np.int16) + (8 if bits == 4 else 128)
    q = q.astype(np.uint8)
    if bits == 4:
        q = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return np.ascontiguousarray(q), scale.reshape(-1)


def dequantize_blockwise(b: np.ndarray, scales: np.ndarray, bits: int, block_size: int, k: int) -> np.ndarray:
    """Inverse of quantize_blockwise: the [K, N] float32 weight MatMulNBits computes with."""
    n, nb = b.shape[0], b.shape[1]
    if bits == 4:
        q = np.empty((n, nb, block_size), np.int16)
        q[..., 0::2] = b & 0x0F
        q[..., 1::2] = b >> 4
        q -= 8
    else:
        q = b.astype(np.int16) - 128
    w = q.astype(np.float32) * scales.reshape(n, nb)[..., None]
    return np.ascontiguousarray(w.reshape(n, nb * block_size)[:, :k].T)


@dataclass(frozen=True)
class BlockQuantizer:
    """The weight-only quantizer export's GraphBuilder calls while writing (`export --weights`): which
    linear weights it quantizes (weight_kind: attention, FFN, experts; the MoE router stays float, the LM
    head too unless head_bits is 4 or 8), and the blockwise math above. Passed in by the CLI, since export
    may not import calibration. scales "fp16" halves the scales (MatMulNBits then computes with fp16
    activations: the graph casts around each such MatMul), the Orin-size setting."""
    bits: int = 4
    block_size: int = 32
    accuracy_level: int = 4
    head_bits: int = 8          # 0: float LM head; 8 or 4: MatMulNBits at that width (DEFAULT_HEAD)
    scales: str = "fp32"
    experts: str = "qmoe"       # qmoe: one onnxruntime QMoE node per MoE layer; routed: a MatMulNBits per expert matmul

    @property
    def quantize_head(self) -> bool:
        return self.head_bits > 0

    def bits_for(self, name: str) -> int:
        return self.head_bits if name == "lm_head.weight" else self.bits

    def wants(self, name: str) -> bool:
        if name == "lm_head.weight":  # the graph's name for the head
            return self.quantize_head
        return weight_kind(name, "lm_head.weight") is not None

    def quantize(self, w_in_out: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]:
        b, s = quantize_blockwise(w_in_out, self.bits_for(name), self.block_size)
        if self.scales == "fp16":
            s = s.astype(np.float16)
        return b, s

    def dequantize(self, b: np.ndarray, scales: np.ndarray, k: int, name: str = "") -> np.ndarray:
        return dequantize_blockwise(b, np.asarray(scales, np.float32), self.bits_for(name), self.block_size, k)

    def packs_experts(self, d_model: int, inner: int) -> bool:
        """Whether a MoE layer's experts go into one QMoE node (QMoE needs both widths divisible by the block)."""
        return self.experts == "qmoe" and d_model % self.block_size == 0 and inner % self.block_size == 0

    def pack_experts(self, get_in_out: Callable[[int, str], np.ndarray], n_experts: int) -> dict[str, np.ndarray]:
        """A MoE layer's experts quantized and stacked in QMoE's layout: fc1 [E, 2I, d*bits/8] holds gate_proj and
        up_proj rows interleaved (gate even, up odd: the only fused SwiGLU layout onnxruntime's CPU kernel takes),
        fc2 [E, d, I*bits/8] holds down_proj; scales [E, rows, width/block]. Rows are MatMulNBits' packing (the
        same blocks, nibbles and implicit zero point), so QMoE computes what the per-expert MatMulNBits compute.
        get_in_out(e, "gate_proj" | "up_proj" | "down_proj") returns expert e's [in, out] weight."""
        out: dict[str, np.ndarray] = {}
        for e in range(n_experts):
            parts = {}
            for nm in ("gate_proj", "up_proj", "down_proj"):
                w = get_in_out(e, nm)
                b, sc = self.quantize(np.asarray(w, np.float32))
                parts[nm] = (b.reshape(w.shape[1], -1), sc.reshape(w.shape[1], -1))
            if not out:
                (g, gs), (dn, ds) = parts["gate_proj"], parts["down_proj"]
                out = {"fc1": np.empty((n_experts, 2 * g.shape[0], g.shape[1]), np.uint8),
                       "fc1_scales": np.empty((n_experts, 2 * gs.shape[0], gs.shape[1]), gs.dtype),
                       "fc2": np.empty((n_experts, *dn.shape), np.uint8), "fc2_scales": np.empty((n_experts, *ds.shape), ds.dtype)}
            for j, nm in enumerate(("gate_proj", "up_proj")):
                out["fc1"][e, j::2], out["fc1_scales"][e, j::2] = parts[nm]
            out["fc2"][e], out["fc2_scales"][e] = parts["down_proj"]
        return out

    def experts_node(self, make: Callable[..., str], x: str, logits: str, weights: dict[str, str], top_k: int) -> str:
        """Write one QMoE node through make(op_type, inputs, **attributes) -> output name; returns the output.
        Molmo's routing is a softmax over all experts without renormalising the top-k weights: onnxruntime's CPU
        QMoE renormalises whatever normalize_routing_weights says (measured, onnxruntime 1.32), so the softmax goes in
        as router_weights (the mixing weights) and the logits as router_probs (only the top-k choice)."""
        w = weights

        def qmoe(x: str, logits: str, probs: str) -> str:
            return make("QMoE", [x, logits, w["fc1"], w["fc1_scales"], "", w["fc2"], w["fc2_scales"]] + [""] * 7 + [probs],
                        domain="com.microsoft", k=top_k, normalize_routing_weights=0, activation_type="swiglu",
                        swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=self.bits,
                        block_size=self.block_size, accuracy_level=self.accuracy_level, weights_prepacked=0)
        inputs = [x, logits, make("Softmax", [logits], axis=-1)]
        return in_fp16(make, inputs, qmoe) if self.scales == "fp16" else qmoe(*inputs)


HEAD_CHOICES = {"float": 0, "int8": 8, "int4": 4}
# int8 by default: on CPU the float head is the largest single read of a decode step (MolmoE-1B: 412 MB held as
# float32, 29 of 40 ms of a 2-layer step on the AMD CPU box; 116 MB and ~8.5 ms as int8) while its accuracy cost is
# small beside the INT4 body's (argmax agreement against the float head 98.2-98.8 %, largest logit error 0.04-0.07,
# benchmarks/RESULTS.md); int4 costs much more (76 %). The CLI's --head default repeats this (it may not import onnx).
DEFAULT_HEAD = "int8"


EXPERT_CHOICES = ("qmoe", "routed")


def make_quantizer(bits: int, block_size: int = 32, accuracy_level: int | None = None, head: str = DEFAULT_HEAD,
                   scales: str = "fp32", experts: str = "qmoe") -> BlockQuantizer:
    """A checked BlockQuantizer (one-line errors for unsupported settings). head: float, int8 or int4;
    experts: qmoe (one QMoE node per MoE layer) or routed (a MatMulNBits per expert matmul)."""
    if bits not in (4, 8):
        raise CalibrationError(f"--weights int{bits} is not supported; use int4 or int8")
    if block_size not in BLOCK_SIZES:
        raise CalibrationError(f"--block-size {block_size} is not supported; use one of {', '.join(map(str, BLOCK_SIZES))}")
    level = 4 if accuracy_level is None else int(accuracy_level)
    if level not in (0, 1, 2, 3, 4):
        raise CalibrationError(f"--accuracy-level {accuracy_level} must be 0-4 (0: fp32 compute, 4: int8 compute)")
    if scales not in ("fp32", "fp16"):
        raise CalibrationError(f"--scales {scales} is not supported; use fp32 or fp16")
    if head not in HEAD_CHOICES:
        raise CalibrationError(f"--head {head} is not supported; use {', '.join(HEAD_CHOICES)}")
    if experts not in EXPERT_CHOICES:
        raise CalibrationError(f"--experts {experts} is not supported; use {' or '.join(EXPERT_CHOICES)}")
    return BlockQuantizer(bits, block_size, level, HEAD_CHOICES[head], scales, experts)


def _external(t: onnx.TensorProto, folder: str) -> tuple[str, int, int] | None:
    if t.data_location != TensorProto.EXTERNAL:
        return None
    kv = {e.key: e.value for e in t.external_data}
    length = int(kv.get("length", 0)) or int(np.prod(t.dims)) * np.dtype(_DTYPES.get(t.data_type, np.float32)).itemsize
    return os.path.join(folder, kv["location"]), int(kv.get("offset", 0)), length


def mapped_weight(t: onnx.TensorProto, folder: str) -> np.ndarray:
    """A weight as stored: memory-mapped from its external data (no copy held), or inline."""
    ext = _external(t, folder)
    if ext is None:
        return numpy_helper.to_array(t)
    path, offset, _ = ext
    dtype = _DTYPES.get(t.data_type)
    if dtype is None:
        raise CalibrationError(f"weight {t.name} has ONNX type {t.data_type}; only float32/float16 weights can be quantized")
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(t.dims))


def _moe_blocks(graph: onnx.GraphProto, inits: dict, producer: dict, resolve: Callable[[str], str]) -> list[dict[str, Any]]:
    """The routed-expert blocks molmo-edge's portable decoder writes (export/onnx_graphs._moe), found by shape:
    the router MatMul (weight `<f>gate.weight`) reads `flat` = Reshape(h); the block's result is the one
    Reshape(sum, Shape(h)). Returns per block: prefix f, the flat input, the router logits, the result node."""
    shape_of = {n.input[0]: n.output[0] for n in graph.node if n.op_type == "Shape"}
    reshape_by_shape = {}
    for n in graph.node:
        if n.op_type == "Reshape" and len(n.input) > 1:
            reshape_by_shape.setdefault(n.input[1], []).append(n)
    blocks = []
    for node in graph.node:
        w = resolve(node.input[1]) if node.op_type == "MatMul" else ""
        if not w.endswith(".gate.weight") or w not in inits:
            continue
        f = w[:-len("gate.weight")]
        if f + "experts.0.gate_proj.weight" not in inits:
            continue
        flat = node.input[0]
        src = producer.get(flat)
        h = src.input[0] if src is not None and src.op_type == "Reshape" else None
        ends = reshape_by_shape.get(shape_of.get(h, ""), [])
        if len(ends) != 1:
            raise CalibrationError(f"the MoE block {f} is not the routed form molmo-edge writes; "
                                   "quantize with --experts routed, or export the bundle again")
        blocks.append({"prefix": f, "flat": flat, "logits": node.output[0], "end": ends[0],
                       "experts": sum(1 for n in inits if n.startswith(f + "experts.") and n.endswith(".gate_proj.weight"))})
    return blocks


def _moe_ops(graph: onnx.GraphProto, inits: dict, resolve: Callable[[str], str]) -> list[dict[str, Any]]:
    """The float onnxruntime MoE nodes of a fused decoder (export/onnx_fused.py): stacked fc1 [E, 2I, d] with gate/up
    rows interleaved, fc2 [E, d, I]; returned in _moe_blocks' form, with the stacked weights' names."""
    blocks = []
    for n in graph.node:
        if n.op_type == "MoE" and n.domain == "com.microsoft":
            fc1, fc2 = resolve(n.input[2]), resolve(n.input[4])
            top_k = next(a.i for a in n.attribute if a.name == "k")
            blocks.append({"prefix": fc1[:-len("experts.fc1")], "flat": n.input[0], "logits": n.input[1], "node": n,
                           "fc1": fc1, "fc2": fc2, "experts": int(inits[fc1].dims[0]), "top_k": top_k})
    return blocks


def quantize_graph(src: str, dst: str, q: BlockQuantizer, lm_head: str, progress: Callable[[str], None] = _say,
                   top_k: int = 0) -> dict[str, Any]:
    """Write `dst` (+ `dst`.data): the decoder at `src` with MatMulNBits for attention/FFN weights (and the LM head
    when q.head_bits is 4 or 8), and each MoE layer's experts as one QMoE node (q.experts "qmoe", top_k from the
    config) or as a MatMulNBits per expert matmul ("routed"); fp16 scales put Casts to fp16 activations around them.
    Nodes are rewritten first and only tensors the new graph reads are written (experts once, stacked)."""
    bits, block_size = q.bits, q.block_size
    folder = os.path.dirname(os.path.abspath(src))
    model = onnx.load(src, load_external_data=False)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def resolve(b: str) -> str:  # a MatMul's weight, through the Cast an fp16 bundle puts after it
        if b not in inits and b in producer and producer[b].op_type == "Cast" and producer[b].input[0] in inits:
            return producer[b].input[0]
        return b

    blocks = [b for b in _moe_ops(graph, inits, resolve) if q.packs_experts(*inits[b["fc2"]].dims[1:])]
    if top_k and q.experts == "qmoe":
        blocks += [b for b in _moe_blocks(graph, inits, producer, resolve)
                   if q.packs_experts(*inits[b["prefix"] + "experts.0.gate_proj.weight"].dims)]
    plan: dict[str, tuple[str, str]] = {}   # MatMul node name -> (weight initializer, kind)
    for node in graph.node:
        if node.op_type != "MatMul":
            continue
        b = resolve(node.input[1])
        if b in inits and len(inits[b].dims) == 2 and inits[b].data_type in _DTYPES:
            kind = "head" if q.head_bits and b in (lm_head, "lm_head.weight") else weight_kind(b, lm_head)
            if kind:
                plan[node.name] = (b, kind)
    if not plan:
        raise CalibrationError(f"{os.path.basename(src)} has no attention, FFN or expert MatMul weights to quantize; "
                               "is it a molmo-edge decoder graph?")
    qname = {w: "lm_head.weight" if kind == "head" else w for w, kind in plan.values()}  # the quantizer's name for the head
    width = {w: q.bits_for(n) for w, n in qname.items()}
    counts = {"attention": 0, "ffn": 0, "experts": 0, "head": 0}
    fresh = iter(range(1 << 30))

    def node_maker(out: list[onnx.NodeProto], hint: str) -> Callable[..., str]:
        def make(op: str, inputs: list[str], domain: str = "", **attrs) -> str:
            y = f"{hint}.{op.lower()}_{next(fresh)}"
            out.append(helper.make_node(op, inputs, [y], name=y, domain=domain, **attrs))
            return y
        return make

    nodes: list[onnx.NodeProto] = []
    half_of: dict[str, str] = {}
    ends = {(b["node"] if "node" in b else b["end"]).name: b for b in blocks}
    for node in graph.node:
        if node.name in ends:  # QMoE over the block's input: the float MoE node, or the routed branches, left dead
            b = ends[node.name]
            f = b["prefix"]
            names = {k: f"{f}experts.{k}.q{bits}" for k in ("fc1", "fc1_scales", "fc2", "fc2_scales")}
            make = node_maker(nodes, f + "experts")
            y = q.experts_node(make, b["flat"], b["logits"], names, b.get("top_k", top_k))
            if "node" in b:
                nodes.append(helper.make_node("Identity", [y], list(node.output), name=node.name))
            else:
                nodes.append(helper.make_node("Reshape", [y, node.input[1]], list(node.output), name=node.name))
            counts["experts"] += 3 * b["experts"]
            continue
        if node.name not in plan:
            nodes.append(node)
            continue
        w, kind = plan[node.name]
        k, n = (int(v) for v in inits[w].dims)
        a, y = node.input[0], list(node.output)
        if q.scales == "fp16":  # runtime/ort_ops.in_fp16's Casts, one per activation shared by its MatMulNBits
            if a not in half_of:
                half_of[a] = a + ".f16"
                nodes.append(helper.make_node("Cast", [a], [half_of[a]], name=node.name + ".cast_in", to=TensorProto.FLOAT16))
            a, y = half_of[a], [y[0] + ".f16"]
        nodes.append(helper.make_node("MatMulNBits", [a, f"{w}.q{width[w]}", f"{w}.q{width[w]}_scales"], y, name=node.name,
                                      domain="com.microsoft", K=k, N=n, bits=width[w], block_size=block_size,
                                      accuracy_level=q.accuracy_level))
        if q.scales == "fp16":
            nodes.append(helper.make_node("Cast", y, list(node.output), name=node.name + ".cast_out", to=TensorProto.FLOAT))
    # drop what nothing reads any more (the routed experts, Casts of fp16 weights, float weights)
    live = {o.name for o in graph.output}
    kept = []
    for node in reversed(nodes):
        if any(o in live for o in node.output):
            kept.append(node)
            live.update(x for x in node.input if x)
    kept.reverse()
    for node in kept:
        if node.name in plan:
            counts[plan[node.name][1]] += 1

    writer = ExternalDataWriter(dst + ".data")
    new_inits: list[onnx.TensorProto] = []
    before = after = 0
    singles = {t.name for t in graph.initializer if f"{t.name}.q{width.get(t.name, 0)}" in live}  # quantized one by one
    todo = len(singles) + len(blocks)
    done, t0 = 0, time.perf_counter()

    def tick() -> None:
        nonlocal done
        done += 1
        if done % 64 == 0 or done == todo:
            progress(f"[quantize] {done}/{todo} weights, {time.perf_counter() - t0:.0f} s")

    try:
        for t in graph.initializer:
            if t.name in singles:
                w = mapped_weight(t, folder)
                b, sc = q.quantize(np.asarray(w, np.float32), qname[t.name])
                new_inits += [tensor_proto(writer, f"{t.name}.q{width[t.name]}", b),
                              tensor_proto(writer, f"{t.name}.q{width[t.name]}_scales", sc)]
                before += int(np.prod(t.dims)) * np.dtype(_DTYPES[t.data_type]).itemsize
                after += b.nbytes + sc.nbytes
                tick()
            elif t.name in live:
                ext = _external(t, folder)
                if ext is None:
                    new_inits.append(t)
                    continue
                try:
                    offset, length = writer.copy_from(*ext, dtype=np.dtype(_DTYPES.get(t.data_type, np.float32)).name)
                except OSError as e:
                    raise CalibrationError(f"{e} (tensor {t.name})") from None
                new_inits.append(external_tensor(t.name, t.data_type, tuple(t.dims), writer.location, offset, length))
        for b in blocks:
            f = b["prefix"]
            if "node" in b:  # stacked fc1 (gate even rows, up odd) and fc2, [out, in] per expert
                fc1, fc2 = mapped_weight(inits[b["fc1"]], folder), mapped_weight(inits[b["fc2"]], folder)
                rows = {"gate_proj": (fc1, slice(0, None, 2)), "up_proj": (fc1, slice(1, None, 2)), "down_proj": (fc2, slice(None))}
                get = lambda e, nm: rows[nm][0][e, rows[nm][1]].T  # noqa: E731
                used = (b["fc1"], b["fc2"])
            else:
                get = lambda e, nm: mapped_weight(inits[f"{f}experts.{e}.{nm}.weight"], folder)  # noqa: E731
                used = tuple(n for n in inits if n.startswith(f + "experts."))
            packed = q.pack_experts(get, b["experts"])
            for key, arr in packed.items():
                new_inits.append(tensor_proto(writer, f"{f}experts.{key}.q{bits}", arr))
                after += arr.nbytes
            before += sum(int(np.prod(inits[n].dims)) * np.dtype(_DTYPES[inits[n].data_type]).itemsize for n in used)
            del packed
            tick()
    finally:
        writer.close()
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(new_inits)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    experts = ", experts as QMoE" if blocks else ""
    model.doc_string = f"molmo-edge decoder, weight-only int{bits} (MatMulNBits, block {block_size}, symmetric{experts})"
    model.ir_version = min(model.ir_version, 10)
    onnx.save_model(model, dst)
    return {"layers": counts, "weight_bytes_before": before, "weight_bytes_after": after, "nodes": len(kept),
            "weight_bytes_by_dtype": dict(writer.bytes_by_dtype), "experts_op": "com.microsoft.QMoE" if blocks else None}


def _check(bundle, key: str, ref_key: str, positions: int = 8) -> dict[str, Any]:
    """Logits of the quantized decoder vs the fp32 one on `positions` real token embeddings."""
    cfg = bundle.config
    emb = bundle.embeddings()
    rng = np.random.default_rng(0)
    ids = rng.integers(0, cfg.vocab_size, positions)
    ref = bundle.manifest["graphs"][ref_key]  # the source's KV layout and dtype, which the new graph keeps
    feeds = first_pass_feeds(np.asarray(emb[ids], np.float32)[None], kv_layout(ref), cfg.n_layers,
                             cfg.n_kv_heads, cfg.head_dim, kv_dtype(ref))
    if cfg.is_molmo2:  # its decoder takes the token types of the prefix mask (text here)
        feeds["token_types"] = np.zeros((1, positions), np.int64)
    out = {}
    for k in (ref_key, key):
        sess = open_session(bundle.graph_path(k))
        out[k] = sess.run(["logits"], feeds)[0][0].astype(np.float64)
        del sess
    a, b = out[ref_key], out[key]
    cos = float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))
    return {"positions": positions, "logit_cosine": cos, "max_abs_logit_diff": float(np.abs(a - b).max()),
            "argmax_agreement": float((a.argmax(-1) == b.argmax(-1)).mean())}


def quantize_decoder_weights(bundle_dir: str, bits: int, block_size: int = 32, progress: Callable[[str], None] = _say,
                             accuracy_level: int | None = None, check: bool = True, head: str = DEFAULT_HEAD,
                             scales: str = "fp32", experts: str = "qmoe") -> dict[str, Any]:
    """Add the weight-only quantized decoder flavour "decoder.int{bits}" to an existing bundle.

    bits: 4 or 8; block_size: 32, 64 or 128 (along the input dimension). accuracy_level:
    MatMulNBits' compute type (0: fp32 activations; 4: activations quantized to int8 per block
    inside the kernel, onnxruntime's fast CPU path). Default 4: on this project's CPU benchmark it
    made INT4 decode 2.2x faster than level 0 with the same logits cosine (0.9972 vs 0.9973), and
    8-bit weights have no fast level-0 kernel at all (benchmarks/results/int8.md).
    check: compare logits with the fp32 decoder on 8 positions when both fit in memory.
    head: "int8" (default), "float" or "int4": the LM head's storage (the check then includes its cost);
    scales: fp32 (default) or fp16 (half the scale bytes; fp16 activations into each MatMulNBits).
    experts (MoE models): "qmoe" (default; one onnxruntime QMoE node per layer) or "routed" (a MatMulNBits per
    expert matmul in the portable graph's routed branches: MolmoE-1B's INT4 decoder has 23,874 nodes that way, 515 with
    QMoE in the fused layout).
    Atomic: an interrupted run leaves the bundle as it was. Returns the new manifest entry.
    """
    from molmo_edge.runtime.bundle import Bundle, load_bundle

    q = make_quantizer(bits, block_size, accuracy_level, head, scales, experts)  # the one place settings are checked
    level = q.accuracy_level
    bundle = load_bundle(bundle_dir)
    from molmo_edge.runtime.hf_names import lm_head_name
    key, fname = f"decoder.int{bits}", f"decoder.int{bits}.onnx"
    if "decoder" not in bundle.manifest["graphs"]:
        raise CalibrationError(f"{bundle_dir} has no float decoder to quantize (it was exported with --weights); "
                               "export again without --weights, or with the --weights you want")
    # the fused decoder's layout (GroupQueryAttention, shared KV buffer) decodes faster on onnxruntime: quantize
    # it when the bundle has one (dense models by default), unless its MoE experts are to stay routed branches
    source = "decoder.fused" if "decoder.fused" in bundle.manifest["graphs"] and not (
        bundle.config.is_moe and experts == "routed") else "decoder"
    base = bundle.manifest["graphs"][source]
    return_large_frees()  # the tensors quantized one after another, and the self-check's
    t0 = time.perf_counter()
    progress(f"[quantize] {bundle_dir}: decoder weights -> int{bits}, block {block_size}, symmetric (MatMulNBits) ...")
    with staging(bundle_dir, f"int{bits}") as stage:
        cfg = bundle.config
        summary = quantize_graph(bundle.graph_path(source), os.path.join(stage, fname), q, lm_head_name(cfg), progress,
                                 top_k=cfg.moe_top_k if cfg.is_moe else 0)
        entry = {k: base[k] for k in ("opset", "inputs", "outputs", "dynamic_axes", "kv_layout") if k in base}
        entry.update({
            "file": fname, "data": fname + ".data",
            "file_bytes": os.path.getsize(os.path.join(stage, fname)),
            "data_bytes": os.path.getsize(os.path.join(stage, fname + ".data")),
            "precision": {"weights": f"int{bits}", "compute": "fp32" if level == 0 else "int8 activations (per block)",
                          "scheme": "symmetric, blockwise along the input dimension", "block_size": block_size,
                          "accuracy_level": level},
            "nodes": summary["nodes"],
            "weight_bytes_by_dtype": summary["weight_bytes_by_dtype"],
            "quantization": {"op": "com.microsoft.MatMulNBits", "bits": bits, "block_size": block_size,
                             "experts_op": summary["experts_op"],
                             "quantized": summary["layers"], "scales": scales, "head": head,
                             "kept_float": ["MoE router (mlp.gate)"] + ([] if head != "float" else ["lm_head"]) + ["norms"],
                             "weight_bytes_before": summary["weight_bytes_before"],
                             "weight_bytes_after": summary["weight_bytes_after"],
                             "source_graph": source,
                             "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        })
        if check:
            need = base.get("data_bytes", 0) + entry["data_bytes"]
            if need * 1.5 < 0.7 * mem_available(4 << 30):
                staged = dict(bundle.manifest, graphs=dict(bundle.manifest["graphs"]))
                staged["graphs"][key] = dict(entry, file=os.path.relpath(os.path.join(stage, fname), bundle_dir))
                entry["check"] = _check(Bundle(bundle.folder, staged, bundle.config), key, source)
                c = entry["check"]
                progress(f"[quantize] logits vs fp32 decoder on {c['positions']} positions: cosine {c['logit_cosine']:.5f}, "
                         f"argmax agreement {c['argmax_agreement']:.0%}")
            else:
                entry["check"] = {"skipped": "the fp32 and quantized decoders do not fit in memory together"}

        def update(m: dict[str, Any]) -> dict[str, Any]:
            m["graphs"][key] = entry
            return m

        commit(bundle_dir, stage, {fname: fname, fname + ".data": fname + ".data"}, update, replaces={f"graphs.{key}"})
    q = summary["layers"]
    progress(f"[quantize] done in {time.perf_counter() - t0:.0f} s: {fname} ({q['attention']} attention, {q['ffn']} FFN, "
             f"{q['experts']} expert matmuls; weights {summary['weight_bytes_before'] / 1e6:.1f} -> "
             f"{summary['weight_bytes_after'] / 1e6:.1f} MB)")
    return entry
