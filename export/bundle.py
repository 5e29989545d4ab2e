"""`molmo-edge export`: checkpoint -> bundle (manifest, tokenizer, embeddings, vision + decoder ONNX).

Weights are streamed from the checkpoint one tensor at a time into the graphs' external-data
files, so peak memory stays near the largest single tensor plus the embedding table, not the
model size. Everything is written into a temporary sibling folder that is renamed into place only
after the self-check (export/check.py) passes: an interrupted or failed export leaves nothing behind.
Only the decoder flavours a backend will select are written, and export says first how much disk
it needs (refusing when the target lacks it).
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import hashlib
import json
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from molmo_edge.runtime.bundle import FORMAT, FORMAT_VERSION, MANIFEST
from molmo_edge.runtime.config import IMAGE_TOKENS
from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.files import Progress, atomic_folder, numel, say, write_json_atomic
from molmo_edge.runtime.hf_names import block_weight_shapes, lm_head_name, llm_weight_shapes, parameter_count, vision_weight_shapes
from molmo_edge.runtime.kv_cache import SHARED
from molmo_edge.runtime.machine import mem_available, package_versions, return_large_frees

from molmo_edge.export.checkpoint import open_checkpoint
from molmo_edge.export.graph import GraphBuilder, WeightQuantizer
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


def _default_fused(cfg, fused: bool | None, progress) -> bool:
    """decoder.fused is written only where a backend selects it: dense models on onnxruntime (MoE runs the
    portable graph, measured faster; runtime/bundle.py select_graphs), or when asked for (fused=True)."""
    if fused is None:
        fused = not cfg.is_moe
    if fused and cfg.is_molmo2:
        progress("[export] skipping decoder.fused: onnxruntime's GroupQueryAttention takes no custom mask, "
                 "and Molmo2's prefill needs its image block")
        fused = False
    if fused and cfg.head_dim % 16:
        progress(f"[export] skipping decoder.fused: onnxruntime's GroupQueryAttention needs head_dim % 16 == 0 "
                 f"(this model has {cfg.head_dim})")
        fused = False
    return fused


def export_bundle(model: str, out: str, dtype: str = "fp32", opset: int = 18, max_crops: int | None = None,
                  check: bool = True, force: bool = False, progress: Progress = say,
                  fused: bool | None = None, trt_check: Callable[[str], dict] | None = None,
                  quantizer: WeightQuantizer | None = None, whole_check: bool | None = None,
                  check_layers: int | None = None) -> dict:
    """Write a bundle for `model` (checkpoint folder or hub id) at `out`; returns the manifest.
    fused: also write "decoder.fused" (onnxruntime contrib ops); default: for dense models only, where the
    onnxruntime backend selects it. quantizer (from calibration.weight_quant.make_quantizer, passed in by
    the CLI): write the weight-only quantized decoder "decoder.int{bits}" straight from the checkpoint
    instead of the float decoders (no float decoder on disk). trt_check: check_for_export from
    runtime.tensorrt.check (the CLI passes it; None skips the TensorRT op check). check_layers: Molmo2 only
    (its check still cuts the decoder to its first layers); Molmo checks every layer, one at a time."""
    if not 17 <= opset <= MAX_OPSET_TRT_10_3:
        raise MolmoEdgeError(f"--opset {opset} is outside 17..{MAX_OPSET_TRT_10_3} (LayerNormalization needs 17; "
                             f"TensorRT 10.3 on JetPack 6 parses up to {MAX_OPSET_TRT_10_3})")
    if dtype not in ("fp32", "fp16"):
        raise MolmoEdgeError(f"--dtype {dtype} is not supported; use fp32 or fp16")
    if os.path.exists(out) and not force:
        raise MolmoEdgeError(f"{out} already exists; pass --force to replace it or choose another -o")
    return_large_frees()  # the self-check frees one block's tensors after another
    t0 = time.perf_counter()
    folder, cfg, source = open_checkpoint(model)
    if max_crops is not None:
        cfg = cfg.with_(preprocess=dataclasses.replace(cfg.preprocess, max_crops=max_crops))
    progress(f"[export] {folder}: {cfg.family}, d_model {cfg.d_model}, {cfg.n_layers} layers, "
             f"{parameter_count(cfg)['total'] / 1e9:.2f} B parameters")
    wdtype = np.float16 if dtype == "fp16" else np.float32
    if quantizer is not None:
        # the quantized decoder is onnxruntime's (MatMulNBits): in the fused graph's layout (GroupQueryAttention over
        # a shared KV buffer) unless fused=False or GQA cannot run the model; measured faster at full size for MolmoE-1B
        # INT4 and at full width for Molmo-7B-D INT4 (2 layers; benchmarks/RESULTS.md)
        layout_fused = _default_fused(cfg, fused is not False, progress)
        decoders = [(f"decoder.int{quantizer.bits}", build_decoder_fused if layout_fused else build_decoder, quantizer)]
    else:
        decoders = [("decoder", build_decoder, None)]
        if _default_fused(cfg, fused, progress):
            decoders.append(("decoder.fused", build_decoder_fused, None))
    need = disk_needed(cfg, wdtype, [(k, q) for k, _, q in decoders], check)
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    free = shutil.disk_usage(parent).free
    progress(f"[export] writing {', '.join(['vision'] + [k for k, _, _ in decoders])}: needs {need / 2**30:.2f} GiB "
             f"of disk, {free / 2**30:.2f} GiB free at {parent}")
    if need > free:
        raise MolmoEdgeError(f"export needs {need / 2**30:.2f} GiB of disk at {parent} but {free / 2**30:.2f} GiB are free; "
                             "free some space, write elsewhere with -o, or use --dtype fp16 / --weights int4 (smaller)")
    with atomic_folder(out) as tmp:
        manifest = _write(tmp, folder, cfg, source, dtype, opset, progress, decoders)
        if check and cfg.is_molmo2:  # Molmo2 keeps its whole-bundle check on the first layers (molmo2_export.py)
            from molmo_edge.export.molmo2_export import self_check_molmo2
            manifest["parity"] = self_check_molmo2(tmp, folder, cfg, dtype, progress, check_layers, opset)
        elif check:
            from molmo_edge.export.check import self_check
            manifest["parity"] = self_check(tmp, cfg, source, {k: (b, q) for k, b, q in decoders}, wdtype, opset,
                                            progress, whole_check)
        if trt_check:  # runtime.tensorrt.check.check_for_export, passed in by the CLI (export does not import tensorrt/)
            manifest["tensorrt_check"] = trt_check(tmp)
            for v, r in manifest["tensorrt_check"].items():
                if not r["ok"]:
                    progress(f"[export] TensorRT {v}: {r['problems'][0]} (`molmo-edge check-trt` lists all)")
        write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
    progress(f"[export] done in {time.perf_counter() - t0:.1f} s -> {out}")
    return manifest


def disk_needed(cfg, wdtype, decoders: list[tuple[str, Any]], check: bool = True) -> int:
    """Bytes the export writes (with external-data padding), plus one layer's check graph when checking."""
    from molmo_edge.runtime.external_data import ALIGN
    item = np.dtype(wdtype).itemsize
    deepest = max(layer % cfg.vision.layers for layer in cfg.vit_layers)
    vision = 0
    for k, s in vision_weight_shapes(cfg).items():
        if ".resblocks." in k and int(k.split(".resblocks.")[1].split(".")[0]) > deepest:
            continue
        vision += numel(s) * item
    emb = (cfg.embedding_size + cfg.additional_vocab_size) * cfg.d_model * item
    layer_shapes = block_weight_shapes(cfg, 0)
    head = {k: s for k, s in llm_weight_shapes(cfg).items() if ".blocks." not in k and ".wte." not in k}

    def size(shapes: dict, q) -> int:
        total = 0
        for name, s in shapes.items():
            n = numel(s)
            graph_name = "lm_head.weight" if name == lm_head_name(cfg) else name  # what the builder asks the quantizer
            if q is not None and len(s) == 2 and q.wants(graph_name):
                total += n * q.bits_for(graph_name) // 8 + (2 if getattr(q, "scales", "fp32") == "fp16" else 4) * (n // q.block_size)
            else:
                total += n * item
        return total

    total = vision + emb
    n_tensors = len(vision_weight_shapes(cfg)) + len(layer_shapes) * cfg.n_layers
    for _, q in decoders:
        total += cfg.n_layers * size(layer_shapes, q) + size(head, q)
    if check:
        total += max(size(layer_shapes, q) for _, q in decoders) + size(head, None)
    return int(total * 1.01) + n_tensors * len(decoders) * ALIGN + (64 << 20)


