"""The one writer of ONNX external-data files (export's graphs and quantize's decoders both use it).

Layout rule, so that onnxruntime memory-maps the weights instead of copying them into its own heap:
onnxruntime's CPU loader maps an external initializer when its offset in the data file is a multiple
of the allocation granularity (4 KiB pages on Linux, 64 KiB on Windows; see onnxruntime's
include/onnxruntime/core/graph/model_saving_options.h: "To use mmap, each offset need to be aligned
... divisible by allocation granularity (64KB for windows and 4K for other OSes)", align_threshold
1 MiB). Every tensor of at least ALIGN_MIN_BYTES starts at a multiple of ALIGN (64 KiB: right on every
OS and on 16/64 KiB-page ARM kernels); smaller ones are packed at 64 bytes. The padding this costs is
at most 64 KiB per large tensor (≈0.1 % of a full-size decoder).

Arrays are written from their own buffer (no `tobytes()` copy); onnx is imported only when a
TensorProto is made, so the runtime library stays import-light.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

ALIGN = 64 << 10          # bytes: offsets of large tensors are multiples of this
ALIGN_MIN_BYTES = 1 << 20  # tensors this large (or larger) are ALIGN-aligned; smaller ones 64-byte aligned
SMALL_ALIGN = 64
INLINE_LIMIT = 1024        # bytes: tensors this small stay inside the .onnx file
COPY_CHUNK = 64 << 20


def aligned_size(sizes: list[int]) -> int:
    """Bytes of a data file holding tensors of these sizes in this order (padding included)."""
    off = 0
    for n in sizes:
        if n <= INLINE_LIMIT:
            continue
        a = ALIGN if n >= ALIGN_MIN_BYTES else SMALL_ALIGN
        off += (-off) % a + n
    return off


class ExternalDataWriter:
    """Appends tensors to one external-data file; returns where each went (offset, length)."""

    def __init__(self, path: str):
        self.path = path
        self.location = os.path.basename(path)
        self._f = open(path, "wb")
        self.offset = 0
        self.padding = 0
        self.bytes_by_dtype: dict[str, int] = {}   # what runtime/memory.py estimates load memory from

    def _align(self, nbytes: int) -> None:
        a = ALIGN if nbytes >= ALIGN_MIN_BYTES else SMALL_ALIGN
        pad = (-self.offset) % a
        if pad:
            self._f.write(b"\0" * pad)
            self.offset += pad
            self.padding += pad

    def write(self, arr: np.ndarray) -> tuple[int, int]:
        """Write a C-contiguous array's bytes (no intermediate copy); returns (offset, length)."""
        if not arr.flags.c_contiguous:
            raise ValueError("ExternalDataWriter.write needs a C-contiguous array (make it so where it is produced)")
        self._align(arr.nbytes)
        start = self.offset
        self._f.write(memoryview(arr.reshape(-1)).cast("B"))
        self.offset += arr.nbytes
        self.bytes_by_dtype[arr.dtype.name] = self.bytes_by_dtype.get(arr.dtype.name, 0) + arr.nbytes
        return start, arr.nbytes

    def copy_from(self, src_path: str, offset: int, length: int, dtype: str = "float32") -> tuple[int, int]:
        """Copy `length` bytes at `offset` of another data file (a tensor of `dtype`), in bounded chunks;
        returns (offset, length)."""
        self._align(length)
        start = self.offset
        with open(src_path, "rb") as src:
            src.seek(offset)
            left = length
            while left:
                chunk = src.read(min(left, COPY_CHUNK))
                if not chunk:
                    raise OSError(f"{src_path} ends before byte {offset + length}: the file is truncated; re-export the bundle")
                self._f.write(chunk)
                left -= len(chunk)
        self.offset += length
        self.bytes_by_dtype[dtype] = self.bytes_by_dtype.get(dtype, 0) + length
        return start, length

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> "ExternalDataWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def external_tensor(name: str, data_type: int, dims: tuple[int, ...] | list[int], location: str,
                    offset: int, length: int):
    """An onnx TensorProto that points at bytes in an external-data file."""
    from onnx import TensorProto
    t = TensorProto(name=name, data_type=data_type, dims=list(dims))
    t.data_location = TensorProto.EXTERNAL
    for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
        t.external_data.add(key=k, value=v)
    return t


def tensor_proto(writer: ExternalDataWriter, name: str, arr: np.ndarray):
    """`arr` as a TensorProto: inline when tiny, else written to `writer` (C-contiguous, no copy)."""
    from onnx import helper, numpy_helper
    if arr.nbytes <= INLINE_LIMIT:
        return numpy_helper.from_array(np.ascontiguousarray(arr), name)
    arr = np.ascontiguousarray(arr)
    offset, length = writer.write(arr)
    return external_tensor(name, helper.np_dtype_to_tensor_dtype(arr.dtype), arr.shape, writer.location, offset, length)


def is_mmap_aligned(offset: int, length: int) -> bool:
    """Whether a tensor at `offset` is laid out as onnxruntime needs to map it (large tensors only)."""
    return length < ALIGN_MIN_BYTES or offset % ALIGN == 0
