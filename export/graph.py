"""A small ONNX graph builder that streams initializers into one external-data file as they are
added, so a model far larger than RAM is written tensor by tensor (MolmoE-1B: 29 GB of fp32)."""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

_NP_TO_ONNX = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16,
               np.dtype(np.int64): TensorProto.INT64, np.dtype(np.int32): TensorProto.INT32,
               np.dtype(np.bool_): TensorProto.BOOL}
INLINE_LIMIT = 1024  # bytes: smaller tensors (shapes, scalars) stay inside the .onnx file


class GraphBuilder:
    def __init__(self, name: str, data_path: str, weight_dtype: np.dtype = np.float32, opset: int = 18):
        self.name = name
        self.opset = opset
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.weight_dtype = np.dtype(weight_dtype)
        self._data_path = data_path
        self._data = open(data_path, "wb")
        self._offset = 0
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
        arr = np.ascontiguousarray(arr)
        if arr.nbytes <= INLINE_LIMIT:
            return numpy_helper.from_array(arr, name)
        t = onnx.TensorProto(name=name, data_type=_NP_TO_ONNX[arr.dtype], dims=arr.shape)
        pad = (-self._offset) % 64  # aligned for mmap
        if pad:
            self._data.write(b"\0" * pad)
            self._offset += pad
        self._data.write(arr.tobytes())
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", os.path.basename(self._data_path)), ("offset", str(self._offset)),
                     ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        self._offset += arr.nbytes
        return t

    def weight(self, name: str, arr: np.ndarray, transpose: bool = False) -> str:
        """A float parameter stored in the bundle's weight dtype; a Cast back to float32 follows when stored as fp16."""
        arr = np.asarray(arr, dtype=np.float32)
        if transpose:
            arr = arr.T
        stored = arr.astype(self.weight_dtype)
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
        """x @ w.T (+ b): weights stored pre-transposed [in, out] for MatMul."""
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

    def finish(self, path: str, doc: str = "") -> onnx.ModelProto:
        self._data.close()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        domains = sorted({n.domain for n in self.nodes if n.domain})
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)]
                                  + [helper.make_opsetid(dom, 1) for dom in domains], producer_name="molmo-edge", doc_string=doc)
        model.ir_version = min(model.ir_version, 10)  # readable by onnxruntime >= 1.17 and TensorRT 10.3
        onnx.save_model(model, path)
        return model