def _write_graph(folder: str, name: str, build, cfg, get, wdtype, opset: int, progress, quantizer=None) -> dict:
    t = time.perf_counter()
    dtype = "fp16" if wdtype == np.float16 else "fp32"
    what = f"int{quantizer.bits} weights (block {quantizer.block_size}), other weights {dtype}" if quantizer else f"{dtype} weights"
    progress(f"[export] writing {name}.onnx ({what}, opset {opset}) ...")
    g = GraphBuilder(name, os.path.join(folder, f"{name}.onnx.data"), wdtype, opset, quantizer=quantizer)
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
    if quantizer is not None:
        info["precision"] = {"weights": f"int{quantizer.bits}", "other_weights": dtype,
                             "compute": "fp32" if quantizer.accuracy_level == 0 else "int8 activations (per block)",
                             "scheme": "symmetric, blockwise along the input dimension", "block_size": quantizer.block_size,
                             "accuracy_level": quantizer.accuracy_level}
        info["quantization"] = {"op": "com.microsoft.MatMulNBits", "bits": quantizer.bits, "block_size": quantizer.block_size,
                                "quantized_matmuls": len(g.quantized), "scales": quantizer.scales,
                                "head": f"int{quantizer.head_bits}" if quantizer.head_bits else "float",
                                "kept_float": ["MoE router (mlp.gate)"] + ([] if quantizer.head_bits else ["lm_head"]) + ["norms"],
                                "experts_op": "com.microsoft.QMoE" if any(n.op_type == "QMoE" for n in model.graph.node) else None,
                                "source_graph": "checkpoint (export --weights)"}
        info["targets"] = ["onnxruntime"]
    info["padding_bytes"] = g.padding_bytes
    info["weight_bytes_by_dtype"] = g.bytes_by_dtype
    if build is build_decoder_fused:
        info["kv_layout"] = SHARED
        info["targets"] = ["onnxruntime"]
    progress(f"[export]   {name}: {info['nodes']} nodes, {info['data_bytes'] / 1e6:.1f} MB weights, "
             f"{time.perf_counter() - t:.1f} s")
    return info


