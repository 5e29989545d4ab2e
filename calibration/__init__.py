"""INT8 calibration (frames -> scales, Q/DQ graphs, accuracy reports) and weight-only quantization.

    molmo-edge calibrate BUNDLE --source FRAMES      # calibration/vision.cache, vision.int8.onnx, report.json
    molmo-edge quantize BUNDLE --weights int4        # decoder.int4.onnx (MatMulNBits)

Modules: frames (sources, deterministic frame selection, near-duplicate removal), stats (activation
statistics and scale methods), trt_cache (TensorRT calibration cache writer/reader), qdq (explicit
Q/DQ vision graph), weights (decoder weight-only quantization), report (accuracy report),
calibrate (the command), staging (atomic bundle updates). Imports numpy, onnx, onnxruntime and
molmo_edge.runtime, never torch.
"""
from molmo_edge.runtime.errors import MolmoEdgeError


class CalibrationError(MolmoEdgeError):
    """Calibration input or output is unusable; the message names the problem and the fix."""
