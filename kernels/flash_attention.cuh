// Flash-attention forward (FlashAttention-2 scheme) on mma.sync m16n8k16 tensor cores, shared by
//  * the ViT attention: non-causal, head_dim 64, Q/K/V/O strided [batch, seq, heads, 64]-like,
//    128-row query tiles, 4 warps x 32 rows (two m16 tiles per warp so each K/V fragment
//    read from shared memory feeds two mma: the 16-row variant is shared-memory-bound);
//  * the decoder prefill: causal, head_dim 128, RoPE applied to Q on load, K/V read from the
//    preallocated cache [B, H_kv, L_max, 128] (written by molmo_kv_append_kernel first),
//    GQA by head index, 64-row query tiles (4 warps x 16 rows; 32 rows x 128 dims of fp32
//    accumulators would spill).
// K/V tiles of 64 keys live in swizzled shared memory, loaded with cp.async while the previous
// stage computes; S = Q K^T stays in registers and is turned into the A operand of P V directly
// (the m16n8 accumulator layout of two adjacent n-tiles is the m16k16 A layout). No S x S
// matrix exists anywhere.
#pragma once
#include "molmo_common.cuh"

namespace molmo {

struct FlashArgs {
  const h16* q;
  const h16* k;
  const h16* v;
  h16* o;
  i64 q_sb, q_sh, q_st;  // element strides: batch, head, token (head_dim is contiguous)
  i64 k_sb, k_sh, k_st;
  i64 v_sb, v_sh, v_st;
  i64 o_sb, o_sh, o_st;
  int heads, kv_heads;
  int seq_q;             // query tokens
  int seq_k;             // ViT: keys; prefill: cache capacity L_max (keys come from cache_lens)
  float scale_log2;      // softmax scale * log2(e)
  const int* cache_lens; // prefill: tokens already cached per batch row (before this call)
  const int* positions;  // prefill: RoPE positions [B, seq_q] or null (= cache index)
  float theta;
};

template <int D, int MT, bool PREFILL>
MOLMO_DEVICE void flash_attention_tile(const FlashArgs& a) {
  constexpr int WARPS = 4, BM = 16 * MT * WARPS, BN = 64, CH = D / 8, KS = D / 16, NT = D / 8;
  MOLMO_DYNAMIC_SMEM(smem_raw);
  h16* sQ = reinterpret_cast<h16*>(smem_raw);
  h16* sK = sQ + BM * D;
  h16* sV = sK + BN * D;

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int b = blockIdx.z, h = blockIdx.y;
  // Causal tiles near the end of the sequence do the most work: start them first.
  const int m_tile = PREFILL ? (int)(gridDim.x - 1 - blockIdx.x) : (int)blockIdx.x;
  const int m0 = m_tile * BM;
  const int kvh = h / (a.heads / a.kv_heads);
  const float sl2 = a.scale_log2;

  const int past = PREFILL ? a.cache_lens[b] : 0;
  // Keys this CTA needs: all of them (ViT) or up to its last query row (causal).
  int n_keys = PREFILL ? imin(past + imin(m0 + BM, a.seq_q), a.seq_k) : a.seq_k;
  const int warp_row0 = m0 + warp * 16 * MT;
  const bool warp_active = warp_row0 < a.seq_q;
  // Exclusive end of the keys any row of this warp may see; later 16-key chunks are skipped.
  const int warp_kend = PREFILL ? imin(n_keys, past + imin(warp_row0 + 16 * MT, a.seq_q)) : n_keys;

  const h16* qp = a.q + b * a.q_sb + h * a.q_sh;
  const h16* kp = a.k + b * a.k_sb + kvh * a.k_sh;
  const h16* vp = a.v + b * a.v_sb + kvh * a.v_sh;
  h16* op = a.o + b * a.o_sb + h * a.o_sh;

  // ---- first K/V tiles in flight before anything else (the RoPE of Q below overlaps them)
  load_tile_async<D>(sK, kp, a.k_st, 0, n_keys, tid);
  if (!PREFILL) {  // ViT Q: async copy in the same group as K_0
#pragma unroll
    for (int i = 0; i < BM * CH / 128; ++i) {
      const int idx = tid + i * 128;
      const int r = idx / CH, c = idx % CH;
      const bool ok = m0 + r < a.seq_q;
      cp_async16(sQ + swz<D>(r, c), qp + (ok ? (i64)(m0 + r) * a.q_st + c * 8 : 0), ok);
    }
  }
  cp_async_commit();
  load_tile_async<D>(sV, vp, a.v_st, 0, n_keys, tid);
  cp_async_commit();
  if (PREFILL) {  // Q with RoPE in fp32, rounded to fp16 like apply_rope
    for (int idx = tid; idx < BM * (CH / 2); idx += 128) {
      const int r = idx / (CH / 2), c = idx % (CH / 2);
      const int t = m0 + r;
      uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
      if (t < a.seq_q) {
        lo = *reinterpret_cast<const uint4*>(qp + (i64)t * a.q_st + c * 8);
        hi = *reinterpret_cast<const uint4*>(qp + (i64)t * a.q_st + (c + CH / 2) * 8);
        const int pos = a.positions ? a.positions[(i64)b * a.seq_q + t] : past + t;
        rope_chunk_pair<D>(lo, hi, c, (float)pos, a.theta);
      }
      *reinterpret_cast<uint4*>(sQ + swz<D>(r, c)) = lo;
      *reinterpret_cast<uint4*>(sQ + swz<D>(r, c + CH / 2)) = hi;
    }
  }

  unsigned qa[MT][KS][4];
  float O[MT][NT][4];
  float m_run[MT][2], l_run[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) O[mt][nt][e] = 0.f;
    m_run[mt][0] = m_run[mt][1] = neg_inf();
    l_run[mt][0] = l_run[mt][1] = 0.f;
  }

