"""The two ONNX graphs of a bundle, written straight from the checkpoint's tensors (streamed):

- vision:  images [N, 576, 588] + image_masks [N, 576] -> image_features [N, 144, d]
- decoder: inputs_embeds [B, T, d] + position_ids [B, T] + logit_positions [K] + past K/V per layer
           [B, P, n_kv, hd] -> logits [B, K, V] + new K/V per layer [B, T, n_kv, hd]

The KV cache is sequence-major ([B, S, n_kv, hd]) so that the runtime's preallocated buffer holds
the past as a contiguous prefix; the graph returns only the new entries and the runtime writes
them in place. Only standard ONNX ops at opset <= 20 (TensorRT 10.3 parses them).

MoE: one routed branch per expert. Each expert gathers the tokens that chose it (NonZero +
Gather), runs its SwiGLU on those rows only and adds the weighted result back through a one-hot
[N, n_e] MatMul (exact; TensorRT 10.3 has no ScatterND reduction) in expert order, like the HF
loop. In decode (one token) every unselected expert gets zero rows, so its weights are never
read: a step reads top_k of n_experts experts. The weight-only quantized decoders (`export --weights`,
MatMulNBits: onnxruntime-only anyway) put a layer's experts in one onnxruntime QMoE node instead
(the quantizer's `experts` setting; "routed" keeps the branches).
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from onnx import TensorProto

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.hf_names import block_prefixes, lm_head_name

from molmo_edge.export.graph import GraphBuilder

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
Get = Callable[[str], np.ndarray]
# masked attention scores: fp16 holds -1e4 (float32's min becomes -inf in an fp16 engine, and -inf - -inf is
# NaN), and exp(-1e4 + s - max) is exactly 0 in fp32 and fp16 alike, so fp32 results are unchanged
NEG = -1.0e4


def _mha(g: GraphBuilder, q_in: str, kv_in: str, get: Get, prefix: str, heads: int, kv_heads: int, head_dim: int) -> str:
    """Bias-ful multi-head attention over the last two axes of [M, L, C] inputs (ViT blocks, pooling).
    Self-attention projects q, k and v with one fused MatMul: one larger GEMM, and one consumer of the
    normalised input (onnxruntime merges identical Q/DQ chains, and a DQ with three consumers would
    keep the INT8 graph's projections from fusing into integer kernels)."""
    if q_in == kv_in:
        names = ("wq", "wk", "wv")
        w = np.concatenate([get(f"{prefix}.{n}.weight") for n in names])
        b = np.concatenate([get(f"{prefix}.{n}.bias") for n in names])
        sizes = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
        qkv = g.op("Split", [g.linear(q_in, w, b, f"{prefix}.wqkv"), g.const(sizes)], n_out=3, axis=-1)
        lin = dict(zip(names, qkv))
    else:
        lin = {n: g.linear(x, get(f"{prefix}.{n}.weight"), get(f"{prefix}.{n}.bias"), f"{prefix}.{n}")
               for n, x in (("wq", q_in), ("wk", kv_in), ("wv", kv_in))}

    def split(x: str, n: int) -> str:  # [M, L, n*hd] -> [M, n, L, hd]
        return g.op("Transpose", [g.op("Reshape", [x, g.const([0, 0, n, head_dim])])], perm=[0, 2, 1, 3])

    q, k, v = split(lin["wq"], heads), split(lin["wk"], kv_heads), split(lin["wv"], kv_heads)
    if kv_heads != heads:  # repeat_interleave of K/V heads
        rep = heads // kv_heads
        k, v = (g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]), g.const([1, 1, rep, 1, 1])]),
                                g.const([0, heads, -1, head_dim])]) for t in (k, v))
    s = g.op("MatMul", [g.op("Mul", [q, g.const(1.0 / np.sqrt(head_dim), np.float32)]),
                        g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), v])
    o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 2, 1, 3]), g.const([0, 0, heads * head_dim])])
    return g.linear(o, get(f"{prefix}.wo.weight"), get(f"{prefix}.wo.bias"), f"{prefix}.wo")


