"""The Hugging Face tensor names and shapes of a Molmo checkpoint, derived from the config alone.

This table is the single source for parameter counts, checkpoint validation, the torch reference
model's loader and the tiny test checkpoints (molmo-spec.md §2).
"""
from __future__ import annotations

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.files import numel

Shape = tuple[int, ...]


def vision_weight_shapes(cfg: MolmoConfig) -> dict[str, Shape]:
    v = cfg.vision
    p = "model.vision_backbone."
    w, inner = v.width, v.heads * v.head_dim
    kv = v.kv_heads * v.head_dim
    s: dict[str, Shape] = {}
    if v.class_token:
        s[p + "image_vit.class_embedding"] = (w,)
    s[p + "image_vit.positional_embedding"] = (v.num_pos, w)
    s[p + "image_vit.patch_embedding.weight"] = (w, v.patch_dim)
    if v.patch_bias:
        s[p + "image_vit.patch_embedding.bias"] = (w,)
    if v.pre_ln:
        s[p + "image_vit.pre_ln.weight"] = (w,)
        s[p + "image_vit.pre_ln.bias"] = (w,)
    for i in range(v.layers):
        b = f"{p}image_vit.transformer.resblocks.{i}."
        s.update({
            b + "attention.wq.weight": (inner, w), b + "attention.wq.bias": (inner,),
            b + "attention.wk.weight": (kv, w), b + "attention.wk.bias": (kv,),
            b + "attention.wv.weight": (kv, w), b + "attention.wv.bias": (kv,),
            b + "attention.wo.weight": (w, inner), b + "attention.wo.bias": (w,),
            b + "feed_forward.w1.weight": (v.mlp_dim, w), b + "feed_forward.w1.bias": (v.mlp_dim,),
            b + "feed_forward.w2.weight": (w, v.mlp_dim), b + "feed_forward.w2.bias": (w,),
            b + "attention_norm.weight": (w,), b + "attention_norm.bias": (w,),
            b + "ffn_norm.weight": (w,), b + "ffn_norm.bias": (w,),
        })
    f, c = cfg.image_feature_dim, cfg.pooling
    q, kv = c.heads * c.head_dim, c.kv_heads * c.head_dim
    for n, rows in (("wq", q), ("wk", kv), ("wv", kv)):
        s[f"{p}image_pooling_2d.{n}.weight"] = (rows, f)
        s[f"{p}image_pooling_2d.{n}.bias"] = (rows,)
    s[p + "image_pooling_2d.wo.weight"] = (c.width, q)
    s[p + "image_pooling_2d.wo.bias"] = (c.width,)
    s[p + "image_projector.w1.weight"] = (c.mlp_dim, c.width)
    s[p + "image_projector.w3.weight"] = (c.mlp_dim, c.width)
    s[p + "image_projector.w2.weight"] = (cfg.d_model, c.mlp_dim)
    if cfg.image_padding_embed:
        s[p + "pad_embed"] = (2 if cfg.image_padding_embed == "pad_and_partial_pad" else 1, f)
    return s


def block_prefixes(cfg: MolmoConfig, i: int) -> tuple[str, str, str, str]:
    """Where block i's tensors live: (attention, mlp, attn_norm, ff_norm) prefixes. MolmoE nests them
    under attn./mlp., Molmo2 under self_attn./mlp. with the norms at the block, the dense v1 models flat."""
    b = f"model.transformer.blocks.{i}."
    if cfg.layout == "molmoe":
        return b + "attn.", b + "mlp.", b + "attn.", b + "mlp."
    if cfg.layout == "molmo2":
        return b + "self_attn.", b + "mlp.", b, b
    return b, b, b, b


def block_weight_shapes(cfg: MolmoConfig, i: int) -> dict[str, Shape]:
    d = cfg.d_model
    qkv = cfg.q_dim + 2 * cfg.kv_dim
    a, m, an, fn = block_prefixes(cfg, i)
    s: dict[str, Shape] = {a + "att_proj.weight": (qkv, d), a + "attn_out.weight": (d, cfg.q_dim),
                           an + "attn_norm.weight": (d,), fn + "ff_norm.weight": (d,)}
    if cfg.qkv_bias:
        s[a + "att_proj.bias"] = (qkv,)
    if cfg.qk_norm:
        per_head = cfg.qk_norm_per_head
        s[a + "q_norm.weight"] = (cfg.head_dim if per_head else cfg.q_dim,)
        s[a + "k_norm.weight"] = (cfg.head_dim if per_head else cfg.kv_dim,)
    if cfg.is_moe:
        s[m + "gate.weight"] = (cfg.moe_num_experts, d)
        for e in range(cfg.moe_num_experts):
            x = f"{m}experts.{e}."
            s[x + "gate_proj.weight"] = (cfg.ffn_inner, d)
            s[x + "up_proj.weight"] = (cfg.ffn_inner, d)
            s[x + "down_proj.weight"] = (d, cfg.ffn_inner)
    else:
        s[m + "ff_proj.weight"] = (cfg.ffn_hidden, d)
        s[m + "ff_out.weight"] = (d, cfg.ffn_inner)
    return s


def lm_head_name(cfg: MolmoConfig) -> str:
    return "lm_head.weight" if cfg.layout in ("molmoe", "molmo2") else "model.transformer.ff_out.weight"


def llm_weight_shapes(cfg: MolmoConfig) -> dict[str, Shape]:
    s: dict[str, Shape] = {"model.transformer.wte.embedding": (cfg.embedding_size, cfg.d_model),
                           "model.transformer.wte.new_embedding": (cfg.additional_vocab_size, cfg.d_model)}
    for i in range(cfg.n_layers):
        s.update(block_weight_shapes(cfg, i))
    s["model.transformer.ln_f.weight"] = (cfg.d_model,)
    s[lm_head_name(cfg)] = (cfg.embedding_size, cfg.d_model)
    return s


def hf_weight_shapes(cfg: MolmoConfig) -> dict[str, Shape]:
    """Every tensor of the HF checkpoint, name -> shape."""
    return {**vision_weight_shapes(cfg), **llm_weight_shapes(cfg)}


def parameter_count(cfg: MolmoConfig) -> dict[str, int]:
    """Parameters per part and in total, from shapes only (nothing is allocated)."""
    vis = vision_weight_shapes(cfg)
    vit = sum(numel(s) for k, s in vis.items() if ".image_vit." in k)
    connector = sum(numel(s) for s in vis.values()) - vit
    llm = sum(numel(s) for s in llm_weight_shapes(cfg).values())
    out = {"vit": vit, "connector": connector, "llm": llm, "total": vit + connector + llm}
    if cfg.is_moe:
        per_expert = 3 * cfg.d_model * cfg.ffn_inner
        out["active"] = out["total"] - cfg.n_layers * (cfg.moe_num_experts - cfg.moe_top_k) * per_expert
    return out
