"""The onnxruntime flavour of the decoder ("decoder.fused"): the same model as the portable graph,
written with onnxruntime's contrib ops (com.microsoft) where they pay on CPU:

- GroupQueryAttention with RoPE inside (do_rotary, non-interleaved halves) and the KV cache in
  share-buffer mode: past and present are one preallocated [B, kv_heads, max_seq, hd] buffer per
  layer that the runtime binds to both (in-place update, no copy of the past per token);
- MoE (MolmoE): router logits in, softmax + top-k without renormalisation, SwiGLU experts with the
  gate/up rows interleaved in fc1 as the CPU kernel requires (gate even rows, up odd rows);
- SkipSimplifiedLayerNormalization: residual add fused with the next RMSNorm (pre-norm families).

KV cache dtype (kv_dtype): float16 when the graph's weights are fp16 or quantized (then q, k, v are cast to
fp16 and GQA computes in fp16, RoPE tables included: onnxruntime's GQA takes a cache of its activations' type,
or int8/uint8), float32 for an fp32 export (the exact reference). Half the KV memory: MolmoE-1B at 4096 tokens
0.54 GB instead of 1.07 GB.

QK-norm stays a full-width RMSNorm before GQA (GQA's q/k norm inputs are per head, which is not
Molmo's). Inputs: inputs_embeds, logit_positions, seqlens_k [B] int32 (= total length - 1),
total_sequence_length (int32 scalar), past_key.i / past_value.i; outputs: logits, present_key.i /
present_value.i.
"""
from __future__ import annotations

import numpy as np
from onnx import TensorProto

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.ort_ops import in_fp16

from molmo_edge.export.graph import GraphBuilder
from molmo_edge.export.onnx_graphs import F32, Get, _finish_decoder, _moe

MS = "com.microsoft"


