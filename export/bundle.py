"""`molmo-edge export`: checkpoint -> bundle (manifest, tokenizer, embeddings, vision + decoder ONNX).

Weights are streamed from the checkpoint one tensor at a time into the graphs' external-data
files, so peak memory stays near the largest single tensor plus the embedding table, not the
model size. Everything is written into a temporary sibling folder that is renamed into place only
after the self-check passes: an interrupted or failed export leaves nothing behind.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import sys
import time
from typing import Any, Callable

import numpy as np

from molmo_edge.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST
from molmo_edge.runtime.config import IMAGE_TOKENS
from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.machine import mem_available, package_versions
from molmo_edge.runtime.hf_names import parameter_count

from molmo_edge.export.checkpoint import open_checkpoint
from molmo_edge.export.graph import GraphBuilder
from molmo_edge.export.onnx_fused import KV_LAYOUT as FUSED_KV_LAYOUT
from molmo_edge.export.onnx_fused import build_decoder_fused
from molmo_edge.export.onnx_graphs import build_decoder, build_vision

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
REFERENCE_FILES = ("config.json", "generation_config.json", "preprocessor_config.json",
                   "video_preprocessor_config.json", "processor_config.json", "chat_template.jinja")  # last 3: Molmo2
MAX_OPSET_TRT_10_3 = 20


def _io(model) -> tuple[list, list]:
    def desc(v):
        dims = [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        return {"name": v.name, "shape": dims, "dtype": {1: "float32", 6: "int32", 7: "int64", 10: "float16"}[v.type.tensor_type.elem_type]}
    return [desc(v) for v in model.graph.input], [desc(v) for v in model.graph.output]


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_bundle(model: str, out: str, dtype: str = "fp32", opset: int = 18, max_crops: int | None = None,
                  check: bool = True, force: bool = False, progress: Callable[[str], None] = _say,
                  check_layers: int | None = None, fused: bool = True, trt_check: Callable[[str], dict] | None = None,
                  weights: str | None = None, block_size: int = 32, quantizer: Callable[..., Any] | None = None) -> dict:
    """Write a bundle for `model` (checkpoint folder or hub id) at `out`; returns the manifest.
    fused: also write "decoder.fused" (onnxruntime contrib ops), which the onnxruntime backend prefers.
    weights: "int4" or "int8" adds the weight-only quantized decoder flavour (onnxruntime MatMulNBits)."""
    if weights not in (None, "int4", "int8"):
        raise MolmoEdgeError(f"--weights {weights} is not supported; use int4 or int8")
    if not 17 <= opset <= MAX_OPSET_TRT_10_3:
        raise MolmoEdgeError(f"--opset {opset} is outside 17..{MAX_OPSET_TRT_10_3} (LayerNormalization needs 17; "
                             f"TensorRT 10.3 on JetPack 6 parses up to {MAX_OPSET_TRT_10_3})")
    if dtype not in ("fp32", "fp16"):
        raise MolmoEdgeError(f"--dtype {dtype} is not supported; use fp32 or fp16")
    if os.path.exists(out) and not force:
        raise MolmoEdgeError(f"{out} already exists; pass --force to replace it or choose another -o")
    t0 = time.perf_counter()
    folder, cfg, source = open_checkpoint(model)
    if max_crops is not None:
        cfg = cfg.with_(preprocess=dataclasses.replace(cfg.preprocess, max_crops=max_crops))
    progress(f"[export] {folder}: {cfg.family}, d_model {cfg.d_model}, {cfg.n_layers} layers, "
             f"{parameter_count(cfg)['total'] / 1e9:.2f} B parameters")
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        if fused and cfg.is_molmo2:
            progress("[export] skipping decoder.fused: onnxruntime's GroupQueryAttention takes no custom mask, "
                     "and Molmo2's prefill needs its image block")
            fused = False
        if fused and cfg.head_dim % 16:
            progress(f"[export] skipping decoder.fused: onnxruntime's GroupQueryAttention needs head_dim % 16 == 0 "
                     f"(this model has {cfg.head_dim})")
            fused = False
        manifest = _write(tmp, folder, cfg, source, dtype, opset, progress, _decoders(fused))
        if check and cfg.is_molmo2:
            from molmo_edge.export.molmo2_export import self_check_molmo2
            manifest["parity"] = self_check_molmo2(tmp, folder, cfg, dtype, progress, check_layers, opset)
        elif check:
            manifest["parity"] = _self_check(tmp, folder, cfg, dtype, progress, check_layers, opset)
        if trt_check:  # runtime.tensorrt.check.check_for_export, passed in by the CLI (export does not import tensorrt/)
            manifest["tensorrt_check"] = trt_check(tmp)
            for v, r in manifest["tensorrt_check"].items():
                if not r["ok"]:
                    progress(f"[export] TensorRT {v}: {r['problems'][0]} (`molmo-edge check-trt` lists all)")
        with open(os.path.join(tmp, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=2)
        if weights:  # calibration.weight_quant.quantize_decoder_weights, passed in (export does not import calibration/)
            if quantizer is None:
                raise MolmoEdgeError("weights= needs quantizer=molmo_edge.calibration.weight_quant.quantize_decoder_weights")
            quantizer(tmp, int(weights[3:]), block_size=block_size, progress=progress)
            with open(os.path.join(tmp, MANIFEST)) as f:
                manifest = json.load(f)
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"[export] done in {time.perf_counter() - t0:.1f} s -> {out}")
    return manifest


def _decoders(fused: bool) -> list[tuple[str, Callable]]:
    out = [("decoder", build_decoder)]
    if fused:
        out.append(("decoder.fused", build_decoder_fused))
    return out


def _write_graph(folder: str, name: str, build, cfg, get, wdtype, opset: int, progress) -> dict:
    t = time.perf_counter()
    dtype = "fp16" if wdtype == np.float16 else "fp32"
    progress(f"[export] writing {name}.onnx ({dtype} weights, opset {opset}) ...")
    g = GraphBuilder(name, os.path.join(folder, f"{name}.onnx.data"), wdtype, opset)
    build(g, cfg, get)
    model = g.finish(os.path.join(folder, f"{name}.onnx"), doc=f"molmo-edge {name} graph for {cfg.family}")
    inputs, outputs = _io(model)
    info = {
        "file": f"{name}.onnx", "data": f"{name}.onnx.data", "opset": opset,
        "file_bytes": os.path.getsize(os.path.join(folder, f"{name}.onnx")),
        "data_bytes": os.path.getsize(os.path.join(folder, f"{name}.onnx.data")),
        "precision": {"weights": dtype, "compute": "fp32"}, "inputs": inputs, "outputs": outputs,
        "dynamic_axes": {v["name"]: {i: d for i, d in enumerate(v["shape"]) if isinstance(d, str)} for v in inputs + outputs},
        "nodes": len(model.graph.node),
    }
    info["targets"] = ["onnxruntime", "tensorrt"]
    if name == "decoder.fused":
        info["kv_layout"] = FUSED_KV_LAYOUT
        info["targets"] = ["onnxruntime"]
    progress(f"[export]   {name}: {info['nodes']} nodes, {info['data_bytes'] / 1e6:.1f} MB weights, "
             f"{time.perf_counter() - t:.1f} s")
    return info


def _write(tmp: str, folder: str, cfg, source, dtype: str, opset: int, progress, decoders) -> dict:
    digest = hashlib.sha256()
    seen: set[str] = set()

    def get(name: str) -> np.ndarray:
        t = source[name]
        arr = t.float().numpy() if hasattr(t, "float") else np.asarray(t, np.float32)
        if name not in seen:  # hash every checkpoint tensor once, by name and value
            seen.add(name)
            digest.update(name.encode())
            digest.update(np.ascontiguousarray(arr).tobytes())
        return arr

    wdtype = np.float16 if dtype == "fp16" else np.float32
    # token embeddings: base rows then the additional (new_embedding) rows
    base, extra = get("model.transformer.wte.embedding"), get("model.transformer.wte.new_embedding")
    emb = np.lib.format.open_memmap(os.path.join(tmp, "embeddings.npy"), mode="w+", dtype=wdtype,
                                    shape=(base.shape[0] + extra.shape[0], cfg.d_model))
    emb[: base.shape[0]] = base
    emb[base.shape[0]:] = extra
    emb.flush()
    del emb, base, extra

    if cfg.is_molmo2:
        from molmo_edge.export.molmo2_graphs import build_molmo2_vision as vision_graph
    else:
        vision_graph = build_vision
    graphs = {name: _write_graph(tmp, name, build, cfg, get, wdtype, opset, progress)
              for name, build in [("vision", vision_graph)] + decoders}
    for f in TOKENIZER_FILES + REFERENCE_FILES:
        if os.path.exists(os.path.join(folder, f)):
            shutil.copy(os.path.join(folder, f), os.path.join(tmp, f))
    if not os.path.exists(os.path.join(tmp, "tokenizer.json")):
        raise MolmoEdgeError(f"{folder} has no tokenizer.json; add the checkpoint's tokenizer files and export again")

    if cfg.is_molmo2:  # bos = eos = <|im_end|>; the image/frame ids are config.json's; the prompt is its chat template
        tokens = {"bos": cfg.eos_token_id, "eos": cfg.eos_token_id, "pad": cfg.pad_token_id, "image": cfg.image_token_ids()}
        prompt = {"template": "chat_template (Molmo2 processor)", "bos_prepended": True}
    else:
        from molmo_edge.runtime.tokenizer import MolmoTokenizer
        tok = MolmoTokenizer(tmp, cfg)
        tokens = {"bos": tok.bos_id, "eos": tok.eos_id, "image": {k: tok.image_token_ids[k] for k in IMAGE_TOKENS}}
        prompt = {"message_format": cfg.preprocess.message_format, "always_start_with_space": cfg.preprocess.always_start_with_space,
                  "template": " User: {prompt} Assistant:"}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": {"source": os.path.abspath(folder), "name": os.path.basename(os.path.normpath(folder)), "family": cfg.family,
                  "weights_sha256": digest.hexdigest(), "tensors_hashed": len(seen), "parameters": parameter_count(cfg)},
        "config": cfg.to_dict(),
        "tokens": tokens,
        "prompt": prompt,
        "preprocess": cfg.to_dict()["preprocess"],
        "embeddings": {"file": "embeddings.npy", "shape": [cfg.embedding_size + cfg.additional_vocab_size, cfg.d_model],
                       "dtype": np.dtype(wdtype).name},
        "kv_cache": {"layout": ["batch", "seq", "kv_heads", "head_dim"], "n_layers": cfg.n_layers,
                     "kv_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "max_seq": cfg.max_sequence_length},
        "moe": ({"experts": cfg.moe_num_experts, "top_k": cfg.moe_top_k,
                 "expressed_as": "per-expert NonZero/Gather branches with a one-hot MatMul add-back: only routed tokens' rows are computed"}
                if cfg.is_moe else None),
        "graphs": graphs,
        "tools": package_versions(),
    }
    with open(os.path.join(tmp, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=2)
    return manifest


def check_layer_budget(cfg, available: int | None = None) -> int:
    """How many decoder layers the self-check can afford: the torch model and the onnxruntime session
    each hold the checked weights in float32, plus working memory."""
    from molmo_edge.runtime.hf_names import block_weight_shapes, hf_weight_shapes
    total = sum(int(np.prod(s)) for s in hf_weight_shapes(cfg).values()) * 4
    layer = sum(int(np.prod(s)) for s in block_weight_shapes(cfg, 0).values()) * 4
    fixed = total - cfg.n_layers * layer
    budget = 0.7 * (available or mem_available())
    for k in range(cfg.n_layers, 0, -1):
        if 2.5 * (fixed + k * layer) <= budget:
            return k
    return 1


def _check_bundle(bundle_dir: str, cfg, source, wdtype, opset: int, layers: int, progress) -> str:
    """A throw-away bundle whose decoder has only the first `layers` layers (vision, embeddings and
    tokenizer shared with the real bundle by links), for checking models larger than memory."""
    check = os.path.join(bundle_dir, ".check")
    os.makedirs(check)
    with open(os.path.join(bundle_dir, MANIFEST)) as f:
        manifest = json.load(f)
    for name in os.listdir(bundle_dir):
        if name not in (".check", MANIFEST) and not name.startswith("decoder."):
            os.symlink(os.path.join(os.path.abspath(bundle_dir), name), os.path.join(check, name))
    short = cfg.with_(n_layers=layers)
    get = lambda n: source[n].float().numpy()  # noqa: E731
    for name, build in _decoders("decoder.fused" in manifest["graphs"]):
        manifest["graphs"][name] = _write_graph(check, name, build, short, get, wdtype, opset, progress)
    manifest["config"] = short.to_dict()
    with open(os.path.join(check, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return check


def _self_check(bundle_dir: str, folder: str, cfg, dtype: str, progress, check_layers: int | None = None,
                opset: int = 18) -> dict:
    """Run the new bundle through the runtime and the torch reference on one sample; fail on mismatch.
    Models larger than memory are checked on their first decoder layers (all of vision, embeddings, head)."""
    import torch

    from molmo_edge.runtime.session import Molmo
    from molmo_edge.export.checkpoint import WeightSource
    from molmo_edge.export.model import build_model

    layers = min(cfg.n_layers, check_layers or check_layer_budget(cfg))
    source = WeightSource(folder)
    target = bundle_dir
    if layers < cfg.n_layers:
        progress(f"[export] the full check needs more memory than this machine has: checking the vision graph and "
                 f"the first {layers} of {cfg.n_layers} decoder layers")
        target = _check_bundle(bundle_dir, cfg, source, np.float16 if dtype == "fp16" else np.float32, opset, layers, progress)
    progress("[export] checking the ONNX graphs against the torch model ...")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (240, 320, 3), dtype=np.uint8)
    flavours = [False, True] if os.path.exists(os.path.join(target, "decoder.fused.onnx")) else [False]
    results = {}
    for fused in flavours:
        runtime = Molmo.load(target, fused=fused)
        inputs = runtime.processor.process("Describe this image.", image, max_crops=2)
        results[runtime.backend.graphs["decoder"]] = runtime.forward(inputs)
        del runtime
    ref_model = build_model(cfg.with_(n_layers=layers), source)
    with torch.no_grad():
        ref = ref_model(torch.from_numpy(inputs["input_ids"].astype(np.int64)),
                        **{k: torch.from_numpy(inputs[k]) for k in ("images", "image_masks", "image_input_idx")})
    del ref_model
    if target != bundle_dir:
        shutil.rmtree(target)
    want = ref.logits[0].numpy()
    per_graph = {k: float(np.abs(v["logits"] - want).max()) for k, v in results.items()}
    diff = max(per_graph.values())
    got = results["decoder"]
    fdiff = float(np.abs(got["image_features"] - ref.image_features[0].numpy()).max())
    scale = max(1.0, float(np.abs(want).max()))
    tol = 1e-3 if dtype == "fp32" else 1e-2 * scale  # fp16 weights: every weight rounded; reported, loosely bounded
    agree = min(float((v["logits"].argmax(-1) == want.argmax(-1)).mean()) for v in results.values())
    shown = ", ".join(f"{k} {v:.2e}" for k, v in per_graph.items())
    progress(f"[export] largest logit difference {shown} (tolerance {tol:.1e}), image features {fdiff:.2e}, "
             f"argmax agreement {agree:.1%} over {want.shape[0]} positions")
    if not np.isfinite(diff) or diff > tol:
        raise MolmoEdgeError(f"export self-check failed: ONNX logits differ from the torch model by {diff:.3e} "
                             f"(tolerance {tol:.1e}); nothing was written. Please report this with the checkpoint's config.json")
    return {"max_abs_logit_diff": diff, "per_decoder": per_graph, "max_abs_feature_diff": fdiff, "argmax_agreement": agree, "tolerance": tol,
            "positions": int(want.shape[0]), "decoder_layers_checked": layers, "decoder_layers": cfg.n_layers}
