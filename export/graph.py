"""A small ONNX graph builder that streams initializers into one external-data file as they are
added, so a model far larger than RAM is written tensor by tensor (MolmoE-1B: 29 GB of fp32).

The data file comes from the runtime's one external-data writer (runtime/external_data.py), which
aligns large tensors so onnxruntime memory-maps them. A weight is converted (dtype, transpose) in
one copy at most and written from that buffer.

`quantizer` (optional, passed in by the CLI: export may not import calibration) turns the linear
layers it `wants` into onnxruntime MatMulNBits nodes as they are written, so `export --weights int4`
never puts a float decoder on disk."""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper

from molmo_edge.runtime.external_data import ExternalDataWriter, tensor_proto
from molmo_edge.runtime.ort_ops import in_fp16

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.bool_): TensorProto.BOOL}


class WeightQuantizer(Protocol):
    """What GraphBuilder needs of a weight-only quantizer (calibration.weight_quant.BlockQuantizer)."""
    bits: int
    block_size: int
    accuracy_level: int

    def wants(self, name: str) -> bool: ...
    def bits_for(self, name: str) -> int: ...
    def quantize(self, w_in_out: np.ndarray, name: str = "") -> tuple[np.ndarray, np.ndarray]: ...
    def dequantize(self, b: np.ndarray, scales: np.ndarray, k: int, name: str = "") -> np.ndarray: ...
    def packs_experts(self, d_model: int, inner: int) -> bool: ...
    def pack_experts(self, get_in_out: Any, n_experts: int) -> dict[str, np.ndarray]: ...
    def experts_node(self, make: Any, x: str, logits: str, weights: dict[str, str], top_k: int) -> str: ...


class GraphBuilder:
    def __init__(self, name: str, data_path: str, weight_dtype: np.dtype = np.float32, opset: int = 18,
                 quantizer: WeightQuantizer | None = None):
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weight_dtype = np.dtype(weight_dtype)
        self._data = ExternalDataWriter(data_path)
        self.quantizer = quantizer
        self.quantized: list[str] = []
        self._n = 0
        self._consts: dict[tuple, str] = {}

    def _fresh(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    # --- values --------------------------------------------------------------------------
    def input(self, name: str, elem: int, shape: Sequence[Any]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def declare_output(self, name: str, elem: int, shape: Sequence[Any]) -> str:
        """Make an existing value (a node output named `name`) a graph output, without a copy."""
        self.outputs.append(helper.make_tensor_value_info(name, elem, list(shape)))
        return name

    def output(self, value: str, name: str, elem: int, shape: Sequence[Any]) -> str:
        self.op("Identity", [value], outputs=[name])
        return self.declare_output(name, elem, shape)

    def _tensor(self, name: str, arr: np.ndarray) -> onnx.TensorProto:
        return tensor_proto(self._data, name, arr)

    def raw(self, name: str, arr: np.ndarray) -> str:
        """An initializer stored exactly as given (packed quantized weights, their scales)."""
        self.inits.append(self._tensor(name, arr))
        return name

    def weight(self, name: str, arr: np.ndarray, transpose: bool = False) -> str:
        """A float parameter stored in the bundle's weight dtype; a Cast back to float32 follows when stored as fp16."""
        arr = np.asarray(arr)
        stored = np.ascontiguousarray(arr.T if transpose else arr, dtype=self.weight_dtype)  # one copy at most
        self.inits.append(self._tensor(name, stored))
        if self.weight_dtype == np.float32:
            return name
        return self.op("Cast", [name], to=TensorProto.FLOAT, name_hint=name + "_f32")

    def const(self, value: Any, dtype=np.int64) -> str:
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            name = self._fresh("const")
            self.inits.append(self._tensor(name, arr))
            self._consts[key] = name
        return self._consts[key]

    def op(self, op_type: str, inputs: Sequence[str], outputs: Sequence[str] | None = None, n_out: int = 1,
           name_hint: str | None = None, domain: str = "", **attrs) -> Any:
        if outputs is None:
            base = self._fresh(name_hint or op_type.lower())
            outputs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), list(outputs), name=self._fresh(op_type), domain=domain, **attrs))
        return outputs[0] if len(outputs) == 1 else list(outputs)

    # --- common patterns -----------------------------------------------------------------
    def reduce(self, op_type: str, x: str, axes: Sequence[int], keepdims: int = 1) -> str:
        """Reduce* over `axes`: an input from opset 18 (ReduceSum from 13), an attribute before."""
        if self.opset >= 18 or op_type == "ReduceSum":
            return self.op(op_type, [x, self.const(list(axes))], keepdims=keepdims)
        return self.op(op_type, [x], axes=list(axes), keepdims=keepdims)

    def linear(self, x: str, w: np.ndarray, b: np.ndarray | None, name: str) -> str:
        """x @ w.T (+ b): weights stored pre-transposed [in, out] for MatMul (MatMulNBits when quantized)."""
        q = self.quantizer
        if q is not None and q.wants(name + ".weight"):
            k, n = w.shape[1], w.shape[0]
            bits = q.bits_for(name + ".weight")
            packed, scales = q.quantize(np.asarray(w).T, name + ".weight")  # converted to float32 a slice at a time
            bn, sn = self.raw(name + f".weight.q{bits}", packed), self.raw(name + f".weight.q{bits}_scales", scales)
            self.quantized.append(name + ".weight")
            def matmul(a: str) -> str:
                return self.op("MatMulNBits", [a, bn, sn], domain="com.microsoft", K=k, N=n, bits=bits,
                               block_size=q.block_size, accuracy_level=q.accuracy_level, name_hint=name)
            y = in_fp16(self.op, [x], matmul) if scales.dtype == np.float16 else matmul(x)
            return y if b is None else self.op("Add", [y, self.weight(name + ".bias", b)])
        y = self.op("MatMul", [x, self.weight(name + ".weight", w, transpose=True)], name_hint=name)
        if b is not None:
            y = self.op("Add", [y, self.weight(name + ".bias", b)])
        return y

    def rms_norm(self, x: str, w: np.ndarray, eps: float, name: str) -> str:
        var = self.reduce("ReduceMean", self.op("Mul", [x, x]), [-1])
        inv = self.op("Reciprocal", [self.op("Sqrt", [self.op("Add", [var, self.const(eps, np.float32)])])])
        return self.op("Mul", [self.weight(name + ".weight", w), self.op("Mul", [x, inv])], name_hint=name)

    def silu(self, x: str) -> str:
        return self.op("Mul", [x, self.op("Sigmoid", [x])])

    @property
    def bytes_by_dtype(self) -> dict[str, int]:
        return dict(self._data.bytes_by_dtype)

    @property
    def padding_bytes(self) -> int:
        """Bytes of alignment padding in the data file (what mmap-friendly offsets cost)."""
        return self._data.padding

    def finish(self, path: str, doc: str = "") -> onnx.ModelProto:
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        domains = sorted({n.domain for n in self.nodes if n.domain})
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)]
                                  + [helper.make_opsetid(dom, 1) for dom in domains], producer_name="molmo-edge", doc_string=doc)
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime >= 1.17 and TensorRT 10.3
        onnx.save_model(model, path)
        return model
