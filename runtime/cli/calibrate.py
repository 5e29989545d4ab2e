"""`molmo-edge calibrate` (INT8 vision: TensorRT caches, Q/DQ graph, accuracy report) and
`molmo-edge quantize` (weight-only INT4/INT8 decoder). Heavy imports stay inside the commands."""
from __future__ import annotations

import argparse
import json
import os

from molmo_edge.runtime.errors import MolmoEdgeError


def _need_onnx(command: str) -> None:
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise MolmoEdgeError(f"`molmo-edge {command}` needs the onnx package to rewrite graphs: pip install 'onnx>=1.15' "
                             "(or pip install 'molmo-edge[export]')") from None


def add_weight_options(s: argparse.ArgumentParser, when: str = "") -> None:
    """The weight-only quantization settings `quantize` and `export --weights` share (one place for their help)."""
    s.add_argument("--block-size", type=int, choices=[32, 64, 128], default=32, help=f"{when}weights per scale (default 32)")
    s.add_argument("--head", choices=["float", "int8", "int4"], default="int8",  # weight_quant.DEFAULT_HEAD
                   help=f"{when}LM head storage (default int8: a quarter of the float head's bytes per token on CPU, "
                        "98-99%% argmax agreement with it; int4 costs more; float is exact: the check measures each)")
    s.add_argument("--scales", choices=["fp32", "fp16"], default="fp32",
                   help=f"{when}scale precision (fp16: half the scale bytes, fp16 activations into each quantized MatMul)")
    s.add_argument("--experts", choices=["qmoe", "routed"], default="qmoe",
                   help=f"{when}MoE experts: qmoe (default) one onnxruntime QMoE node per layer; routed: one MatMulNBits "
                        "per expert matmul (16x the nodes, slower on CPU)")


def cmd_calibrate(a: argparse.Namespace) -> int:
    _need_onnx("calibrate")
    from molmo_edge.calibration.calibrate import DEFAULT_TRT_VERSIONS, calibrate_bundle
    from molmo_edge.calibration.report import load_prompts

    prompts = load_prompts(a.prompts) if a.prompts else None
    report = calibrate_bundle(
        a.bundle, a.source, samples=a.samples, holdout=a.holdout, method=a.method, percentile=a.percentile, seed=a.seed,
        max_crops=a.max_crops, exclude=a.exclude or (), quantize_attention=a.quantize_attention, min_cosine=a.min_cosine,
        prompts=prompts, e2e_frames=0 if a.no_e2e else a.e2e_frames, max_new_tokens=a.max_new_tokens,
        trt_versions=a.trt_version or DEFAULT_TRT_VERSIONS, dedup=a.dedup, threads=a.threads, report_path=a.report)
    if a.json:
        print(json.dumps({k: report[k] for k in ("method", "frames", "threshold") if k in report}))
    else:
        print(os.path.join(os.path.abspath(a.bundle), "calibration", "report.json"))
    return 0


def cmd_quantize(a: argparse.Namespace) -> int:
    _need_onnx("quantize")
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights

    bits = {"int4": 4, "int8": 8}[a.weights]
    entry = quantize_decoder_weights(a.bundle, bits, a.block_size, accuracy_level=a.accuracy_level, check=not a.no_check,
                                     head=a.head, scales=a.scales, experts=a.experts)
    print(os.path.join(os.path.abspath(a.bundle), entry["file"]))
    return 0


def _positive(v: str) -> int:
    n = int(v)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{v} must be >= 1")
    return n


def add_commands(sub) -> None:
    s = sub.add_parser(
        "calibrate", help="INT8-calibrate a bundle's vision graph on your own frames (TensorRT cache, Q/DQ graph, report)",
        description="Pick frames from SRC (deterministic, spread over the whole source, near-duplicates dropped), run "
                    "them through the fp32 vision graph, and add to the bundle: calibration/vision.cache (TensorRT "
                    "implicit-INT8 cache, one per --trt-version), vision.int8.onnx (explicit Q/DQ, run with "
                    "--precision int8) and calibration/report.json (INT8 vs fp32 on held-out frames: feature cosine, "
                    "answers, counts, points). Fails, changing nothing, when the worst held-out crop's feature cosine "
                    "is below --min-cosine. The bundle is updated atomically.")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--source", required=True, metavar="SRC",
                   help="folder or glob of images, a video file, or a camera URI (/dev/video0, csi://0, rtsp://...)")
    s.add_argument("--samples", type=_positive, default=64, help="calibration frames (default 64)")
    s.add_argument("--holdout", type=_positive, default=8, help="held-out frames for the accuracy report (default 8)")
    s.add_argument("--method", choices=["entropy", "percentile", "minmax"], default="entropy",
                   help="how activation ranges are chosen (default entropy, as TensorRT's EntropyCalibration2)")
    s.add_argument("--percentile", type=float, default=99.99, help="for --method percentile (default 99.99)")
    s.add_argument("--seed", type=int, default=0, help="frame selection seed (default 0)")
    s.add_argument("--dedup", type=float, default=3.0,
                   help="near-duplicate threshold: mean abs difference of 32x32 gray thumbnails, 0-255 (default 3)")
    s.add_argument("--max-crops", type=int, default=None, help="crops per frame, as you will run them (default: the bundle's)")
    s.add_argument("--exclude", action="append", metavar="LAYER",
                   help="keep a layer in float in the Q/DQ graph (name, dotted part like resblocks.22, or glob; repeatable)")
    s.add_argument("--quantize-attention", action="store_true", help="also INT8 the attention matmuls (Q·K^T, P·V)")
    s.add_argument("--min-cosine", type=float, default=0.99,
                   help="fail if the worst held-out crop's feature cosine is below this (default 0.99)")
    s.add_argument("--prompts", metavar="FILE", help="prompts for the end-to-end check (one per line, or a JSON list)")
    s.add_argument("--e2e-frames", type=int, default=4, help="held-out frames asked every prompt (default 4)")
    s.add_argument("--no-e2e", action="store_true", help="skip the end-to-end answers (features only)")
    s.add_argument("--max-new-tokens", type=_positive, default=24, help="answer length in the end-to-end check (default 24)")
    s.add_argument("--trt-version", action="append", metavar="X.Y.Z",
                   help="TensorRT version(s) the caches are for (default 10.3.0 = JetPack 6 and 10.13.3 = JetPack 7.0); "
                        "the first is calibration/vision.cache")
    s.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    s.add_argument("--report", metavar="FILE", help="also write the report here (written even when the check fails)")
    s.add_argument("--json", action="store_true", help="print a JSON summary instead of the report path")
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser(
        "quantize", help="add a weight-only INT4/INT8 decoder to a bundle (onnxruntime MatMulNBits)",
        description="Quantize the decoder's attention, dense FFN and MoE expert weights symmetrically in blocks "
                    "(router, LM head and norms stay float) into decoder.int4.onnx / decoder.int8.onnx, run with "
                    "--precision int4 / int8. The bundle is updated atomically.")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--weights", choices=["int4", "int8"], required=True)
    add_weight_options(s)
    s.add_argument("--accuracy-level", type=int, choices=[0, 1, 2, 3, 4], default=None,
                   help="MatMulNBits compute: 0 fp32 activations, 4 int8 activations per block (default 4, faster)")
    s.add_argument("--no-check", action="store_true", help="skip the logits check against the fp32 decoder")
    s.set_defaults(fn=cmd_quantize)