def rope_cache(cfg: MolmoConfig, max_seq: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [max_seq, hd/2] in float32, computed the way the torch reference computes them."""
    hd = cfg.head_dim
    inv_freq = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, hd, 2, dtype=np.float32) / np.float32(hd)))).astype(np.float32)
    freqs = np.arange(max_seq, dtype=np.float32)[:, None] * inv_freq[None]
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


def kv_dtype(g: GraphBuilder) -> np.dtype:
    """The KV cache dtype the fused decoder this builder writes declares (module docstring)."""
    return np.dtype(np.float16 if g.weight_dtype == np.float16 or g.quantizer is not None else np.float32)


def _skip_norm(g: GraphBuilder, y: str, x: str, w: np.ndarray, eps: float, name: str) -> tuple[str, str]:
    """(RMSNorm(x + y) * w, x + y) in one op."""
    out = g.op("SkipSimplifiedLayerNormalization", [y, x, g.weight(name + ".weight", w)], n_out=4, domain=MS, epsilon=eps,
               name_hint=name)
    return out[0], out[3]


def build_decoder_fused(g: GraphBuilder, cfg: MolmoConfig, get: Get, moe_op: bool = True, hidden: bool = False,
                        head: bool = True) -> None:
    d, hd, nh, nkv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    max_seq = cfg.max_sequence_length
    x = g.input("inputs_embeds", F32, ["batch", "seq", d])
    logit_pos = g.input("logit_positions", TensorProto.INT64, ["n_logits"])
    seqlens = g.input("seqlens_k", TensorProto.INT32, ["batch"])
    total = g.input("total_sequence_length", TensorProto.INT32, [])
    kvt = kv_dtype(g)
    half = kvt == np.float16
    kv_elem = TensorProto.FLOAT16 if half else F32
    cos, sin = rope_cache(cfg, max_seq)
    cos_c, sin_c = g.const(cos, kvt), g.const(sin, kvt)  # GQA's activation type
    pre_norm = not cfg.norm_after

    def norm_weight(i: int, which: str) -> tuple[str, np.ndarray]:
        b = f"model.transformer.blocks.{i}."
        a, f = (b + "attn.", b + "mlp.") if cfg.layout == "molmoe" else (b, b)
        name = (a + "attn_norm") if which == "attn" else (f + "ff_norm")
        return name, get(name + ".weight")

    y = None  # the last sub-layer output still to be added to x (pre-norm: fused with the next norm)
    for i in range(cfg.n_layers):
        b = f"model.transformer.blocks.{i}."
        a, f = (b + "attn.", b + "mlp.") if cfg.layout == "molmoe" else (b, b)
        if pre_norm:
            name, w = norm_weight(i, "attn")
            h, x = (_skip_norm(g, y, x, w, cfg.norm_eps, name) if y is not None else (g.rms_norm(x, w, cfg.norm_eps, name), x))
        else:
            h = x
        qkv = g.linear(h, get(a + "att_proj.weight"), get(a + "att_proj.bias") if cfg.qkv_bias else None, a + "att_proj")
        q, k, v = g.op("Split", [qkv, g.const([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])], n_out=3, axis=-1)
        if cfg.qk_norm:
            q = g.rms_norm(q, get(a + "q_norm.weight"), cfg.norm_eps, a + "q_norm")
            k = g.rms_norm(k, get(a + "k_norm.weight"), cfg.norm_eps, a + "k_norm")
        pk = g.input(f"past_key.{i}", kv_elem, ["batch", nkv, "max_seq", hd])
        pv = g.input(f"past_value.{i}", kv_elem, ["batch", nkv, "max_seq", hd])

        def gqa(q: str, k: str, v: str) -> str:  # present_* are graph outputs directly (no Identity copy of the whole buffer)
            return g.op("GroupQueryAttention", [q, k, v, pk, pv, seqlens, total, cos_c, sin_c], domain=MS,
                        outputs=[f"gqa_{i}", f"present_key.{i}", f"present_value.{i}"], num_heads=nh, kv_num_heads=nkv,
                        scale=float(1.0 / np.sqrt(hd)), do_rotary=1, rotary_interleaved=0)[0]
        att = in_fp16(g.op, [q, k, v], gqa) if half else gqa(q, k, v)
        g.declare_output(f"present_key.{i}", kv_elem, ["batch", nkv, "max_seq", hd])
        g.declare_output(f"present_value.{i}", kv_elem, ["batch", nkv, "max_seq", hd])
        att = g.linear(att, get(a + "attn_out.weight"), None, a + "attn_out")
        if pre_norm:
            name, w = norm_weight(i, "ff")
            h, x = _skip_norm(g, att, x, w, cfg.norm_eps, name)
        else:
            x = g.op("Add", [x, g.rms_norm(att, get(a + "attn_norm.weight"), cfg.norm_eps, a + "attn_norm")])
            h = x
        if cfg.is_moe and (not moe_op or g.quantizer is not None):
            y = _moe(g, cfg, h, get, f)  # the portable routed branches, or QMoE for the weight-only quantized decoder
        elif cfg.is_moe:
            flat = g.op("Reshape", [h, g.const([-1, d])])
            router = g.linear(flat, get(f + "gate.weight"), None, f + "gate")
            e, inner = cfg.moe_num_experts, cfg.ffn_inner
            fc1 = np.empty((e, 2 * inner, d), np.float32)
            fc2 = np.empty((e, d, inner), np.float32)
            for j in range(e):
                fc1[j, 0::2] = get(f"{f}experts.{j}.gate_proj.weight")
                fc1[j, 1::2] = get(f"{f}experts.{j}.up_proj.weight")
                fc2[j] = get(f"{f}experts.{j}.down_proj.weight")
            y = g.op("MoE", [flat, router, g.weight(f + "experts.fc1", fc1), "", g.weight(f + "experts.fc2", fc2)], domain=MS,
                     k=cfg.moe_top_k, normalize_routing_weights=0, activation_type="swiglu", swiglu_fusion=1,
                     name_hint=f + "moe")
            del fc1, fc2
            y = g.op("Reshape", [y, g.op("Shape", [h])])
        else:
            fused = g.linear(h, get(f + "ff_proj.weight"), None, f + "ff_proj")
            value, gate = g.op("Split", [fused, g.const([cfg.ffn_inner, cfg.ffn_inner])], n_out=2, axis=-1)
            y = g.linear(g.op("Mul", [g.silu(gate), value]), get(f + "ff_out.weight"), None, f + "ff_out")
        if not pre_norm:
            x = g.op("Add", [x, g.rms_norm(y, get(f + "ff_norm.weight"), cfg.norm_eps, f + "ff_norm")])
            y = None
    if y is not None:
        x = g.op("Add", [x, y])
    _finish_decoder(g, cfg, get, x, logit_pos, hidden, head)