ROW_BLOCK = 8192  # rows of a vocabulary-sized checkpoint tensor converted to float32 at a time


def _write(tmp: str, folder: str, cfg, source, dtype: str, opset: int, progress, decoders) -> dict:
    digest = hashlib.sha256()
    seen: set[str] = set()

    head = lm_head_name(cfg)

    def f32(t) -> np.ndarray:
        return t.float().numpy() if hasattr(t, "float") else np.asarray(t, np.float32)  # no copy for fp32 tensors

    def get(name: str, rows: slice | None = None) -> np.ndarray:
        t = source[name] if rows is None else source[name][rows]
        if name == head and rows is None and str(t.dtype) in ("torch.float16", "float16"):
            # the head stays fp16 (a view of the mapped file): the writer converts it a slice at a time (the
            # quantizer's columns, or the fp16 store) instead of 2.2 GB of float32 at once for Molmo-7B-D
            if name not in seen:
                for i in range(0, t.shape[0], ROW_BLOCK):  # hashed a block of rows at a time: the same digest
                    get(name, slice(i, i + ROW_BLOCK))
            return t.numpy() if hasattr(t, "numpy") else t
        arr = f32(t)
        if name not in seen:  # hash every checkpoint tensor once, by name and value (from its own buffer)
            digest.update(name.encode())
        if name not in seen or rows is not None:  # row blocks come in order: the same digest as the whole
            digest.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
        seen.add(name)
        return arr

    def copy_rows(name: str, into: np.ndarray) -> None:
        """Copy a [rows, d] checkpoint tensor into `into` a block of rows at a time: an fp16/bf16 source becomes
        float32 one block at a time, not whole (Molmo-7B-D's 152,064-row table: 2.2 GB at once)."""
        for i in range(0, len(into), ROW_BLOCK):
            into[i:i + ROW_BLOCK] = get(name, slice(i, i + ROW_BLOCK))

    wdtype = np.float16 if dtype == "fp16" else np.float32
    # token embeddings: base rows then the additional (new_embedding) rows
    base, extra = "model.transformer.wte.embedding", "model.transformer.wte.new_embedding"
    n_base = source[base].shape[0]
    emb = np.lib.format.open_memmap(os.path.join(tmp, "embeddings.npy"), mode="w+", dtype=wdtype,
                                    shape=(n_base + source[extra].shape[0], cfg.d_model))
    copy_rows(base, emb[:n_base])
    copy_rows(extra, emb[n_base:])
    emb.flush()
    del emb

    if cfg.is_molmo2:
        from molmo_edge.export.molmo2_graphs import build_molmo2_vision as vision_graph
    else:
        vision_graph = build_vision
    graphs = {name: _write_graph(tmp, name, build, cfg, get, wdtype, opset, progress, q)
              for name, build, q in [("vision", vision_graph, None)] + decoders}
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
                 "expressed_as": "per-expert NonZero/Gather branches with a one-hot MatMul add-back: only routed tokens' rows are "
                                 "computed; weight-only quantized decoders: one onnxruntime QMoE node per layer unless --experts routed"}
                if cfg.is_moe else None),
        "graphs": graphs,
        "tools": package_versions(),
    }
    write_json_atomic(os.path.join(tmp, MANIFEST), manifest)
    return manifest


# Molmo2's self-check (molmo2_export.py) still checks a bundle cut to its first layers with these two.
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
    for name, build in [("decoder", build_decoder)] + ([("decoder.fused", build_decoder_fused)]
                                                        if "decoder.fused" in manifest["graphs"] else []):
        manifest["graphs"][name] = _write_graph(check, name, build, short, get, wdtype, opset, progress)
    manifest["config"] = short.to_dict()
    with open(os.path.join(check, MANIFEST), "w") as f:
        json.dump(manifest, f)
    return check
