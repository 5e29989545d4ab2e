"""A minimal reader of the ONNX protobuf: only the fields check-trt and the onnxruntime loader need (graph,
nodes, attributes, value types, initializer metadata and external-data references, field byte spans). No onnx
package, and external weights are never read, so it runs on a robot and on multi-GB graphs alike."""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

from molmo_edge.runtime.errors import MolmoEdgeError


class OnnxReadError(MolmoEdgeError):
    """A graph cannot be read (unreadable file, not an ONNX model); check-trt also raises it for what it cannot
    check (runtime.tensorrt.check.TrtCheckError)."""


# ---------------------------------------------------------------------------------------------
# onnx.proto TensorProto.DataType -> operators.md type names (None: TensorRT has no such type)
ONNX_TYPES: dict[int, str] = {1: "FP32", 2: "UINT8", 3: "INT8", 4: "UINT16", 5: "INT16", 6: "INT32", 7: "INT64",
                              8: "STRING", 9: "BOOL", 10: "FP16", 11: "DOUBLE", 12: "UINT32", 13: "UINT64",
                              14: "COMPLEX64", 15: "COMPLEX128", 16: "BF16", 17: "FP8", 18: "FP8E4M3FNUZ",
                              19: "FP8E5M2", 20: "FP8E5M2FNUZ", 21: "UINT4", 22: "INT4", 23: "FP4"}
_ELEM_BITS = {"FP32": 32, "UINT8": 8, "INT8": 8, "UINT16": 16, "INT16": 16, "INT32": 32, "INT64": 64, "BOOL": 8,
              "FP16": 16, "DOUBLE": 64, "UINT32": 32, "UINT64": 64, "COMPLEX64": 64, "COMPLEX128": 128, "BF16": 16,
              "FP8": 8, "FP8E4M3FNUZ": 8, "FP8E5M2": 8, "FP8E5M2FNUZ": 8, "UINT4": 4, "INT4": 4, "FP4": 4}
_STRUCT = {"FP32": "f", "DOUBLE": "d", "INT8": "b", "UINT8": "B", "INT16": "h", "UINT16": "H", "INT32": "i",
           "INT64": "q", "UINT32": "I", "UINT64": "Q", "BOOL": "?"}


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 70:
            raise ValueError("malformed varint")


