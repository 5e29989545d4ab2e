"""What onnxruntime's contrib kernels need of the graphs written for them, in one place for export (the graph
builder, the fused decoder) and calibration (quantize's rewrite). No onnx import: the runtime stays light."""
from __future__ import annotations

from typing import Any, Sequence

FLOAT, FLOAT16 = 1, 10  # onnx TensorProto data types


def in_fp16(make: Any, inputs: Sequence[str], compute: Any) -> str:
    """compute(*inputs cast to fp16), its output cast back to float32, through make(op_type, inputs, **attrs) -> name.
    onnxruntime's MatMulNBits and QMoE take activations of their scales' dtype, and its CPU GroupQueryAttention
    takes a KV cache of its activations' dtype: fp16 scales or an fp16 cache put the op between these Casts.
    (quantize_graph writes the same Casts as raw nodes, one per activation shared by several MatMulNBits.)"""
    return make("Cast", [compute(*(make("Cast", [x], to=FLOAT16) for x in inputs))], to=FLOAT)
