"""The explicit-quantization vision graph (vision.int8.onnx): QuantizeLinear/DequantizeLinear pairs
inserted in front of the weighted MatMuls of the fp32 graph (tensorrt-onnxruntime-notes.md §1.3).

- Weights: symmetric INT8, per output channel. MatMul weights are stored pre-transposed [in, out],
  so the channel axis is 1; they are stored as int8 initializers followed by a DequantizeLinear.
- Activations: symmetric INT8, per tensor (zero point 0), with the calibration scale of the tensor
  (the same value the TensorRT cache carries); one dedicated Q/DQ pair per consumer.
- Kept in float: LayerNorm, Softmax, QuickGELU/SiLU, residual and bias Adds, the patch embedding
  (a 588-wide pixel projection, by default) and, by default, the attention matmuls (Q·K^T, P·V).
- Outputs of quantized ops are not quantized; TensorRT fuses DQ -> MatMul into INT8 kernels and
  onnxruntime into MatMulIntegerToFloat.

Graph inputs and outputs keep their names, so the runtime's backend runs it unchanged.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from molmo_edge.calibration import CalibrationError
from molmo_edge.calibration.stats import GraphInfo

DEFAULT_EXCLUDE = ("*patch_embedding*",)


@dataclass
class QuantLayer:
    """A MatMul with a constant weight: what gets Q/DQ."""
    name: str          # layer name: the weight's name without ".weight"
    node: str          # ONNX node name
    input: str         # activation tensor (its scale is calibrated)
    weight: str        # the float initializer (fp32, or fp16 behind a Cast)
    output: str
    cast: str | None = None   # the Cast node between an fp16 initializer and the MatMul

    def to_dict(self) -> dict[str, str]:
        return {"layer": self.name, "node": self.node, "input": self.input, "weight": self.weight}


@dataclass
class AttentionMatMul:
    node: str
    inputs: tuple[str, str]
    output: str


def layer_matches(layer: str, patterns: Iterable[str]) -> bool:
    """A layer matches a pattern given as a glob on the full name, or as whole dotted components
    (`resblocks.3` matches `...resblocks.3.attention.wq` but not `...resblocks.30...`)."""
    for p in patterns:
        if fnmatch.fnmatchcase(layer, p) or ("." + p.strip(".") + ".") in ("." + layer + "."):
            return True
    return False


def _weight_of(info: GraphInfo, name: str) -> tuple[str, str | None] | None:
    """(initializer, cast node) if `name` is a 2-D float weight, directly or through a Cast."""
    inits = {i.name: i for i in info.model.graph.initializer}
    if name in inits:
        init = inits[name]
        if len(init.dims) == 2 and init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return name, None
        return None
    prod = info.producer.get(name)
    if prod is not None and prod.op_type == "Cast" and prod.input[0] in inits:
        init = inits[prod.input[0]]
        if len(init.dims) == 2 and init.data_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            return prod.input[0], prod.name
    return None


def find_layers(info: GraphInfo) -> tuple[list[QuantLayer], list[AttentionMatMul]]:
    """Every MatMul of an activation by a constant 2-D weight, and every activation x activation MatMul."""
    layers, attn = [], []
    for node in info.model.graph.node:
        if node.op_type != "MatMul":
            continue
        a, b = node.input[0], node.input[1]
        w = _weight_of(info, b)
        if w is not None and not info.constant(a):
            init, cast = w
            name = init[: -len(".weight")] if init.endswith(".weight") else init
            layers.append(QuantLayer(name, node.name, a, init, node.output[0], cast))
        elif w is None and not info.constant(a) and not info.constant(b):
            attn.append(AttentionMatMul(node.name, (a, b), node.output[0]))
    return layers, attn


def select_layers(layers: Sequence[QuantLayer], exclude: Iterable[str] = (), default_exclude: Iterable[str] = DEFAULT_EXCLUDE
                  ) -> tuple[list[QuantLayer], list[QuantLayer]]:
    """(quantized, kept float). Unknown --exclude patterns are an error (a typo would silently do nothing)."""
    exclude = list(exclude)
    for p in exclude:
        if not any(layer_matches(l.name, [p]) or p in (l.input, l.node, l.output) for l in layers):
            sample = ", ".join(l.name.split("image_vit.")[-1] for l in layers[:3])
            raise CalibrationError(f"--exclude {p!r} matches no quantizable layer; use layer names or globs such as "
                                   f"'*resblocks.22*' or 'resblocks.3.feed_forward.w2' (layers look like {sample}, ...)")
    keep, quant = [], []
    for l in layers:
        hit = layer_matches(l.name, list(default_exclude) + exclude) or any(p in (l.input, l.node, l.output) for p in exclude)
        (keep if hit else quant).append(l)
    return quant, keep


def quantize_weight(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel INT8 of a [in, out] weight: (int8 [in, out], float32 scale [out])."""
    w = np.asarray(w, np.float32)
    amax = np.abs(w).max(axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def fake_quant(x: np.ndarray, scale: float) -> np.ndarray:
    """QuantizeLinear -> DequantizeLinear of int8 with zero point 0, as onnxruntime computes it."""
    s = np.float32(scale)
    return (np.clip(np.rint(np.asarray(x, np.float32) / s), -128, 127) * s).astype(np.float32)


def build_qdq_model(src: str, dst: str, scales: dict[str, float], layers: Sequence[QuantLayer],
                    attention: Sequence[AttentionMatMul] = (), doc: str = "") -> dict:
    """Write `dst` (+ `dst`.data): the graph at `src` with Q/DQ on `layers` (and `attention` matmuls).
    Returns a summary {layers, attention_matmuls, weight_bytes, ...}."""
    if os.path.exists(dst) or os.path.exists(dst + ".data"):
        raise CalibrationError(f"{dst} already exists; refusing to overwrite a graph in place")
    model = onnx.load(src, load_external_data=True)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_node = {n.name: n for n in graph.node}
    new_inits: list[onnx.TensorProto] = []
    zero = "qdq.zero_point.int8"
    new_inits.append(numpy_helper.from_array(np.array(0, np.int8), zero))
    act_scale_names: dict[str, str] = {}
    inserted: dict[str, list[onnx.NodeProto]] = {}   # node name -> Q/DQ nodes to place before it
    weight_bytes = 0

    def act_scale(t: str) -> str:
        if t not in scales:
            raise CalibrationError(f"no calibration scale for activation {t!r}; re-run `molmo-edge calibrate`")
        if t not in act_scale_names:
            name = f"{t}.qdq_scale"
            new_inits.append(numpy_helper.from_array(np.array(scales[t], np.float32), name))
            act_scale_names[t] = name
        return act_scale_names[t]

    def qdq_act(t: str, consumer: str) -> str:
        s = act_scale(t)
        q, dq = f"{t}/Q/{consumer}", f"{t}/DQ/{consumer}"
        inserted.setdefault(consumer, []).extend([
            helper.make_node("QuantizeLinear", [t, s, zero], [q], name=f"{consumer}/QuantizeLinear_{t}"),
            helper.make_node("DequantizeLinear", [q, s, zero], [dq], name=f"{consumer}/DequantizeLinear_{t}")])
        return dq

    done_weights: dict[str, str] = {}
    for l in layers:
        node = by_node[l.node]
        if l.weight not in done_weights:
            w = numpy_helper.to_array(inits[l.weight], base_dir=os.path.dirname(os.path.abspath(src))).astype(np.float32)
            q, s = quantize_weight(w)
            qn, sn, zn = f"{l.weight}.int8", f"{l.weight}.qdq_scale", f"{l.weight}.qdq_zero_point"
            new_inits += [numpy_helper.from_array(q, qn), numpy_helper.from_array(s, sn),
                          numpy_helper.from_array(np.zeros(s.shape, np.int8), zn)]
            weight_bytes += q.nbytes + s.nbytes
            dq = f"{l.weight}/DQ"
            done_weights[l.weight] = dq
            inserted.setdefault(l.node, []).append(
                helper.make_node("DequantizeLinear", [qn, sn, zn], [dq], name=f"{l.name}/DequantizeLinear_weight", axis=1))
        node.input[0] = qdq_act(l.input, l.node)
        node.input[1] = done_weights[l.weight]
    for m in attention:
        node = by_node[m.node]
        node.input[0] = qdq_act(m.inputs[0], m.node)
        node.input[1] = qdq_act(m.inputs[1], m.node)

    nodes: list[onnx.NodeProto] = []
    for n in graph.node:
        nodes.extend(inserted.get(n.name, []))
        nodes.append(n)
    # drop what no longer feeds anything (the float weights, their Casts)
    outputs = {o.name for o in graph.output}
    live: set[str] = set(outputs)
    kept: list[onnx.NodeProto] = []
    for n in reversed(nodes):
        if any(o in live for o in n.output):
            kept.append(n)
            live.update(x for x in n.input if x)
    kept.reverse()
    all_inits = [i for i in graph.initializer if i.name in live] + [i for i in new_inits if i.name in live]
    del graph.node[:]
    graph.node.extend(kept)
    del graph.initializer[:]
    graph.initializer.extend(all_inits)
    if doc:
        model.doc_string = doc
    model.ir_version = min(model.ir_version, 10)
    location = os.path.basename(dst) + ".data"
    onnx.save_model(model, dst, save_as_external_data=True, all_tensors_to_one_file=True, location=location,
                    size_threshold=1024)
    return {"layers": len(layers), "attention_matmuls": len(attention), "int8_weight_bytes": weight_bytes,
            "nodes": len(kept), "data": location if os.path.exists(os.path.join(os.path.dirname(dst), location)) else None}