def field_spans(buf: memoryview, pos: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, field end) of each field of the message in buf[pos:end]:
    the byte spans, so a caller can reorder a message's fields without re-encoding them."""
    end = len(buf) if end is None else end
    while pos < end:
        start = pos
        key, pos = _varint(buf, pos)
        num, wire = key >> 3, key & 7
        if wire == 0:
            _, nxt = _varint(buf, pos)
        elif wire == 1:
            nxt = pos + 8
        elif wire == 2:
            n, pos = _varint(buf, pos)
            nxt = pos + n
        elif wire == 5:
            nxt = pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if nxt > end:
            raise ValueError("truncated protobuf message")
        yield num, wire, start, pos, nxt
        pos = nxt


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value): ints for varint/fixed, memoryview slices for length-delimited."""
    for num, wire, _, a, b in field_spans(buf):
        yield num, wire, (_varint(buf, a)[0] if wire == 0 else buf[a:b])


def _signed(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


def _ints(wire: int, val: Any) -> list[int]:
    """A repeated int64 field element: one varint, or a packed run of them."""
    if wire == 0:
        return [_signed(val)]
    out, pos = [], 0
    while pos < len(val):
        v, pos = _varint(val, pos)
        out.append(_signed(v))
    return out


def _str(val: memoryview) -> str:
    return bytes(val).decode("utf-8", errors="replace")


@dataclass
class Tensor:
    name: str
    dtype: str | None
    dims: list[int]
    external: dict[str, str] | None = None   # external_data key -> value when data_location == EXTERNAL
    raw: bytes | None = None                 # raw_data when inline
    typed: list[Any] = field(default_factory=list)  # int32_data/int64_data/float_data when inline

    def values(self) -> list[Any] | None:
        """The tensor's values when inline and numeric (for small constants: axes, K, zero points)."""
        if self.external is not None:
            return None
        if self.raw is not None and self.dtype in _STRUCT:
            fmt = "<" + _STRUCT[self.dtype] * (len(self.raw) // struct.calcsize(_STRUCT[self.dtype]))
            return list(struct.unpack(fmt, self.raw))
        if self.raw is not None and self.dtype in ("FP16",):
            return [struct.unpack("<e", self.raw[i:i + 2])[0] for i in range(0, len(self.raw), 2)]
        return list(self.typed) if self.typed else ([] if self.raw is not None else None)

    @property
    def nbytes(self) -> int | None:
        bits = _ELEM_BITS.get(self.dtype or "")
        if bits is None:
            return None
        n = 1
        for d in self.dims:
            n *= d
        return (n * bits + 7) // 8


@dataclass
class Attribute:
    name: str
    kind: int                       # AttributeProto.AttributeType
    value: Any                      # float, int, str, Tensor, Graph, or a list of these


@dataclass
class Node:
    op_type: str
    name: str
    domain: str
    inputs: list[str]
    outputs: list[str]
    attrs: dict[str, Attribute]

    def attr(self, name: str, default: Any = None) -> Any:
        a = self.attrs.get(name)
        return default if a is None else a.value


@dataclass
class ValueInfo:
    name: str
    dtype: str | None
    shape: list[int | str] | None


@dataclass
class Graph:
    name: str
    nodes: list[Node]
    initializers: dict[str, Tensor]
    inputs: list[ValueInfo]
    outputs: list[ValueInfo]
    value_info: list[ValueInfo]


@dataclass
class Model:
    ir_version: int
    opsets: dict[str, int]
    graph: Graph
    path: str = ""
    file_bytes: int = 0


def _tensor(buf: memoryview) -> Tensor:
    t = Tensor(name="", dtype=None, dims=[])
    location = 0
    ext: dict[str, str] = {}
    for num, wire, val in _fields(buf):
        if num == 1:
            t.dims += _ints(wire, val)
        elif num == 2:
            t.dtype = ONNX_TYPES.get(val, f"type{val}")
        elif num == 8:
            t.name = _str(val)
        elif num == 9:
            t.raw = bytes(val)
        elif num in (5, 7):  # int32_data, int64_data (packed varints)
            t.typed += _ints(wire, val)
        elif num == 4:  # float_data (packed fixed32)
            if wire == 5:
                t.typed.append(struct.unpack("<f", val)[0])
            else:
                t.typed += list(struct.unpack(f"<{len(val) // 4}f", val))
        elif num == 13:
            k = v = ""
            for n2, _, v2 in _fields(val):
                if n2 == 1:
                    k = _str(v2)
                elif n2 == 2:
                    v = _str(v2)
            ext[k] = v
        elif num == 14:
            location = val
    if location == 1:
        t.external = ext
    if t.dtype in ("INT32", "INT8", "UINT8", "INT16", "UINT16", "BOOL") and t.typed:
        t.typed = [((x + 2 ** 31) % 2 ** 32) - 2 ** 31 for x in t.typed]  # int32_data holds sign-extended varints
    return t


def _value_info(buf: memoryview) -> ValueInfo:
    name, dtype, shape = "", None, None
    for num, _, val in _fields(buf):
        if num == 1:
            name = _str(val)
        elif num == 2:
            for n2, _, v2 in _fields(val):
                if n2 == 1:  # tensor_type
                    for n3, _, v3 in _fields(v2):
                        if n3 == 1:
                            dtype = ONNX_TYPES.get(v3, f"type{v3}")
                        elif n3 == 2:
                            shape = []
                            for n4, _, v4 in _fields(v3):
                                if n4 == 1:
                                    dim: int | str = "?"
                                    for n5, _, v5 in _fields(v4):
                                        dim = _signed(v5) if n5 == 1 else (_str(v5) if n5 == 2 else dim)
                                    shape.append(dim)
    return ValueInfo(name, dtype, shape)


def _attribute(buf: memoryview) -> Attribute:
    name, kind = "", 0
    scalars: dict[int, Any] = {}
    lists: dict[int, list[Any]] = {}
    for num, wire, val in _fields(buf):
        if num == 1:
            name = _str(val)
        elif num == 20:
            kind = val
        elif num == 2:
            scalars[2] = struct.unpack("<f", val)[0]
        elif num == 3:
            scalars[3] = _signed(val)
        elif num == 4:
            scalars[4] = _str(val)
        elif num == 5:
            scalars[5] = _tensor(val)
        elif num == 6:
            scalars[6] = _graph(val)
        elif num == 22:
            scalars[22] = "sparse tensor"
        elif num == 7:
            lists.setdefault(7, []).extend([struct.unpack("<f", val)[0]] if wire == 5 else
                                           list(struct.unpack(f"<{len(val) // 4}f", val)))
        elif num == 8:
            lists.setdefault(8, []).extend(_ints(wire, val))
        elif num == 9:
            lists.setdefault(9, []).append(_str(val))
        elif num == 10:
            lists.setdefault(10, []).append(_tensor(val))
        elif num == 11:
            lists.setdefault(11, []).append(_graph(val))
    by_kind = {1: scalars.get(2, 0.0), 2: scalars.get(3, 0), 3: scalars.get(4, ""), 4: scalars.get(5), 5: scalars.get(6),
               6: lists.get(7, []), 7: lists.get(8, []), 8: lists.get(9, []), 9: lists.get(10, []), 10: lists.get(11, []),
               11: scalars.get(22)}
    if kind == 0:  # old writers leave `type` unset: take whichever field is present
        for k, v in ((1, 2), (2, 3), (3, 4), (4, 5), (5, 6)):
            if v in scalars:
                kind = k
        for k, v in ((6, 7), (7, 8), (8, 9), (9, 10), (10, 11)):
            if v in lists:
                kind = k
    return Attribute(name, kind, by_kind.get(kind))


def _node(buf: memoryview) -> Node:
    n = Node("", "", "", [], [], {})
    for num, _, val in _fields(buf):
        if num == 1:
            n.inputs.append(_str(val))
        elif num == 2:
            n.outputs.append(_str(val))
        elif num == 3:
            n.name = _str(val)
        elif num == 4:
            n.op_type = _str(val)
        elif num == 7:
            n.domain = _str(val)
        elif num == 5:
            a = _attribute(val)
            n.attrs[a.name] = a
    return n


def _graph(buf: memoryview) -> Graph:
    g = Graph("", [], {}, [], [], [])
    for num, _, val in _fields(buf):
        if num == 1:
            g.nodes.append(_node(val))
        elif num == 2:
            g.name = _str(val)
        elif num == 5:
            t = _tensor(val)
            g.initializers[t.name] = t
        elif num == 11:
            g.inputs.append(_value_info(val))
        elif num == 12:
            g.outputs.append(_value_info(val))
        elif num == 13:
            g.value_info.append(_value_info(val))
    return g


def read_onnx(path: str) -> Model:
    """Parse an .onnx file's graph (never its external weights)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise OnnxReadError(f"cannot read {path} ({e.strerror}); check the path or re-export the bundle") from None
    return parse_onnx(data, path)


def parse_onnx(data: bytes, path: str = "") -> Model:
    """Parse an ONNX model's bytes (path: for messages)."""
    try:
        ir, opsets, graph = 0, {}, None
        for num, _, val in _fields(memoryview(data)):
            if num == 1:
                ir = val
            elif num == 8:
                dom, ver = "", 0
                for n2, _, v2 in _fields(val):
                    if n2 == 1:
                        dom = _str(v2)
                    elif n2 == 2:
                        ver = v2
                opsets[dom] = ver
            elif num == 7:
                graph = _graph(val)
    except (ValueError, IndexError, struct.error) as e:
        raise OnnxReadError(f"{path} is not a readable ONNX model ({e}); re-export the bundle") from None
    if graph is None:
        raise OnnxReadError(f"{path} has no graph: it is not an ONNX model; re-export the bundle")
    return Model(ir, opsets, graph, path, len(data))
