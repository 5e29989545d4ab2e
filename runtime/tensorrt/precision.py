"""fp32 islands of an fp16 TensorRT build: which layers keep float32, found in the ONNX graph and set on
the parsed network with the TensorRT 10.3/10.13 per-layer API (ILayer.precision, ILayer.set_output_type,
obeyed under BuilderFlag.OBEY_PRECISION_CONSTRAINTS).

What stays fp32 and why (fp16 holds at most 65504 and has ~3 decimal digits):
- norms: RMSNorm's sum of squares (x*x overflows fp16 for |x| > 256, and the mean of many squares loses
  digits), its eps add, sqrt and reciprocal; whole LayerNormalization nodes;
- softmax (exp of large logits; the row sum over a long context);
- the MoE router: the gate MatMul's logits, their softmax, TopK and the routing weights picked from it (a
  rounding flip changes which experts run);
- RoPE: the angle position * inv_freq (position 4096 in fp16 is exact only to 4, so cos/sin would be
  noise), cos/sin and the rotation products.
Everything else (the big MatMuls, activations, residual adds) is free to run in fp16.

Strongly typed networks (the INT8 Q/DQ vision graph) take precision from the graph and accept no layer
precision; nothing is set there.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from molmo_edge.runtime.onnx_reader import Graph

# TensorRT layer types kept fp32 whatever their names (a node may become several layers; these catch the
# helper layers the parser adds, whose output names are not ONNX names)
FP32_LAYER_TYPES = {"SOFTMAX": "softmax", "NORMALIZATION": "layernorm"}
_CHAIN = ("Add", "Sqrt", "Reciprocal", "Div")      # after ReduceMean(x*x): + eps, sqrt, 1/...
_ROPE_UP = ("Cast", "Unsqueeze", "Mul", "Concat", "Reshape", "Expand", "Transpose")


def fp32_islands(graph: Graph) -> dict[str, str]:
    """ONNX value name -> reason ("rmsnorm", "layernorm", "softmax", "router", "rope") for every node output
    that must stay float32 in an fp16 build of `graph`."""
    producer = {o: n for n in graph.nodes for o in n.outputs}
    consumers: dict[str, list[Any]] = defaultdict(list)
    for n in graph.nodes:
        for i in n.inputs:
            consumers[i].append(n)
    out: dict[str, str] = {}

    def mark(node: Any, why: str) -> None:
        for o in node.outputs:
            out.setdefault(o, why)

    for n in graph.nodes:
        if n.op_type == "Softmax":
            routed = any(c.op_type == "TopK" for c in consumers[n.outputs[0]])
            mark(n, "router" if routed else "softmax")
            if routed:
                gate = producer.get(n.inputs[0])
                if gate is not None and gate.op_type in ("MatMul", "Gemm", "Add"):
                    mark(gate, "router")
                    if gate.op_type == "Add" and producer.get(gate.inputs[0]) is not None:
                        mark(producer[gate.inputs[0]], "router")          # MatMul + bias
                for topk in (c for c in consumers[n.outputs[0]] if c.op_type == "TopK"):
                    out.setdefault(topk.outputs[0], "router")             # values, not the int indices
                    for c in consumers[topk.outputs[0]]:                 # the routing weights picked from them
                        if c.op_type in ("Where", "ReduceSum", "Mul", "Div", "Gather"):
                            mark(c, "router")
                            for c2 in consumers[c.outputs[0]]:
                                if c2.op_type == "ReduceSum":
                                    mark(c2, "router")
        elif n.op_type == "LayerNormalization":
            mark(n, "layernorm")
        elif n.op_type == "ReduceMean":
            sq = producer.get(n.inputs[0])
            squared = sq is not None and ((sq.op_type == "Mul" and len(sq.inputs) == 2 and sq.inputs[0] == sq.inputs[1])
                                          or sq.op_type == "Pow")
            if not squared:
                continue
            mark(sq, "rmsnorm")
            mark(n, "rmsnorm")
            cur = n
            for _ in range(len(_CHAIN)):
                nxt = [c for c in consumers[cur.outputs[0]] if c.op_type in _CHAIN]
                if len(nxt) != 1:
                    break
                cur = nxt[0]
                mark(cur, "rmsnorm")
        elif n.op_type in ("Cos", "Sin"):
            mark(n, "rope")
            todo = [producer.get(i) for i in n.inputs]
            while todo:                                                    # the angle, back to position_ids
                p = todo.pop()
                if p is None or p.op_type not in _ROPE_UP or all(o in out for o in p.outputs):
                    continue
                mark(p, "rope")
                todo += [producer.get(i) for i in p.inputs]
            for c in consumers[n.outputs[0]]:                              # x*cos, rot(x)*sin, their sum
                if c.op_type == "Mul":
                    mark(c, "rope")
                    for c2 in consumers[c.outputs[0]]:
                        if c2.op_type == "Add":
                            mark(c2, "rope")
    return out


def _type_name(layer: Any) -> str:
    t = layer.type
    return getattr(t, "name", None) or str(t).split(".")[-1]


def constrain_network(trt: Any, network: Any, islands: dict[str, str]) -> dict[str, int]:
    """Set float32 precision and output types on the layers that produce an island value or are of an
    always-fp32 type; returns how many layers per reason. Integer/bool outputs (TopK indices, shapes) keep
    their type. The caller sets BuilderFlag.OBEY_PRECISION_CONSTRAINTS so TensorRT obeys them."""
    counts: dict[str, int] = defaultdict(int)
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        outs = [layer.get_output(j) for j in range(layer.num_outputs)]
        why = next((islands[t.name] for t in outs if t is not None and t.name in islands), None)
        why = why or FP32_LAYER_TYPES.get(_type_name(layer))
        if why is None:
            continue
        floats = (trt.float32, trt.float16)
        float_outs = [j for j, t in enumerate(outs) if t is not None and t.dtype in floats]
        if not float_outs:
            continue
        ins = [layer.get_input(k) for k in range(layer.num_inputs)]
        if all(t is None or t.dtype in floats for t in ins):
            layer.precision = trt.float32    # not on Cast(int64 positions) / Where(bool) / Gather(int): outputs only
        for j in float_outs:
            layer.set_output_type(j, trt.float32)
        counts[why] += 1
    return dict(counts)
