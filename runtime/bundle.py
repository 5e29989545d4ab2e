"""The bundle: the one contract between the export tools and the lean runtime (architecture.md).

bundle/
  manifest.json          format version, model identity and weight hash, config, tokens, graphs, tools
  tokenizer.json, tokenizer_config.json, special_tokens_map.json
  embeddings.npy         token-embedding table [embedding_size + additional, d] (memory-mapped)
  vision.onnx (+ .data)  images + image_masks -> image_features
  decoder.onnx (+ .data) inputs_embeds + position_ids + past K/V -> logits + new K/V
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.errors import MolmoEdgeError

FORMAT = "molmo-edge-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class BundleError(MolmoEdgeError):
    """A bundle is missing files, damaged, or from an incompatible version."""


def is_bundle(folder: str) -> bool:
    return os.path.isfile(os.path.join(folder, MANIFEST))


@dataclass
class Bundle:
    folder: str
    manifest: dict[str, Any]
    config: MolmoConfig

    def path(self, *parts: str) -> str:
        return os.path.join(self.folder, *parts)

    def graph_path(self, name: str) -> str:
        return self.path(self.manifest["graphs"][name]["file"])

    def embeddings(self) -> np.ndarray:
        """The token-embedding table, memory-mapped (pages load on first touch)."""
        info = self.manifest["embeddings"]
        arr = np.load(self.path(info["file"]), mmap_mode="r")
        if list(arr.shape) != list(info["shape"]):
            raise BundleError(f"{info['file']} has shape {list(arr.shape)}, manifest says {info['shape']}; re-export the bundle")
        return arr


def load_bundle(folder: str) -> Bundle:
    """Read and check a bundle's manifest and files; every problem is one clear error."""
    mpath = os.path.join(folder, MANIFEST)
    if not os.path.isfile(mpath):
        raise BundleError(f"{folder} has no {MANIFEST}: it is not a molmo-edge bundle (make one with `molmo-edge export MODEL -o {folder}`)")
    try:
        with open(mpath, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{mpath} is unreadable ({e}); re-export the bundle") from None
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{mpath} is not a molmo-edge bundle manifest; re-export with `molmo-edge export`")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        made = manifest.get("tools", {}).get("molmo_edge", "an unknown version")
        raise BundleError(f"bundle format {version} (made by molmo-edge {made}) but this runtime reads format {FORMAT_VERSION}; "
                          "re-export it with this version: `molmo-edge export MODEL -o BUNDLE`")
    try:
        cfg = MolmoConfig.from_dict(manifest["config"])
    except (KeyError, TypeError) as e:
        raise BundleError(f"{mpath} has a damaged config section ({e}); re-export the bundle") from None
    bundle = Bundle(folder, manifest, cfg)
    needed = ["tokenizer.json", manifest["embeddings"]["file"]]
    for g in manifest["graphs"].values():
        needed.append(g["file"])
        needed += [g["data"]] if g.get("data") else []
    missing = [n for n in needed if not os.path.isfile(bundle.path(n))]
    if missing:
        raise BundleError(f"bundle {folder} is missing {', '.join(missing)}; copy the whole bundle folder or re-export it")
    for name, g in manifest["graphs"].items():
        if g.get("data"):
            size = os.path.getsize(bundle.path(g["data"]))
            if size != g["data_bytes"]:
                raise BundleError(f"{g['data']} is {size} bytes, the manifest says {g['data_bytes']}: the copy is "
                                  "truncated or damaged; copy it again or re-export the bundle")
        size = os.path.getsize(bundle.path(g["file"]))
        if size != g["file_bytes"]:
            raise BundleError(f"{g['file']} is {size} bytes, the manifest says {g['file_bytes']}: the copy is "
                              "truncated or damaged; copy it again or re-export the bundle")
    return bundle


PRECISIONS = ("auto", "fp32", "int8", "int4")
# On CPU, "auto" runs a quantized decoder (when the bundle has one) instead of a float decoder that would
# hold more than this as float32: past it the float decoder is slow (memory-bound decode) and, at
# MolmoE-1B/7B size, does not fit a 24 GB machine.
LARGE_FLOAT_DECODER_BYTES = 2 << 30


@dataclass
class GraphChoice:
    vision: str
    decoder: str
    precision: str          # what ran: fp32 (float graphs, fp32 or fp16 stored), int8, int4
    reason: str


def _float_decoder(graphs: dict[str, Any], moe: bool, fused: bool | None) -> str | None:
    want_fused = (not moe) if fused is None else fused
    if want_fused and "decoder.fused" in graphs:
        return "decoder.fused"
    if "decoder" in graphs:
        return "decoder"
    return "decoder.fused" if "decoder.fused" in graphs else None


def choose_graphs(manifest: dict[str, Any], precision: str = "auto", fused: bool | None = None,
                  device: str = "cpu") -> GraphChoice:
    """Which of the bundle's graphs run for a precision, and why (the CLI prints the reason).

    Graph keys in manifest["graphs"]: "vision", "decoder" (portable, fp32 or fp16 weights), and the
    optional flavours "vision.int8" (Q/DQ from calibration), "decoder.int8"/"decoder.int4" (weight-only
    quantized), "decoder.fused" (onnxruntime contrib ops). All decoder flavours share one I/O signature.
    fused=None picks by measurement (benchmarks/RESULTS.md, onnxruntime CPU): the fused decoder for dense
    models (GroupQueryAttention decodes ~12 % faster), the portable one for MoE.
    precision: fp32/int8/int4 run exactly those graphs or fail with one line saying how to make them
    (int4 uses the calibrated INT8 vision graph when there is one); auto picks (see LARGE_FLOAT_DECODER_BYTES),
    and runs vision.int8 whenever it picks a quantized decoder.
    """
    from molmo_edge.runtime.memory import GiB, resident_weight_bytes

    if precision not in PRECISIONS:
        raise BundleError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    graphs = manifest["graphs"]
    moe = bool(manifest.get("config", {}).get("moe_num_experts", 0))
    float_dec = _float_decoder(graphs, moe, fused)
    quantized = [k for k in ("decoder.int4", "decoder.int8") if k in graphs]
    if precision == "fp32":
        if float_dec is None:
            raise BundleError(f"this bundle has no float decoder, only {', '.join(quantized)} (exported with --weights): "
                              f"run with --precision {quantized[0].split('.')[1]}, or re-export without --weights")
        return GraphChoice("vision", float_dec, "fp32", "--precision fp32")
    if precision in ("int8", "int4"):
        key = f"decoder.{precision}"
        if key not in graphs:
            raise BundleError(f"this bundle has no {precision.upper()} decoder: make it with `molmo-edge quantize BUNDLE "
                              f"--weights {precision}` (or export with --weights {precision})")
        if precision == "int8":
            if "vision.int8" not in graphs:
                raise BundleError("this bundle has no INT8 vision graph: run `molmo-edge calibrate BUNDLE --source FRAMES` first")
            return GraphChoice("vision.int8", key, "int8", "--precision int8")
        vision = "vision.int8" if "vision.int8" in graphs else "vision"
        return GraphChoice(vision, key, "int4", "--precision int4" + (" (with the calibrated INT8 vision graph)"
                                                                      if vision == "vision.int8" else ""))
    # with a quantized decoder, auto also runs the calibrated INT8 vision graph when the user made one
    qvision, qnote = ("vision.int8", "; with the calibrated vision.int8") if "vision.int8" in graphs else ("vision", "")
    if float_dec is None:
        return GraphChoice(qvision, quantized[0], quantized[0].split(".")[1],
                           f"the bundle's only decoder is {quantized[0]}{qnote}")
    if device == "cpu" and quantized:
        held = resident_weight_bytes(graphs[float_dec], device)
        if held > LARGE_FLOAT_DECODER_BYTES:
            q = quantized[0]
            return GraphChoice(qvision, q, q.split(".")[1],
                               f"on CPU the float {float_dec} would hold {held / GiB:.1f} GiB as float32; {q} holds "
                               f"{resident_weight_bytes(graphs[q], device) / GiB:.1f} GiB{qnote} (--precision fp32 runs the "
                               "float graphs)")
    why = "default" + (" (decoder.fused: measured faster for dense models)" if float_dec == "decoder.fused" else "")
    return GraphChoice("vision", float_dec, "fp32", why)


def select_graphs(manifest: dict[str, Any], precision: str = "auto", fused: bool | None = None,
                  device: str = "cpu") -> tuple[str, str]:
    """(vision key, decoder key) that run for a precision; see choose_graphs."""
    c = choose_graphs(manifest, precision, fused, device)
    return c.vision, c.decoder