  const int n_tiles = (n_keys + BN - 1) / BN;
  for (int j = 0; j < n_tiles; ++j) {
    const int kbase = j * BN;
    cp_async_wait<1>();  // K_j (and Q) have landed; V_j may still be in flight
    __syncthreads();
    if (j == 0 && warp_active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int ks = 0; ks < KS; ++ks)
          ldsm_x4(qa[mt][ks], sQ + swz<D>(warp * 16 * MT + mt * 16 + (lane & 15), 2 * ks + (lane >> 4)));
    }

    float S[MT][8][4];
    if (warp_active) {
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e) S[mt][nt][e] = 0.f;
      // S = Q K^T: ldmatrix (non-transposed) of K rows gives the col-major B operand.
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          if (kbase + 16 * np >= warp_kend) continue;
          unsigned r[4];
          ldsm_x4(r, sK + swz<D>(16 * np + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816(S[mt][2 * np], qa[mt][ks], r[0], r[1]);
            mma16816(S[mt][2 * np + 1], qa[mt][ks], r[2], r[3]);
          }
        }
      }
      // Mask keys past the end, past the causal diagonal, and skipped chunks.
      const bool need_mask = kbase + BN > warp_kend || (PREFILL && kbase + BN > past + warp_row0 + 1);
      if (need_mask) {
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int col = kbase + 8 * nt + 2 * tig + (e & 1);
              const int row = warp_row0 + mt * 16 + g + 8 * (e >> 1);
              bool masked = col >= warp_kend;
              if (PREFILL) masked = masked || col > past + row;
              if (masked) S[mt][nt][e] = neg_inf();
            }
      }
      // Online softmax; row max over the 4 threads (a quad) that share a row. l stays a
      // per-thread partial sum until the end (the same alpha applies to every partial).