def build_vision(g: GraphBuilder, cfg: MolmoConfig, get: Get) -> None:
    v = cfg.vision
    p = "model.vision_backbone."
    n_patch, gh, gw = v.num_patches, *v.patches_per_side
    images = g.input("images", F32, ["crops", n_patch, v.patch_dim])
    masks = g.input("image_masks", F32, ["crops", n_patch])

    x = g.op("MatMul", [images, g.weight(p + "image_vit.patch_embedding.weight", get(p + "image_vit.patch_embedding.weight"), True)])
    cls = g.op("Expand", [g.op("Reshape", [g.weight(p + "image_vit.class_embedding", get(p + "image_vit.class_embedding")),
                                           g.const([1, 1, v.width])]),
                          g.op("Concat", [g.op("Slice", [g.op("Shape", [images]), g.const([0]), g.const([1])]),
                                          g.const([1, v.width])], axis=0)])
    x = g.op("Add", [g.op("Concat", [cls, x], axis=1), g.weight(p + "image_vit.positional_embedding", get(p + "image_vit.positional_embedding"))])

    def layer_norm(x: str, name: str) -> str:
        return g.op("LayerNormalization", [x, g.weight(name + ".weight", get(name + ".weight")), g.weight(name + ".bias", get(name + ".bias"))],
                    axis=-1, epsilon=v.norm_eps)

    x = layer_norm(x, p + "image_vit.pre_ln")
    layer_ids = [l % v.layers for l in cfg.vit_layers]
    hidden = {}
    for i in range(max(layer_ids) + 1):  # blocks past the deepest feature layer are never needed
        b = f"{p}image_vit.transformer.resblocks.{i}."
        h = layer_norm(x, b + "attention_norm")
        x = g.op("Add", [x, _mha(g, h, h, get, b + "attention", v.heads, v.kv_heads, v.head_dim)])
        h = g.linear(layer_norm(x, b + "ffn_norm"), get(b + "feed_forward.w1.weight"), get(b + "feed_forward.w1.bias"), b + "feed_forward.w1")
        h = g.op("Mul", [h, g.op("Sigmoid", [g.op("Mul", [h, g.const(1.702, np.float32)])])])  # quick_gelu
        x = g.op("Add", [x, g.linear(h, get(b + "feed_forward.w2.weight"), get(b + "feed_forward.w2.bias"), b + "feed_forward.w2")])
        hidden[i] = x
    feats = g.op("Concat", [hidden[i] for i in layer_ids], axis=-1)
    feats = g.op("Slice", [feats, g.const([1]), g.const([n_patch + 1]), g.const([1])])  # drop CLS
    # Crops that are batch padding (-1 pixels) give zero features: MolmoE tests any pixel, 7B code all pixels.
    is_pad = g.op("Cast", [g.op("Equal", [images, g.const(-1.0, np.float32)])], to=F32)
    reduce = "ReduceMax" if cfg.crop_zero_rule == "any" else "ReduceMin"
    keep = g.op("Sub", [g.const(1.0, np.float32), g.reduce(reduce, is_pad, [1, 2])])
    feats = g.op("Mul", [feats, keep])
    if cfg.image_padding_embed == "pad_and_partial_pad":
        pad = get(p + "pad_embed")
        all_pad = g.op("Cast", [g.op("Equal", [masks, g.const(0.0, np.float32)])], to=F32)
        partial = g.op("Cast", [g.op("And", [g.op("Less", [masks, g.const(1.0, np.float32)]),
                                             g.op("Not", [g.op("Equal", [masks, g.const(0.0, np.float32)])])])], to=F32)
        feats = g.op("Add", [feats, g.op("Mul", [g.weight(p + "pad_embed.0", pad[0]), g.op("Unsqueeze", [all_pad, g.const([-1])])])])
        feats = g.op("Add", [feats, g.op("Mul", [g.weight(p + "pad_embed.1", pad[1]), g.op("Unsqueeze", [partial, g.const([-1])])])])
    ph, pw = cfg.image_pooling
    fdim = cfg.image_feature_dim
    win = g.op("Reshape", [feats, g.const([-1, gh // ph, ph, gw // pw, pw, fdim])])
    win = g.op("Reshape", [g.op("Transpose", [win], perm=[0, 1, 3, 2, 4, 5]), g.const([-1, ph * pw, fdim])])
    query = g.reduce("ReduceMean", win, [1])
    pooled = _mha(g, query, win, get, p + "image_pooling_2d", v.heads, v.kv_heads, v.head_dim)
    pooled = g.op("Reshape", [pooled, g.const([-1, (gh // ph) * (gw // pw), v.width])])
    w1 = g.linear(pooled, get(p + "image_projector.w1.weight"), None, p + "image_projector.w1")
    w3 = g.linear(pooled, get(p + "image_projector.w3.weight"), None, p + "image_projector.w3")
    out = g.linear(g.op("Mul", [g.silu(w1), w3]), get(p + "image_projector.w2.weight"), None, p + "image_projector.w2")
    g.output(out, "image_features", F32, ["crops", cfg.tokens_per_crop, cfg.d_model])


def _rope(g: GraphBuilder, x: str, cos: str, sin: str, hd: int) -> str:
    x1, x2 = g.op("Split", [x, g.const([hd // 2, hd // 2])], n_out=2, axis=-1)
    rot = g.op("Concat", [g.op("Neg", [x2]), x1], axis=-1)
    return g.op("Add", [g.op("Mul", [x, cos]), g.op("Mul", [rot, sin])])


def _moe(g: GraphBuilder, cfg: MolmoConfig, h: str, get: Get, f: str) -> str:
    d = cfg.d_model
    flat = g.op("Reshape", [h, g.const([-1, d])])
    logits = g.linear(flat, get(f + "gate.weight"), None, f + "gate")
    q = g.quantizer
    if q is not None and q.wants(f + "experts.0.gate_proj.weight") and q.packs_experts(d, cfg.ffn_inner):
        # weight-only quantized decoders (onnxruntime-only already): the layer's experts in one QMoE node
        packed = q.pack_experts(lambda e, nm: get(f"{f}experts.{e}.{nm}.weight").T, cfg.moe_num_experts)
        names = {k: g.raw(f"{f}experts.{k}.q{q.bits}", v) for k, v in packed.items()}
        del packed
        g.quantized += [f"{f}experts.{e}.{m}.weight" for e in range(cfg.moe_num_experts) for m in ("gate_proj", "up_proj", "down_proj")]
        y = q.experts_node(lambda op, ins, **attrs: g.op(op, ins, **attrs), flat, logits, names, cfg.moe_top_k)
        return g.op("Reshape", [y, g.op("Shape", [h])])
    probs = g.op("Softmax", [logits], axis=-1)
    top_w, top_i = g.op("TopK", [probs, g.const([cfg.moe_top_k])], n_out=2, axis=-1, largest=1, sorted=1)
    n_tok = g.op("Slice", [g.op("Shape", [flat]), g.const([0]), g.const([1])])
    token = g.op("Unsqueeze", [g.op("Range", [g.const(0), g.op("Squeeze", [n_tok, g.const([0])]), g.const(1)]), g.const([1])])
    out = g.op("Mul", [flat, g.const(0.0, np.float32)])
    zero = g.const(0.0, np.float32)
    for e in range(cfg.moe_num_experts):
        x = f"{f}experts.{e}."
        chosen = g.op("Equal", [top_i, g.const(e)])                                      # [N, k]
        weight = g.op("ReduceSum", [g.op("Where", [chosen, top_w, zero]), g.const([1])], keepdims=0)  # [N]
        # NonZero over a float mask (TensorRT's NonZero takes FP32/FP16, not BOOL)
        routed = g.reduce("ReduceMax", g.op("Cast", [chosen], to=TensorProto.FLOAT), [1], 0)
        idx = g.op("Reshape", [g.op("NonZero", [routed]), g.const([-1])])               # [n_e] tokens routed here
        hx = g.op("Gather", [flat, idx], axis=0)                                        # [n_e, d]
        act = g.op("Mul", [g.silu(g.linear(hx, get(x + "gate_proj.weight"), None, x + "gate_proj")),
                           g.linear(hx, get(x + "up_proj.weight"), None, x + "up_proj")])
        y = g.linear(act, get(x + "down_proj.weight"), None, x + "down_proj")
        y = g.op("Mul", [y, g.op("Unsqueeze", [g.op("Gather", [weight, idx], axis=0), g.const([1])])])
        # scatter-add back as a one-hot [N, n_e] matmul: exact (x1/x0), and parseable by TensorRT 10.3,
        # whose ScatterND accepts no reduction
        onehot = g.op("Cast", [g.op("Equal", [token, g.op("Unsqueeze", [idx, g.const([0])])])], to=TensorProto.FLOAT)
        out = g.op("Add", [out, g.op("MatMul", [onehot, y])])
    return g.op("Reshape", [out, g.op("Shape", [h])])


def scaled_rope(cfg: MolmoConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies, cos/sin factor) of the scaled RoPE layers, computed as the torch reference does."""
    from molmo_edge.export.model import yarn_inv_freq
    inv_freq, scale = yarn_inv_freq(cfg)
    return inv_freq.numpy().astype(np.float32), scale


def molmo2_blocked(g: GraphBuilder, token_types: str, future: str, cols: str, p_len: str) -> str:
    """Molmo2's prefix mask as "blocked" [B, 1, 1, T, S]: causal, except that new image/frame tokens
    (token_types == 1) see every new image/frame token (the cached past counts as text). Decode steps
    pass token_types 0 and stay causal."""
    mm = g.op("Equal", [token_types, g.const(1)])                                          # [B, T]
    new_col = g.op("Sub", [cols, g.op("Squeeze", [p_len, g.const([0])])])                  # [S]: key index among new tokens
    is_new = g.op("Not", [g.op("Less", [new_col, g.const(0)])])
    key_mm = g.op("And", [g.op("Gather", [mm, g.op("Where", [is_new, new_col, g.const(0)])], axis=1), is_new])  # [B, S]
    both = g.op("And", [g.op("Unsqueeze", [mm, g.const([2])]), g.op("Unsqueeze", [key_mm, g.const([1])])])       # [B, T, S]
    blocked = g.op("And", [future, g.op("Not", [both])])
    return g.op("Unsqueeze", [blocked, g.const([1, 2])])


def _finish_decoder(g: GraphBuilder, cfg: MolmoConfig, get: Get, x: str, logit_pos: str, hidden: bool, head: bool) -> None:
    """The decoder's tail: optionally the last hidden state (the self-check's one-layer graphs), then the head."""
    if hidden:
        g.output(x, "hidden", F32, ["batch", "seq", cfg.d_model])
    if head:
        x = g.op("Gather", [x, logit_pos], axis=1)  # only the positions whose logits are wanted
        x = g.rms_norm(x, get("model.transformer.ln_f.weight"), cfg.norm_eps, "model.transformer.ln_f")
        logits = g.linear(x, get(lm_head_name(cfg)), None, "lm_head")
        g.output(logits, "logits", F32, ["batch", "n_logits", cfg.embedding_size])


def build_decoder(g: GraphBuilder, cfg: MolmoConfig, get: Get, hidden: bool = False, head: bool = True) -> None:
    """hidden/head: the self-check writes one-layer graphs that output the block's hidden state
    (and the head only for the last block); bundles get head only."""
    d, hd, nh, nkv = cfg.d_model, cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    rep = nh // nkv
    x = g.input("inputs_embeds", F32, ["batch", "seq", d])
    pos = g.input("position_ids", I64, ["batch", "seq"])
    logit_pos = g.input("logit_positions", I64, ["n_logits"])
    pasts = [(g.input(f"past_key.{i}", F32, ["batch", "past", nkv, hd]), g.input(f"past_value.{i}", F32, ["batch", "past", nkv, hd]))
             for i in range(cfg.n_layers)]

    def rope_table(inv_freq: np.ndarray, scale: float) -> tuple[str, str]:
        freqs = g.op("Mul", [g.op("Unsqueeze", [g.op("Cast", [pos], to=F32), g.const([-1])]), g.const(inv_freq, np.float32)])
        emb = g.op("Unsqueeze", [g.op("Concat", [freqs, freqs], axis=-1), g.const([2])])  # [B, T, 1, hd]
        cos, sin = g.op("Cos", [emb]), g.op("Sin", [emb])
        if scale != 1.0:
            cos, sin = (g.op("Mul", [t, g.const(scale, np.float32)]) for t in (cos, sin))
        return cos, sin

    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, hd, 2, dtype=np.float32) / hd))).astype(np.float32)
    plain = rope_table(inv_freq, 1.0)
    scaled = rope_table(*scaled_rope(cfg)) if cfg.rope_type != "default" else plain  # Molmo2 OLMo: YaRN layers

    # causal mask over [T, P + T]: query t sits at absolute index P + t
    t_len = g.op("Slice", [g.op("Shape", [x]), g.const([1]), g.const([2])])
    p_len = g.op("Slice", [g.op("Shape", [pasts[0][0]]), g.const([1]), g.const([2])])
    s_len = g.op("Add", [t_len, p_len])
    one = g.const(1)
    rows = g.op("Add", [g.op("Range", [g.const(0), g.op("Squeeze", [t_len, g.const([0])]), one]), g.op("Squeeze", [p_len, g.const([0])])])
    cols = g.op("Range", [g.const(0), g.op("Squeeze", [s_len, g.const([0])]), one])
    future = g.op("Greater", [g.op("Unsqueeze", [cols, g.const([0])]), g.op("Unsqueeze", [rows, g.const([1])])])
    if cfg.is_molmo2:  # Molmo2 prefill: image/frame tokens also see every other one among the new tokens
        future = molmo2_blocked(g, g.input("token_types", I64, ["batch", "seq"]), future, cols, p_len)
    mask = g.op("Where", [future, g.const(NEG, np.float32), g.const(0.0, np.float32)])  # [T, S] ([B, 1, 1, T, S] Molmo2)
    scale = g.const(1.0 / np.sqrt(hd), np.float32)

    for i in range(cfg.n_layers):
        a, f, an, fn = block_prefixes(cfg, i)
        cos, sin = scaled if cfg.layer_rope_scaled(i) else plain
        h = x if cfg.norm_after else g.rms_norm(x, get(an + "attn_norm.weight"), cfg.norm_eps, an + "attn_norm")
        qkv = g.linear(h, get(a + "att_proj.weight"), get(a + "att_proj.bias") if cfg.qkv_bias else None, a + "att_proj")
        q, k, v = g.op("Split", [qkv, g.const([cfg.q_dim, cfg.kv_dim, cfg.kv_dim])], n_out=3, axis=-1)
        if cfg.qk_norm and not cfg.qk_norm_per_head:
            q = g.rms_norm(q, get(a + "q_norm.weight"), cfg.norm_eps, a + "q_norm")
            k = g.rms_norm(k, get(a + "k_norm.weight"), cfg.norm_eps, a + "k_norm")
        q, k = g.op("Reshape", [q, g.const([0, 0, nh, hd])]), g.op("Reshape", [k, g.const([0, 0, nkv, hd])])
        if cfg.qk_norm and cfg.qk_norm_per_head:  # Qwen3: RMSNorm over each head's hd channels
            q = g.rms_norm(q, get(a + "q_norm.weight"), cfg.norm_eps, a + "q_norm")
            k = g.rms_norm(k, get(a + "k_norm.weight"), cfg.norm_eps, a + "k_norm")
        q, k = _rope(g, q, cos, sin, hd), _rope(g, k, cos, sin, hd)
        v = g.op("Reshape", [v, g.const([0, 0, nkv, hd])])
        g.output(k, f"new_key.{i}", F32, ["batch", "seq", nkv, hd])
        g.output(v, f"new_value.{i}", F32, ["batch", "seq", nkv, hd])
        k_all = g.op("Concat", [pasts[i][0], k], axis=1)  # [B, S, nkv, hd]
        v_all = g.op("Concat", [pasts[i][1], v], axis=1)
        # GQA without copying K/V: queries grouped per KV head, [B, nkv, rep, T, hd]
        qg = g.op("Transpose", [g.op("Reshape", [q, g.const([0, 0, nkv, rep, hd])])], perm=[0, 2, 3, 1, 4])
        kt = g.op("Unsqueeze", [g.op("Transpose", [k_all], perm=[0, 2, 3, 1]), g.const([2])])  # [B, nkv, 1, hd, S]
        vg = g.op("Unsqueeze", [g.op("Transpose", [v_all], perm=[0, 2, 1, 3]), g.const([2])])  # [B, nkv, 1, S, hd]
        s = g.op("Add", [g.op("MatMul", [g.op("Mul", [qg, scale]), kt]), mask])
        o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), vg])                                # [B, nkv, rep, T, hd]
        o = g.op("Reshape", [g.op("Transpose", [o], perm=[0, 3, 1, 2, 4]), g.const([0, 0, nh * hd])])
        att = g.linear(o, get(a + "attn_out.weight"), None, a + "attn_out")
        if cfg.norm_after:
            att = g.rms_norm(att, get(an + "attn_norm.weight"), cfg.norm_eps, an + "attn_norm")
        x = g.op("Add", [x, att])
        h = x if cfg.norm_after else g.rms_norm(x, get(fn + "ff_norm.weight"), cfg.norm_eps, fn + "ff_norm")
        if cfg.is_moe:
            y = _moe(g, cfg, h, get, f)
        else:
            fused = g.linear(h, get(f + "ff_proj.weight"), None, f + "ff_proj")
            value, gate = g.op("Split", [fused, g.const([cfg.ffn_inner, cfg.ffn_inner])], n_out=2, axis=-1)
            y = g.linear(g.op("Mul", [g.silu(gate), value]), get(f + "ff_out.weight"), None, f + "ff_out")
        if cfg.norm_after:
            y = g.rms_norm(y, get(fn + "ff_norm.weight"), cfg.norm_eps, fn + "ff_norm")
        x = g.op("Add", [x, y])
    _finish_decoder(g, cfg, get, x, logit_pos, hidden, head)
