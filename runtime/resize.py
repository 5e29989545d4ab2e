"""torch.nn.functional.interpolate(mode="bilinear", align_corners=False) in numpy, bit for bit: with antialias
(Molmo v1) and without (Molmo2, `resize_bilinear`).

Molmo v1's processor resizes with torchvision, i.e. this kernel in float32; reproducing its taps and
arithmetic exactly is what makes the runtime's crops identical to AI2's (molmo-spec.md §3.3). The
filter is applied as dense band blocks of the sparse resize matrix (one matmul per block), which is
fast in numpy without a per-pixel loop.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np

_F32 = np.float32


@lru_cache(maxsize=64)
def _aa_taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: K source indices and float32 weights of the antialiased triangle filter.

    Mirrors torch's CPU kernel (PIL-style bounds) including its float32 arithmetic, so that the
    weights, and hence the resized pixels, agree to the last bit or two. Unused taps point at a valid
    index with weight 0.
    """
    scale = _F32(in_size) / _F32(out_size)
    support = scale if scale >= 1.0 else _F32(1.0)
    max_taps = int(np.ceil(support)) * 2 + 1
    invscale = _F32(1.0 / float(scale)) if scale >= 1.0 else _F32(1.0)

    i = np.arange(out_size, dtype=np.float64)
    center = (float(scale) * (i + 0.5)).astype(_F32)
    lo = np.maximum(np.trunc((center - support).astype(np.float64) + 0.5), 0).astype(np.int64)
    hi = np.minimum(np.trunc((center + support).astype(np.float64) + 0.5), in_size).astype(np.int64)
    size = np.clip(hi - lo, 0, max_taps)

    j = np.arange(max_taps, dtype=np.int64)
    src = lo[:, None] + j[None, :]
    x = (src.astype(_F32) - center[:, None]).astype(np.float64)
    x = np.abs(((x + 0.5) * float(invscale)).astype(_F32))
    w = np.where(x < 1.0, (1.0 - x.astype(np.float64)).astype(_F32), _F32(0.0))
    valid = j[None, :] < size[:, None]
    w = np.where(valid, w, _F32(0.0)).astype(_F32)
    total = np.zeros(out_size, dtype=_F32)
    for k in range(max_taps):  # sequential float32 sum, like the kernel
        total = total + w[:, k]
    nz = total != 0
    w[nz] = w[nz] / total[nz, None]

    n_taps = max(int(size.max()), 1)
    idx = np.where(valid, src, lo[:, None])[:, :n_taps]
    idx = np.minimum(idx, in_size - 1).astype(np.intp)
    w = np.ascontiguousarray(w[:, :n_taps])
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


_BLOCK = 4  # output samples per band block: a (block x span) dense slice of the sparse filter matrix
# Each matmul is kept at m*n*k <= this, below OpenBLAS's single-thread threshold (4 * 65536): the
# blocks are far too small to gain from threads, and BLAS threads that spin on a busy CPU (e.g. next
# to an inference runtime) made a resize 20x slower in tests.
_MAX_MNK = 3 * 65536


@lru_cache(maxsize=64)
def _aa_band(in_size: int, out_size: int, channels: int = 0) -> tuple[tuple[int, int, int, int, np.ndarray], ...]:
    """The filter matrix [out, in] cut into row blocks, each keeping only the input columns it touches.

    Applying it block by block is a few small BLAS matmuls instead of a per-pixel loop. BLAS
    accumulates each output in input order with fused multiply-adds, like torch's kernel, so the
    result is usually bit-identical to torch (zero weights are exact no-ops for finite inputs).
    Each block is (out_start, out_end, in_lo, in_hi, W[out_start:out_end, in_lo:in_hi]) in units of
    samples (channels=0: for left-multiplying, the height pass). With channels >= 1 the block is for
    the width pass over interleaved data (indices times `channels`) and holds the transposed,
    channel-expanded matrix kron(W_block.T, I_channels), ready to right-multiply.
    """
    idx, w = _aa_taps(in_size, out_size)
    blocks = []
    for s in range(0, out_size, _BLOCK):
        e = min(s + _BLOCK, out_size)
        bi, bw = idx[s:e], w[s:e]
        lo, hi = int(bi.min()), int(bi.max()) + 1
        m = np.zeros((e - s, hi - lo), dtype=_F32)
        rows = np.arange(e - s)
        for k in range(bi.shape[1]):
            m[rows, bi[:, k] - lo] += bw[:, k]  # padded taps add exact zeros
        if channels >= 1:
            m = np.kron(m.T, np.eye(channels, dtype=_F32)).astype(_F32)
            s, e, lo, hi = s * channels, e * channels, lo * channels, hi * channels
        m = np.ascontiguousarray(m)
        m.setflags(write=False)
        blocks.append((s, e, lo, hi, m))
    return tuple(blocks)


