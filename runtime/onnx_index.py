"""Which bytes of a graph's external data onnxruntime reads only while it loads, read from the .onnx file
itself with the project's protobuf reader (runtime.tensorrt.onnx_reader: no onnx package, no weights read).

MLAS repacks MatMulNBits and QMoE weights at load, scales included (the scale and block sum of each block
sit beside its nibbles in the repacked buffer); on x86 onnxruntime still keeps the original scales tensor
(PrePack reports it unpacked), mapped, and never reads it again (runtime.machine.drop_mapped_pages)."""
from __future__ import annotations

import os

from molmo_edge.runtime.tensorrt.onnx_reader import TrtCheckError, read_onnx

# op type -> input indices that are scales repacked with the weights (onnxruntime's com.microsoft schemas)
LOAD_ONLY_INPUTS = {"MatMulNBits": (2,), "QMoE": (3, 6)}


def load_only_ranges(onnx_path: str) -> list[tuple[str, int, int]]:
    """(external data file, offset, length) of the initializers onnxruntime reads only while loading this graph
    (LOAD_ONLY_INPUTS); [] for a graph without them or a file the reader cannot parse."""
    try:
        graph = read_onnx(onnx_path).graph
    except TrtCheckError:
        return []
    wanted = {n.inputs[k] for n in graph.nodes for k in LOAD_ONLY_INPUTS.get(n.op_type, ()) if k < len(n.inputs)}
    folder = os.path.dirname(onnx_path)
    out = []
    for name in wanted:
        ext = graph.initializers[name].external if name in graph.initializers else None
        if ext and "location" in ext and "length" in ext:
            out.append((os.path.join(folder, ext["location"]), int(ext.get("offset", 0)), int(ext["length"])))
    return sorted(out)
