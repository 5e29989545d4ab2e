"""Molmo2's vision graph: SigLIP ViT + index-driven attention pooling + SwiGLU projector, in one ONNX graph.

    pixel_values [crops, 729, 588] float32 + pooling [tokens, window] int64 -> image_features [tokens, d]

`pooling` is the processor's `image_token_pooling` (window 4, 2x2) or `video_token_pooling` (window 9,
3x3), indices into the flattened patches of all crops, -1 = empty slot. Static-friendly: every shape
is one of three dynamic axes (`crops`, `tokens`, `window`) and nothing depends on values, so a
TensorRT profile fixes their ranges (crops 1..max_crops+1 or frames, tokens up to the crop's pooled
count, window 4..9). A fixed-shape engine serves smaller inputs by padding: extra crops with any pixels
(no index points at them) and extra pooling rows of -1 (their outputs are finite and dropped by the
runtime). The decoder is the shared one (onnx_graphs.build_decoder) with the `token_types` input.
"""
from __future__ import annotations

import numpy as np

from molmo_edge.runtime.config import MolmoConfig

from molmo_edge.export.graph import GraphBuilder
from molmo_edge.export.onnx_graphs import F32, I64, NEG, Get, _mha

V = "model.vision_backbone."


def _layer_norm(g: GraphBuilder, x: str, get: Get, name: str, eps: float) -> str:
    return g.op("LayerNormalization", [x, g.weight(name + ".weight", get(name + ".weight")),
                                       g.weight(name + ".bias", get(name + ".bias"))], axis=-1, epsilon=eps)


def _gelu_tanh(g: GraphBuilder, x: str) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), spelled out (ONNX's Gelu(tanh) needs opset 20)."""
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, g.const(0.044715, np.float32)])]),
                         g.const(np.sqrt(2.0 / np.pi), np.float32)])
    return g.op("Mul", [g.op("Mul", [x, g.const(0.5, np.float32)]), g.op("Add", [g.op("Tanh", [inner]), g.const(1.0, np.float32)])])


def _vit_features(g: GraphBuilder, cfg: MolmoConfig, get: Get, pixels: str) -> str:
    v = cfg.vision
    p = V + "image_vit."
    x = g.linear(pixels, get(p + "patch_embedding.weight"), get(p + "patch_embedding.bias"), p + "patch_embedding")
    x = g.op("Add", [x, g.weight(p + "positional_embedding", get(p + "positional_embedding"))])
    taps = list(cfg.vit_layers_used)
    hidden = {}
    for i in range(max(taps) + 1):
        b = f"{p}transformer.resblocks.{i}."
        h = _layer_norm(g, x, get, b + "attention_norm", v.norm_eps)
        x = g.op("Add", [x, _mha(g, h, h, get, b + "attention", v.heads, v.kv_heads, v.head_dim)])
        h = g.linear(_layer_norm(g, x, get, b + "ffn_norm", v.norm_eps), get(b + "feed_forward.w1.weight"),
                     get(b + "feed_forward.w1.bias"), b + "feed_forward.w1")
        x = g.op("Add", [x, g.linear(_gelu_tanh(g, h), get(b + "feed_forward.w2.weight"), get(b + "feed_forward.w2.bias"),
                                     b + "feed_forward.w2")])
        hidden[i] = x
    return g.op("Concat", [hidden[i] for i in taps], axis=-1)  # deepest first, as the taps are listed


def _masked_pooling(g: GraphBuilder, cfg: MolmoConfig, get: Get, patches: str, valid: str) -> str:
    """patches [M, k, C] (empty slots zeroed), valid [M, k] float -> pooled [M, width]: one query per
    token, the mean of its valid patches, attending over them with the empty slots masked out."""
    c = cfg.pooling
    p = V + "image_pooling_2d."
    count = g.op("Max", [g.reduce("ReduceSum", valid, [1]), g.const(1.0, np.float32)])                  # [M, 1]
    query = g.op("Div", [g.reduce("ReduceSum", patches, [1], 0), count])                                  # [M, C]
    q = g.linear(query, get(p + "wq.weight"), get(p + "wq.bias"), p + "wq")                              # [M, H*hd]
    k = g.linear(patches, get(p + "wk.weight"), get(p + "wk.bias"), p + "wk")                            # [M, k, KV*hd]
    val = g.linear(patches, get(p + "wv.weight"), get(p + "wv.bias"), p + "wv")
    q = g.op("Reshape", [q, g.const([0, c.heads, 1, c.head_dim])])                                       # [M, H, 1, hd]
    rep = c.heads // c.kv_heads

    def heads(t: str) -> str:  # [M, k, KV*hd] -> [M, H, k, hd]
        t = g.op("Transpose", [g.op("Reshape", [t, g.const([0, 0, c.kv_heads, c.head_dim])])], perm=[0, 2, 1, 3])
        if rep > 1:
            t = g.op("Reshape", [g.op("Expand", [g.op("Unsqueeze", [t, g.const([2])]), g.const([1, 1, rep, 1, 1])]),
                                 g.const([0, c.heads, -1, c.head_dim])])
        return t

    k, val = heads(k), heads(val)
    s = g.op("MatMul", [g.op("Mul", [q, g.const(1.0 / np.sqrt(c.head_dim), np.float32)]),
                        g.op("Transpose", [k], perm=[0, 1, 3, 2])])                                      # [M, H, 1, k]
    bias = g.op("Mul", [g.op("Sub", [g.const(1.0, np.float32), valid]), g.const(NEG, np.float32)])      # [M, k]
    s = g.op("Add", [s, g.op("Unsqueeze", [bias, g.const([1, 2])])])
    o = g.op("MatMul", [g.op("Softmax", [s], axis=-1), val])                                             # [M, H, 1, hd]
    o = g.op("Reshape", [o, g.const([0, c.heads * c.head_dim])])
    return g.linear(o, get(p + "wo.weight"), get(p + "wo.bias"), p + "wo")


def build_molmo2_vision(g: GraphBuilder, cfg: MolmoConfig, get: Get) -> None:
    v = cfg.vision
    pixels = g.input("pixel_values", F32, ["crops", v.num_patches, v.patch_dim])
    pooling = g.input("pooling", I64, ["tokens", "window"])
    feats = _vit_features(g, cfg, get, pixels)
    flat = g.op("Reshape", [feats, g.const([-1, cfg.image_feature_dim])])                               # [crops*P, C]
    is_valid = g.op("Not", [g.op("Less", [pooling, g.const(0)])])
    valid = g.op("Cast", [is_valid], to=F32)
    patches = g.op("Gather", [flat, g.op("Where", [is_valid, pooling, g.const(0)])], axis=0)             # [M, k, C]
    patches = g.op("Mul", [patches, g.op("Unsqueeze", [valid, g.const([2])])])
    pooled = _masked_pooling(g, cfg, get, patches, valid)
    w = V + "image_projector."
    gate = g.linear(pooled, get(w + "w1.weight"), None, w + "w1")
    up = g.linear(pooled, get(w + "w3.weight"), None, w + "w3")
    out = g.linear(g.op("Mul", [g.silu(gate), up]), get(w + "w2.weight"), None, w + "w2")
    g.output(out, "image_features", F32, ["tokens", cfg.d_model])
