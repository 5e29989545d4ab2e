"""Numpy references of the fused kernels, in float64 from the fp16 inputs the kernels read.

Layouts (the ones the projections produce; the kernels take any strides):
  ViT / pooling q, k, v, out: [n, tokens, heads, 64]
  decoder q, out: [batch, tokens, heads, 128]; k, v: [batch, tokens, kv_heads, 128]
  KV cache: [batch, kv_heads, max_len, 128] fp16, K stored after RoPE.
Where the kernels round an intermediate to fp16 because the model does (RoPE'd q and k, the
cache), the references round there too, so differences left are accumulation order and the
fp16 probabilities of the P.V product.
"""
from __future__ import annotations

import numpy as np

_F16 = np.float16


def _softmax(s: np.ndarray) -> np.ndarray:
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def vit_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None) -> np.ndarray:
    """Non-causal multi-head attention; q, k, v [n, seq, heads, d] -> [n, seq, heads, d] (float64)."""
    d = q.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    qh, kh, vh = (np.swapaxes(np.asarray(x, np.float64), 1, 2) for x in (q, k, v))  # [n, h, s, d]
    p = _softmax(qh @ np.swapaxes(kh, -1, -2) * scale)
    return np.swapaxes(p @ vh, 1, 2)


def pool_windows(grid_h: int, grid_w: int) -> np.ndarray:
    """[windows, 4] patch indices of each 2x2 window (raster order of windows, patches row-major),
    the grouping of VisionEncoder.forward ('(h dh) (w dw) -> (h w) (dh dw)')."""
    wy, wx = np.meshgrid(np.arange(grid_h // 2), np.arange(grid_w // 2), indexing="ij")
    base = (2 * wy * grid_w + 2 * wx).reshape(-1, 1)
    return base + np.array([0, 1, grid_w, grid_w + 1])


def attention_pool(q: np.ndarray, k: np.ndarray, v: np.ndarray, grid_h: int, grid_w: int,
                   q_per_window: bool = False, scale: float | None = None) -> np.ndarray:
    """2x2 attention pooling with the window mean as query.

    k, v: [n, grid_h*grid_w, heads, d] per patch; q per patch (averaged over each window here) or,
    with q_per_window, [n, windows, heads, d]. Returns [n, windows, heads, d] (float64)."""
    d = k.shape[-1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    win = pool_windows(grid_h, grid_w)
    kw = np.asarray(k, np.float64)[:, win]                     # [n, W, 4, h, d]
    vw = np.asarray(v, np.float64)[:, win]
    qw = np.asarray(q, np.float64)
    qm = qw if q_per_window else qw[:, win].mean(2)           # [n, W, h, d]
    s = np.einsum("nwhd,nwjhd->nwhj", qm, kw) * scale
    return np.einsum("nwhj,nwjhd->nwhd", _softmax(s), vw)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [..., head_dim] in float32, exactly as export/model.py rope_tables computes them."""
    # theta ** e rounded once to float32 (a correctly rounded pow), like torch's float32 pow
    expo = np.arange(0, head_dim, 2, dtype=np.float32) / np.float32(head_dim)
    inv_freq = np.float32(1.0) / (float(theta) ** expo.astype(np.float64)).astype(np.float32)
    freqs = np.asarray(positions, np.float32)[..., None] * inv_freq
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb), np.sin(emb)


def apply_rope(x: np.ndarray, positions: np.ndarray, theta: float) -> np.ndarray:
    """Llama-style RoPE (non-interleaved halves) in fp32, rounded to fp16 like apply_rope on an fp16
    model. x [..., T, H, D] with positions [..., T]."""
    d = x.shape[-1]
    cos, sin = rope_tables(positions, d, theta)
    cos, sin = cos[..., None, :], sin[..., None, :]           # broadcast over heads
    xf = np.asarray(x, np.float32)
    rot = np.concatenate([-xf[..., d // 2:], xf[..., : d // 2]], -1)
    return (xf * cos + rot * sin).astype(_F16)


def _positions(cache_lens: np.ndarray, seq: int, positions: np.ndarray | None) -> np.ndarray:
    if positions is not None:
        return np.asarray(positions).reshape(len(cache_lens), seq)
    return np.asarray(cache_lens)[:, None] + np.arange(seq)[None]


def kv_cache_append(k: np.ndarray, v: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray,
                    cache_lens: np.ndarray, theta: float, positions: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """New caches with rope(k) and v ([B, T, Hkv, D]) written at cache_lens[b] + t (rows past
    max_len dropped)."""
    kc, vc = k_cache.copy(), v_cache.copy()
    b_, t_ = k.shape[:2]
    pos = _positions(cache_lens, t_, positions)
    kr = apply_rope(k, pos, theta)
    max_len = kc.shape[2]
    for b in range(b_):
        for t in range(t_):
            dst = int(cache_lens[b]) + t
            if dst < max_len:
                kc[b, :, dst] = kr[b, t]
                vc[b, :, dst] = np.asarray(v[b, t], _F16)
    return kc, vc


def cached_attention(q: np.ndarray, k_cache: np.ndarray, v_cache: np.ndarray, cache_lens: np.ndarray,
                     theta: float, positions: np.ndarray | None = None, scale: float | None = None) -> np.ndarray:
    """Causal attention of q [B, T, H, D] (new tokens at cache indices cache_lens[b] + t, before
    RoPE) over caches that already hold them. GQA: head h reads KV head h // (H // Hkv)."""
    b_, t_, h_, d = q.shape
    hkv = k_cache.shape[1]
    scale = 1.0 / np.sqrt(d) if scale is None else scale
    qr = apply_rope(q, _positions(cache_lens, t_, positions), theta).astype(np.float64)
    out = np.zeros((b_, t_, h_, d))
    for b in range(b_):
        n = int(cache_lens[b]) + t_
        kk = k_cache[b, :, :n].astype(np.float64)                # [Hkv, n, D]
        vv = v_cache[b, :, :n].astype(np.float64)
        for h in range(h_):
            kv = h // (h_ // hkv)
            s = qr[b, :, h] @ kk[kv].T * scale                   # [T, n]
            s[np.arange(n)[None, :] > (int(cache_lens[b]) + np.arange(t_))[:, None]] = -np.inf
            out[b, :, h] = _softmax(s) @ vv[kv]
    return out


def decoder_prefill(q, k, v, k_cache, v_cache, cache_lens, theta, positions=None, scale=None):
    """(out [B, T, H, D], k_cache, v_cache): append then causal attention (molmo_decoder_prefill)."""
    kc, vc = kv_cache_append(k, v, k_cache, v_cache, cache_lens, theta, positions)
    return cached_attention(q, kc, vc, cache_lens, theta, positions, scale), kc, vc


def decoder_decode(q, k, v, k_cache, v_cache, cache_lens, theta, positions=None, scale=None):
    """One token per batch row: q [B, H, D], k/v [B, Hkv, D] -> (out [B, H, D], k_cache, v_cache)."""
    pos = None if positions is None else np.asarray(positions).reshape(-1, 1)
    out, kc, vc = decoder_prefill(q[:, None], k[:, None], v[:, None], k_cache, v_cache, cache_lens, theta, pos, scale)
    return out[:, 0], kc, vc