#pragma unroll
      for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          float mx = m_run[mt][hf];
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(S[mt][nt][2 * hf], S[mt][nt][2 * hf + 1]));
          mx = fmaxf(mx, shfl_xor(mx, 1));
          mx = fmaxf(mx, shfl_xor(mx, 2));
          const float m_use = mx == neg_inf() ? 0.f : mx;
          const float alpha = fast_exp2((m_run[mt][hf] - m_use) * sl2);
          m_run[mt][hf] = mx;
          const float mb = m_use * sl2;
          float sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              const float p = fast_exp2(fmaf(S[mt][nt][2 * hf + e], sl2, -mb));
              S[mt][nt][2 * hf + e] = p;
              sum += p;
            }
          l_run[mt][hf] = l_run[mt][hf] * alpha + sum;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            O[mt][nt][2 * hf] *= alpha;
            O[mt][nt][2 * hf + 1] *= alpha;
          }
        }
    }

    cp_async_wait<0>();  // V_j landed
    __syncthreads();     // ... and every warp is done reading sK
    if (j + 1 < n_tiles) load_tile_async<D>(sK, kp, a.k_st, kbase + BN, n_keys, tid);
    cp_async_commit();

    if (warp_active) {
      // O += P V: P from the S accumulators, V^T fragments by transposed ldmatrix.
#pragma unroll
      for (int kc = 0; kc < 4; ++kc) {
        if (kbase + 16 * kc >= warp_kend) continue;
        unsigned pa[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          pa[mt][0] = pack_h2(S[mt][2 * kc][0], S[mt][2 * kc][1]);
          pa[mt][1] = pack_h2(S[mt][2 * kc][2], S[mt][2 * kc][3]);
          pa[mt][2] = pack_h2(S[mt][2 * kc + 1][0], S[mt][2 * kc + 1][1]);
          pa[mt][3] = pack_h2(S[mt][2 * kc + 1][2], S[mt][2 * kc + 1][3]);
        }
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          unsigned r[4];
          ldsm_x4_trans(r, sV + swz<D>(16 * kc + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)));
#pragma unroll
          for (int mt = 0; mt < MT; ++mt) {
            mma16816(O[mt][2 * dp], pa[mt], r[0], r[1]);
            mma16816(O[mt][2 * dp + 1], pa[mt], r[2], r[3]);
          }
        }
      }
    }
    __syncthreads();  // every warp is done reading sV
    if (j + 1 < n_tiles) load_tile_async<D>(sV, vp, a.v_st, kbase + BN, n_keys, tid);
    cp_async_commit();
  }
  cp_async_wait<0>();

  if (!warp_active) return;
  // Normalise, stage this warp's rows in its own slice of sQ, then 16-byte coalesced stores.
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {
      float l = l_run[mt][hf];
      l += shfl_xor(l, 1);
      l += shfl_xor(l, 2);
      const float inv = l > 0.f ? 1.f / l : 0.f;
      const int row = warp * 16 * MT + mt * 16 + g + 8 * hf;
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
        *reinterpret_cast<unsigned*>(sQ + swz<D>(row, nt) + 2 * tig) =
            pack_h2(O[mt][nt][2 * hf] * inv, O[mt][nt][2 * hf + 1] * inv);
    }
  __syncwarp();
  constexpr int R = 16 * MT;
#pragma unroll
  for (int i = 0; i < R * CH / 32; ++i) {
    const int idx = lane + 32 * i;
    const int r = idx / CH, c = idx % CH;
    const int t = warp_row0 + r;
    if (t < a.seq_q)
      *reinterpret_cast<uint4*>(op + (i64)t * a.o_st + c * 8) =
          *reinterpret_cast<const uint4*>(sQ + swz<D>(warp * R + r, c));
  }
}

}  // namespace molmo

// ViT attention: grid (ceil(seq / 128), heads, n_crops), 128 threads, 32 KiB dynamic smem.
MOLMO_GLOBAL void __launch_bounds__(128) molmo_vit_attention_kernel(
    const molmo::h16* q, const molmo::h16* k, const molmo::h16* v, molmo::h16* o,
    long long q_sb, long long q_sh, long long q_st, long long k_sb, long long k_sh, long long k_st,
    long long v_sb, long long v_sh, long long v_st, long long o_sb, long long o_sh, long long o_st,
    int heads, int seq, float scale_log2) {
  molmo::FlashArgs a{q, k, v, o, q_sb, q_sh, q_st, k_sb, k_sh, k_st, v_sb, v_sh, v_st,
                     o_sb, o_sh, o_st, heads, heads, seq, seq, scale_log2, nullptr, nullptr, 0.f};
  molmo::flash_attention_tile<64, 2, false>(a);
}

// Causal prefill over the cache: grid (ceil(seq / 64), heads, batch), 128 threads, 48 KiB smem.
// Keys/values come from k_cache/v_cache [B, kv_heads, max_len, 128]; query row t of batch b sits
// at cache index cache_lens[b] + t and sees keys 0 .. cache_lens[b] + t.
MOLMO_GLOBAL void __launch_bounds__(128) molmo_prefill_attention_kernel(
    const molmo::h16* q, const molmo::h16* k_cache, const molmo::h16* v_cache, molmo::h16* o,
    long long q_sb, long long q_sh, long long q_st, long long o_sb, long long o_sh, long long o_st,
    const int* cache_lens, const int* positions, int heads, int kv_heads, int seq, int max_len,
    float theta, float scale_log2) {
  const long long hs = (long long)max_len * 128;
  molmo::FlashArgs a{q, k_cache, v_cache, o, q_sb, q_sh, q_st, hs * kv_heads, hs, 128,
                     hs * kv_heads, hs, 128, o_sb, o_sh, o_st, heads, kv_heads, seq, max_len,
                     scale_log2, cache_lens, positions, theta};
  molmo::flash_attention_tile<128, 1, true>(a);
}