def resize_into(x: np.ndarray, channels: int, out_h: int, out_w: int, dst: np.ndarray) -> None:
    """Resize interleaved float32 data x [H, W*channels] into dst [out_h, out_w*channels] (may be a
    strided view with unit column stride). Width pass first, then height: torch's order."""
    h, wc = x.shape
    w = wc // channels
    if out_w != w:
        tmp = dst if out_h == h else np.empty((h, out_w * channels), dtype=_F32)
        for s, e, lo, hi, m in _aa_band(w, out_w, channels):
            step = max(1, _MAX_MNK // m.size)  # rows per call
            for r in range(0, h, step):
                np.matmul(x[r:r + step, lo:hi], m, out=tmp[r:r + step, s:e])
        x = tmp
    if out_h != h:
        n = x.shape[1]
        for s, e, lo, hi, m in _aa_band(h, out_h):
            step = max(1, _MAX_MNK // m.size)  # columns per call
            for c in range(0, n, step):
                np.matmul(m, x[lo:hi, c:c + step], out=dst[s:e, c:c + step])
    elif out_w == w:
        dst[...] = x


def resize_bilinear_aa(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """Resize a float32 HxWxC (or HxW) image like torch's bilinear interpolate with antialias=True.

    Equivalent to ``F.interpolate(x, size=(out_h, out_w), mode="bilinear", antialias=True,
    align_corners=False)`` (= torchvision ``Resize(BILINEAR, antialias=True)`` on a float tensor):
    separable PIL-style triangle filter, width first then height, as banded matmuls. Inputs must
    be finite (a NaN would leak into neighbours through zero weights).
    """
    x = np.asarray(img, dtype=_F32)
    if x.ndim not in (2, 3):
        raise ValueError(f"resize_bilinear_aa expects HxW or HxWxC, got shape {x.shape}")
    out_h, out_w = int(out_h), int(out_w)
    if out_h < 1 or out_w < 1 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"cannot resize {x.shape[:2]} to {(out_h, out_w)}: sizes must be >= 1")
    c = 1 if x.ndim == 2 else x.shape[2]
    out = np.empty((out_h, out_w) + x.shape[2:], dtype=_F32)
    if c == 0:
        return out
    x2 = np.ascontiguousarray(x).reshape(x.shape[0], x.shape[1] * c)
    resize_into(x2, c, out_h, out_w, out.reshape(out_h, out_w * c))
    return out


def _fma(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """float32 fused multiply-add: the float32 product is exact in float64, so one float64 add then one
    rounding to float32 (double rounding is off by one ulp only in vanishingly rare cases)."""
    return (a.astype(np.float64) * b + c).astype(_F32)


def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Source indices and weights per output index, in float32 as torch computes them (the source
    coordinate `scale * (i + 0.5) - 0.5` is one fused multiply-add)."""
    if in_size == out_size:  # torch copies: weights (1, 0) on the same pixel
        i = np.arange(out_size)
        return i, i, np.ones(out_size, _F32), np.zeros(out_size, _F32)
    scale = _F32(in_size) / _F32(out_size)
    src = (np.float64(scale) * (np.arange(out_size, dtype=np.float64) + 0.5) - 0.5).astype(_F32)
    src = np.maximum(src, _F32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(_F32), _F32(0), _F32(1)).astype(_F32)
    i1 = i0 + (i0 < in_size - 1)
    return i0, i1, (_F32(1) - lam).astype(_F32), lam


def resize_bilinear(img: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """uint8 HxWxC -> uint8 out_h x out_w x C: `interpolate(mode="bilinear", antialias=False,
    align_corners=False)` on float values, round half to even, clamp (Molmo2's processors, molmo2-spec.md §5).

    With one thread and 3 channels torch runs its channels-last kernel, which sums the four taps left to right
    in float32 with fused multiply-adds (weights: float32 products of the row and column weights); this is
    that arithmetic, bit for bit. (With more threads torch takes another kernel that differs at ~3e-5 of the
    rounding ties; the goldens were made with one.)"""
    h0, h1, a0, a1 = _taps(img.shape[0], out_h)
    w0, w1, b0, b1 = _taps(img.shape[1], out_w)
    top, bot = img[h0], img[h1]  # gather in uint8: a large photo is never converted to float whole
    # four tap weights, each a float32 product (h-weight * w-weight)
    w00, w01 = (a0[:, None] * b0[None, :])[..., None], (a0[:, None] * b1[None, :])[..., None]
    w10, w11 = (a1[:, None] * b0[None, :])[..., None], (a1[:, None] * b1[None, :])[..., None]
    acc = _fma(top[:, w0], w00, top[:, w1].astype(_F32) * w01)
    acc = _fma(bot[:, w0], w10, acc)
    acc = _fma(bot[:, w1], w11, acc)
    return np.clip(np.rint(acc), 0, 255).astype(np.uint8)
