"""Which bytes of a graph's external data onnxruntime reads only while it loads, read from the .onnx file
itself: a few protobuf fields, no onnx package (the runtime stays light).

MLAS repacks MatMulNBits and QMoE weights at load, scales included (the scale and block sum of each block
sit beside its nibbles in the repacked buffer); on x86 onnxruntime still keeps the original scales tensor
(PrePack reports it unpacked), mapped, and never reads it again (runtime.machine.drop_mapped_pages)."""
from __future__ import annotations

import os
from typing import Iterator

# op type -> input indices that are scales repacked with the weights (onnxruntime's com.microsoft schemas)
LOAD_ONLY_INPUTS = {"MatMulNBits": (2,), "QMoE": (3, 6)}

# protobuf field numbers (onnx.proto3)
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER = 1, 5
_NODE_INPUT, _NODE_OP_TYPE = 1, 4
_TENSOR_NAME, _TENSOR_EXTERNAL_DATA = 8, 13
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    out = shift = 0
    while True:
        b = buf[i]
        i += 1
        out |= (b & 0x7F) << shift
        if b < 0x80:
            return out, i
        shift += 7


def _fields(buf: bytes, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each length-delimited field of the message in buf[start:end]; other wire
    types are skipped."""
    i, end = start, len(buf) if end is None else end
    while i < end:
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            _, i = _varint(buf, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            n, i = _varint(buf, i)
            yield key >> 3, i, i + n
            i += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _strings(buf: bytes, start: int, end: int, field: int) -> list[str]:
    return [buf[a:b].decode() for f, a, b in _fields(buf, start, end) if f == field]


def load_only_ranges(onnx_path: str) -> list[tuple[str, int, int]]:
    """(external data file, offset, length) of the initializers onnxruntime reads only while loading this graph
    (LOAD_ONLY_INPUTS); [] for a graph without them or a file this reader cannot parse."""
    try:
        with open(onnx_path, "rb") as f:
            buf = f.read()
        graph = next((a, b) for f, a, b in _fields(buf) if f == _MODEL_GRAPH)
        wanted: set[str] = set()
        external: dict[str, tuple[str, int, int]] = {}
        for field, a, b in _fields(buf, *graph):
            if field == _GRAPH_NODE:
                op = _strings(buf, a, b, _NODE_OP_TYPE)
                inputs = _strings(buf, a, b, _NODE_INPUT)
                for k in LOAD_ONLY_INPUTS.get(op[0] if op else "", ()):
                    if k < len(inputs) and inputs[k]:
                        wanted.add(inputs[k])
            elif field == _GRAPH_INITIALIZER:
                name, info = None, {}
                for f, x, y in _fields(buf, a, b):
                    if f == _TENSOR_NAME:
                        name = buf[x:y].decode()
                    elif f == _TENSOR_EXTERNAL_DATA:
                        key = _strings(buf, x, y, _ENTRY_KEY)
                        value = _strings(buf, x, y, _ENTRY_VALUE)
                        if key and value:
                            info[key[0]] = value[0]
                if name and "location" in info and "length" in info:
                    external[name] = (info["location"], int(info.get("offset", 0)), int(info["length"]))
    except (OSError, ValueError, StopIteration, IndexError, UnicodeDecodeError):
        return []
    folder = os.path.dirname(onnx_path)
    return sorted((os.path.join(folder, loc), off, n) for name, (loc, off, n) in external.items() if name in wanted)
