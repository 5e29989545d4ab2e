"""What loading a graph on onnxruntime needs to know about its .onnx file: which bytes of its external data
are read only while it loads, and its fp16 weight Casts moved first so each runs when used. Read from the file
itself with the project's protobuf reader (runtime.onnx_reader: no onnx package, no weights read).

MLAS repacks MatMulNBits and QMoE weights at load, scales included (the scale and block sum of each block
sit beside its nibbles in the repacked buffer); on x86 onnxruntime still keeps the original scales tensor
(PrePack reports it unpacked), mapped, and never reads it again (runtime.machine.drop_mapped_pages)."""
from __future__ import annotations

import os

from molmo_edge.runtime.onnx_reader import OnnxReadError, field_spans, parse_onnx, read_onnx

# op type -> input indices that are scales repacked with the weights (onnxruntime's com.microsoft schemas)
LOAD_ONLY_INPUTS = {"MatMulNBits": (2,), "QMoE": (3, 6)}
_MODEL_GRAPH, _GRAPH_NODE = 7, 1  # onnx.proto field numbers: ModelProto.graph, GraphProto.node


def load_only_ranges(onnx_path: str) -> list[tuple[str, int, int]]:
    """(external data file, offset, length) of the initializers onnxruntime reads only while loading this graph
    (LOAD_ONLY_INPUTS); [] for a graph without them or a file the reader cannot parse."""
    try:
        graph = read_onnx(onnx_path).graph
    except OnnxReadError:
        return []
    wanted = {n.inputs[k] for n in graph.nodes for k in LOAD_ONLY_INPUTS.get(n.op_type, ()) if k < len(n.inputs)}
    folder = os.path.dirname(onnx_path)
    out = []
    for name in wanted:
        ext = graph.initializers[name].external if name in graph.initializers else None
        if ext and "location" in ext and "length" in ext:
            out.append((os.path.join(folder, ext["location"]), int(ext.get("offset", 0)), int(ext["length"])))
    return sorted(out)


def weight_casts_first(onnx_path: str) -> bytes | None:
    """The model's bytes with its Casts of fp16 weights moved to the front of the node list, or None when it has
    none (or cannot be read). With constant folding off, onnxruntime then runs each Cast just before the node that
    uses it and frees its float32 output after (measured, full-width MolmoE-1B vision, 2 crops: 0.25 GiB peak
    anonymous; the Casts in export order: 0.89, as all ran first). Node order is free in a protobuf message and
    onnxruntime sorts the graph itself; only the graph's node fields move, so no length prefix changes."""
    try:
        with open(onnx_path, "rb") as f:
            data = f.read()
        graph = parse_onnx(data, onnx_path).graph
        buf = memoryview(data)
        _, _, _, g0, g1 = next(s for s in field_spans(buf) if s[0] == _MODEL_GRAPH)
    except (OSError, OnnxReadError, ValueError, IndexError, StopIteration):
        return None
    fp16 = {n for n, t in graph.initializers.items() if t.dtype == "FP16"}
    casts = [n.op_type == "Cast" and bool(n.inputs) and n.inputs[0] in fp16 for n in graph.nodes]
    if not any(casts):
        return None
    first, rest, i = [], [], 0
    for num, _, start, _, end in field_spans(buf, g0, g1):
        is_cast = num == _GRAPH_NODE and casts[i]
        i += num == _GRAPH_NODE
        (first if is_cast else rest).append(data[start:end])
    return data[:g0] + b"".join(first + rest) + data[g1:]
