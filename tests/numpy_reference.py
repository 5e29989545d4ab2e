"""An independent, deliberately naive numpy Molmo LLM (text-only), reading the HF tensor names
directly, so the torch model's name mapping and block variants are checked against a second
formulation: per-head loops, explicit GQA head sharing, per-token expert loops."""
import numpy as np


def rms(x, w, eps):
    return w * (x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps))


def rope(x, pos, theta):
    hd = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None]
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], -1)


def silu(x):
    return x / (1 + np.exp(-x))


def llm_logits(W, cfg, ids):
    W = {k: np.asarray(v, np.float64) for k, v in W.items()}
    emb = np.concatenate([W["model.transformer.wte.embedding"], W["model.transformer.wte.new_embedding"]])
    x = emb[np.asarray(ids)]
    T = len(ids)
    pos = np.arange(T, dtype=np.float64)
    hd, nh, nkv = cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    for i in range(cfg.n_layers):
        b = f"model.transformer.blocks.{i}."
        a, f = (b + "attn.", b + "mlp.") if cfg.layout == "molmoe" else (b, b)
        h = x if cfg.norm_after else rms(x, W[a + "attn_norm.weight"], cfg.norm_eps)
        qkv = h @ W[a + "att_proj.weight"].T + W.get(a + "att_proj.bias", 0)
        q, k, v = qkv[:, : nh * hd], qkv[:, nh * hd: (nh + nkv) * hd], qkv[:, (nh + nkv) * hd:]
        if cfg.qk_norm:
            q, k = rms(q, W[a + "q_norm.weight"], cfg.norm_eps), rms(k, W[a + "k_norm.weight"], cfg.norm_eps)
        out = np.zeros((T, nh * hd))
        for head in range(nh):
            kvh = head // (nh // nkv)
            qh = rope(q[:, head * hd:(head + 1) * hd], pos, cfg.rope_theta)
            kh = rope(k[:, kvh * hd:(kvh + 1) * hd], pos, cfg.rope_theta)
            vh = v[:, kvh * hd:(kvh + 1) * hd]
            s = qh @ kh.T / np.sqrt(hd) + np.triu(np.full((T, T), -np.inf), 1)
            p = np.exp(s - s.max(-1, keepdims=True))
            out[:, head * hd:(head + 1) * hd] = (p / p.sum(-1, keepdims=True)) @ vh
        att = out @ W[a + "attn_out.weight"].T
        if cfg.norm_after:
            att = rms(att, W[a + "attn_norm.weight"], cfg.norm_eps)
        x = x + att
        h = x if cfg.norm_after else rms(x, W[f + "ff_norm.weight"], cfg.norm_eps)
        if cfg.is_moe:
            y = np.zeros_like(h)
            logits = h @ W[f + "gate.weight"].T
            for t in range(T):
                p = np.exp(logits[t] - logits[t].max())
                p /= p.sum()
                for e in np.argsort(-p)[: cfg.moe_top_k]:  # no renormalisation of the top-k weights
                    g = h[t] @ W[f"{f}experts.{e}.gate_proj.weight"].T
                    u = h[t] @ W[f"{f}experts.{e}.up_proj.weight"].T
                    y[t] += p[e] * ((silu(g) * u) @ W[f"{f}experts.{e}.down_proj.weight"].T)
        else:
            fused = h @ W[f + "ff_proj.weight"].T
            half = fused.shape[-1] // 2
            y = (silu(fused[:, half:]) * fused[:, :half]) @ W[f + "ff_out.weight"].T  # [value; gate]
        if cfg.norm_after:
            y = rms(y, W[f + "ff_norm.weight"], cfg.norm_eps)
        x = x + y
    x = rms(x, W["model.transformer.ln_f.weight"], cfg.norm_eps)
    head = W["lm_head.weight"] if cfg.layout == "molmoe" else W["model.transformer.ff_out.weight"]
    return x @ head.T
