"""TensorRT calibration caches: our own writer and strict reader (tensorrt-onnxruntime-notes.md §1.2).

Format (text, '\\n' line ends):

    TRT-100300-EntropyCalibration2          TRT-<version int>-<algorithm>
    images: 3c010a14                        <TRT tensor name>: <8 hex digits>
    ...

The hex digits are the big-endian IEEE-754 float32 bit pattern of the per-tensor *scale*
(amax / 127), not of amax. The version int is major*10000 + minor*100 + patch from TensorRT 10 on
(10.3.0 -> 100300) and major*1000 + minor*100 + patch before (8.6.1 -> 8601). Tensor names are
the ONNX value names, which is how TensorRT's ONNX parser names the network's tensors.

The writer refuses what a consumer would accept silently and regret: zero, negative, NaN or
infinite scales, names that are weights, empty names or names with line breaks.
"""
from __future__ import annotations

import math
import re
import struct
from dataclasses import dataclass, field
from typing import Iterable, Mapping

import numpy as np

from molmo_edge.calibration import CalibrationError
from molmo_edge.runtime.backends.trt_engines import trt_version_int as version_int, trt_version_str as version_str  # noqa: F401
from molmo_edge.runtime.files import write_text_atomic

ALGORITHMS = ("EntropyCalibration2", "EntropyCalibration", "MinMaxCalibration", "LegacyCalibration")
# Which TensorRT calibrator consumes a cache made with each of our methods. TensorRT has no
# percentile calibrator: a percentile cache is read through IInt8EntropyCalibrator2 (what
# `trtexec --int8 --calib=FILE` uses), so its header names that algorithm.
METHOD_ALGORITHM = {"entropy": "EntropyCalibration2", "percentile": "EntropyCalibration2", "minmax": "MinMaxCalibration"}
_HEADER = re.compile(r"^TRT-(\d+)-([A-Za-z0-9]+)$")
_LINE = re.compile(r"^(.+): ([0-9a-fA-F]{8})$")


def scale_to_hex(scale: float) -> str:
    return struct.pack(">f", float(np.float32(scale))).hex()


def hex_to_scale(h: str) -> np.float32:
    return np.float32(struct.unpack(">f", bytes.fromhex(h))[0])


@dataclass
class CalibrationCache:
    """A parsed cache: header fields and name -> float32 scale, in file order."""
    version: int
    algorithm: str
    scales: dict[str, np.float32] = field(default_factory=dict)

    @property
    def header(self) -> str:
        return f"TRT-{self.version}-{self.algorithm}"

    def amax(self, name: str) -> float:
        return float(self.scales[name]) * 127.0


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not name or name != name.strip() or "\n" in name or "\r" in name:
        raise CalibrationError(f"tensor name {name!r} cannot be written to a TensorRT calibration cache "
                               "(empty, padded or multi-line); rename the tensor in the ONNX graph")


def format_cache(scales: Mapping[str, float], version: str | int = "10.3.0", algorithm: str = "EntropyCalibration2",
                 weights: Iterable[str] = ()) -> str:
    """The cache text for `scales` (tensor name -> scale = amax/127). Refuses bad scales and weight names."""
    if algorithm not in ALGORITHMS:
        raise CalibrationError(f"unknown TensorRT calibration algorithm {algorithm!r}; use one of {', '.join(ALGORITHMS)}")
    if not scales:
        raise CalibrationError("no tensor scales to write: the calibration produced nothing; check the frames and the graph")
    weight_names = set(weights)
    lines = [f"TRT-{version_int(version)}-{algorithm}"]
    for name, scale in scales.items():
        _check_name(name)
        if name in weight_names:
            raise CalibrationError(f"{name!r} is a weight (initializer), not an activation; caches must list activations only")
        s = float(np.float32(scale))
        if not math.isfinite(s) or s <= 0.0:
            raise CalibrationError(f"scale of tensor {name!r} is {s!r}: a TensorRT cache needs finite scales > 0; "
                                   "the tensor was constant zero or non-finite on the calibration frames (check the frames)")
        lines.append(f"{name}: {scale_to_hex(s)}")
    return "\n".join(lines) + "\n"


def write_cache(path: str, scales: Mapping[str, float], version: str | int = "10.3.0",
                algorithm: str = "EntropyCalibration2", weights: Iterable[str] = ()) -> str:
    """Write a cache file (atomically: a temp file renamed into place). Returns its header line."""
    text = format_cache(scales, version, algorithm, weights)
    write_text_atomic(path, text)
    return text.split("\n", 1)[0]


def parse_cache(text: str, source: str = "cache") -> CalibrationCache:
    """Strictly parse cache text: one header, then `name: 8-hex` lines, no blanks, no duplicates."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise CalibrationError(f"{source} is empty; re-run `molmo-edge calibrate`")
    m = _HEADER.match(lines[0].rstrip("\r"))
    if not m:
        raise CalibrationError(f"{source} line 1 is {lines[0][:60]!r}, not a TRT-<version>-<algorithm> header; "
                               "it is not a TensorRT calibration cache")
    cache = CalibrationCache(int(m.group(1)), m.group(2))
    for no, raw in enumerate(lines[1:], start=2):
        line = raw.rstrip("\r")
        lm = _LINE.match(line)
        if not lm:
            raise CalibrationError(f"{source} line {no} is {line[:80]!r}, not `tensor: 8 hex digits`; the cache is damaged")
        name, h = lm.group(1), lm.group(2)
        if name in cache.scales:
            raise CalibrationError(f"{source} line {no}: tensor {name!r} appears twice; the cache is damaged")
        cache.scales[name] = hex_to_scale(h)
    return cache


def read_cache(path: str) -> CalibrationCache:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CalibrationError(f"cannot read calibration cache {path} ({e.strerror}); run `molmo-edge calibrate` first") from None
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise CalibrationError(f"{path} is not ASCII text: it is not a TensorRT calibration cache "
                               "(a binary flatbuffers table from onnxruntime's tools is a different format)") from None
    return parse_cache(text, path)
