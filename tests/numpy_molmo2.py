"""An independent, deliberately naive numpy Molmo2, written from molmo2-spec.md alone: it reads the
raw config.json dict (not our MolmoConfig) and the hub tensor names directly, loops over heads,
builds the prefix mask from its rule and YaRN from the paper's formula, in float64. It checks the
OLMo-style backbone (post-norm, full-width q/k norm, YaRN on some layers), for which no golden exists."""
import math

import numpy as np


def rms(x, w, eps):
    return w * (x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps))


def layer_norm(x, w, b, eps):
    mu = x.mean(-1, keepdims=True)
    return w * (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) + b


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


def silu(x):
    return x / (1 + np.exp(-x))


def softmax(s):
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


def inv_freq(text: dict, scaled: bool):
    """(inverse frequencies, cos/sin multiplier) of plain RoPE, or of YaRN (Peng et al. 2023)."""
    hd, theta = text["head_dim"], text["rope_theta"]
    base = 1.0 / theta ** (np.arange(0, hd, 2) / hd)
    rs = text.get("rope_scaling") or {}
    if not scaled or rs.get("rope_type") != "yarn":
        return base, 1.0
    s, L = rs["factor"], rs["original_max_position_embeddings"]

    def dim_for(rotations):  # the dimension whose wavelength makes `rotations` turns over L positions
        return hd * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = max(math.floor(dim_for(rs.get("beta_fast", 32))), 0), min(math.ceil(dim_for(rs.get("beta_slow", 1))), hd - 1)
    ramp = np.clip((np.arange(hd // 2) - lo) / max(hi - lo, 1e-3), 0, 1)  # 0 = keep, 1 = interpolate
    freq = base * (1 - ramp) + (base / s) * ramp
    return freq, rs.get("attention_factor") or 0.1 * math.log(s) + 1


def rope(x, pos, freq, mult):
    ang = pos[:, None] * freq[None]
    c, s = np.cos(ang) * mult, np.sin(ang) * mult
    h = x.shape[-1] // 2
    return np.concatenate([x[:, :h] * c - x[:, h:] * s, x[:, h:] * c + x[:, :h] * s], -1)


def vision_features(W, config: dict, crops, pooling):
    """SigLIP ViT (taps resolved against the declared layer count), masked mean-query pooling, SwiGLU."""
    vit, ad = config["vit_config"], config["adapter_config"]
    p = "model.vision_backbone."
    x = crops @ W[p + "image_vit.patch_embedding.weight"].T + W[p + "image_vit.patch_embedding.bias"]
    x = x + W[p + "image_vit.positional_embedding"]
    taps = [t % vit["num_hidden_layers"] for t in ad["vit_layers"]]
    nh, hd, eps = vit["num_attention_heads"], vit["head_dim"], vit["layer_norm_eps"]
    outs = []
    for i in range(max(taps) + 1):
        b = f"{p}image_vit.transformer.resblocks.{i}."
        h = layer_norm(x, W[b + "attention_norm.weight"], W[b + "attention_norm.bias"], eps)
        q, k, v = (h @ W[f"{b}attention.{n}.weight"].T + W[f"{b}attention.{n}.bias"] for n in ("wq", "wk", "wv"))
        o = np.zeros_like(q)
        for j in range(nh):
            sl = slice(j * hd, (j + 1) * hd)
            o[..., sl] = softmax(q[..., sl] @ np.swapaxes(k[..., sl], -1, -2) / math.sqrt(hd)) @ v[..., sl]
        x = x + o @ W[b + "attention.wo.weight"].T + W[b + "attention.wo.bias"]
        h = layer_norm(x, W[b + "ffn_norm.weight"], W[b + "ffn_norm.bias"], eps)
        h = gelu_tanh(h @ W[b + "feed_forward.w1.weight"].T + W[b + "feed_forward.w1.bias"])
        x = x + h @ W[b + "feed_forward.w2.weight"].T + W[b + "feed_forward.w2.bias"]
        outs.append(x)
    flat = np.concatenate([outs[t] for t in taps], -1).reshape(-1, len(taps) * vit["hidden_size"])
    ah, ahd = ad["num_attention_heads"], ad["head_dim"]
    out = []
    for row in pooling:
        got = flat[[i for i in row if i >= 0]]
        query = got.mean(0, keepdims=True)
        q = query @ W[p + "image_pooling_2d.wq.weight"].T + W[p + "image_pooling_2d.wq.bias"]
        k = got @ W[p + "image_pooling_2d.wk.weight"].T + W[p + "image_pooling_2d.wk.bias"]
        v = got @ W[p + "image_pooling_2d.wv.weight"].T + W[p + "image_pooling_2d.wv.bias"]
        o = np.concatenate([softmax(q[:, j * ahd:(j + 1) * ahd] @ k[:, j * ahd:(j + 1) * ahd].T / math.sqrt(ahd))
                            @ v[:, j * ahd:(j + 1) * ahd] for j in range(ah)], -1)
        o = o @ W[p + "image_pooling_2d.wo.weight"].T + W[p + "image_pooling_2d.wo.bias"]
        g, u = o @ W[p + "image_projector.w1.weight"].T, o @ W[p + "image_projector.w3.weight"].T
        out.append((silu(g) * u) @ W[p + "image_projector.w2.weight"].T)
    return np.concatenate(out)


def molmo2_logits(W, config: dict, ids, crops=None, pooling=None):
    """Logits [T, vocab] for one sample; image features added at the <im_patch> positions."""
    W = {k: np.asarray(v, np.float64) for k, v in W.items()}
    text = config["text_config"]
    ids = np.asarray(ids)
    x = np.concatenate([W["model.transformer.wte.embedding"], W["model.transformer.wte.new_embedding"]])[ids]
    if crops is not None:
        x[ids == config["image_patch_id"]] += vision_features(W, config, np.asarray(crops, np.float64), pooling)
    special = [config[k] for k in ("image_patch_id", "image_col_id", "image_start_token_id", "low_res_image_start_token_id",
                                   "frame_start_token_id", "image_end_token_id", "frame_end_token_id", "image_low_res_id")]
    mm = np.isin(ids, special)
    T = len(ids)
    allowed = np.tril(np.ones((T, T), bool)) | (mm[:, None] & mm[None, :])
    bias = np.where(allowed, 0.0, -np.inf)
    nh, nkv, hd, eps = text["num_attention_heads"], text["num_key_value_heads"], text["head_dim"], text["layer_norm_eps"]
    olmo, post = text["qk_norm_type"] == "olmo", text["norm_after"]
    scaled_layers = text.get("rope_scaling_layers")
    pos = np.arange(T, dtype=np.float64)
    for i in range(text["num_hidden_layers"]):
        b = f"model.transformer.blocks.{i}."
        a = b + "self_attn."
        freq, mult = inv_freq(text, scaled_layers is None or i in scaled_layers)
        h = x if post else rms(x, W[b + "attn_norm.weight"], eps)
        qkv = h @ W[a + "att_proj.weight"].T
        q, k, v = qkv[:, : nh * hd], qkv[:, nh * hd: (nh + nkv) * hd], qkv[:, (nh + nkv) * hd:]
        if olmo:
            q, k = rms(q, W[a + "q_norm.weight"], eps), rms(k, W[a + "k_norm.weight"], eps)
        out = np.zeros((T, nh * hd))
        for head in range(nh):
            kvh = head // (nh // nkv)
            qh, kh = q[:, head * hd:(head + 1) * hd], k[:, kvh * hd:(kvh + 1) * hd]
            if not olmo:
                qh, kh = rms(qh, W[a + "q_norm.weight"], eps), rms(kh, W[a + "k_norm.weight"], eps)
            qh, kh = rope(qh, pos, freq, mult), rope(kh, pos, freq, mult)
            out[:, head * hd:(head + 1) * hd] = softmax(qh @ kh.T / math.sqrt(hd) + bias) @ v[:, kvh * hd:(kvh + 1) * hd]
        att = out @ W[a + "attn_out.weight"].T
        x = x + (rms(att, W[b + "attn_norm.weight"], eps) if post else att)
        h = x if post else rms(x, W[b + "ff_norm.weight"], eps)
        fused = h @ W[b + "mlp.ff_proj.weight"].T
        up, gate = np.split(fused, 2, -1)  # rows [up; gate]
        y = (silu(gate) * up) @ W[b + "mlp.ff_out.weight"].T
        x = x + (rms(y, W[b + "ff_norm.weight"], eps) if post else y)
    return rms(x, W["model.transformer.ln_f.weight"], eps) @ W["lm_head.weight"].T
