// Decoder attention against the preallocated KV cache [B, H_kv, L_max, 128] (fp16, K stored
// after RoPE like the reference model's `present`):
//  * molmo_kv_append_kernel: RoPE the new keys and write K/V rows at cache_lens[b] + t
//    (used before the causal prefill kernel);
//  * molmo_decode_attention_kernel: one new token per batch row. Writes its RoPE'd K and V into
//    the cache in place, then attends over cache[0 .. cache_lens[b]] split over the sequence.
//    One CTA serves all query heads of one KV head (GQA: the K/V bytes are read once for the
//    whole group), as the M rows of m16n8k16 (up to 16 heads per CTA; more use grid.y groups).
//    Each of the 4 warps takes 16 keys of every 64-key tile; tiles stream through a 2-stage
//    cp.async ring. With several splits every CTA stores a normalised partial and its
//    log-sum-exp, and the last CTA of each (batch, KV head) to finish - counted with an atomic
//    ticket - merges them, so decode is a single launch.
#pragma once
#include "molmo_common.cuh"

namespace molmo {
constexpr int kDecodeStages = 2;
constexpr int kDecodeSmemBytes = (16 * 128 + 2 * kDecodeStages * 64 * 128) * 2 + 16;
}  // namespace molmo

// Grid (ceil(batch * seq * kv_heads * 8 / 256)), 256 threads. Rows whose destination index is
// >= max_len are dropped (the cache is full).
MOLMO_GLOBAL void __launch_bounds__(256) molmo_kv_append_kernel(
    const molmo::h16* k, const molmo::h16* v, molmo::h16* k_cache, molmo::h16* v_cache,
    long long k_sb, long long k_sh, long long k_st, long long v_sb, long long v_sh, long long v_st,
    const int* cache_lens, const int* positions, int batch, int kv_heads, int seq, int max_len,
    float theta) {
  using namespace molmo;
  const i64 idx = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  const i64 total = (i64)batch * seq * kv_heads * 8;
  if (idx >= total) return;
  const int c = (int)(idx % 8);
  i64 rest = idx / 8;
  const int hh = (int)(rest % kv_heads);
  rest /= kv_heads;
  const int t = (int)(rest % seq);
  const int b = (int)(rest / seq);
  const int dst = cache_lens[b] + t;
  if (dst >= max_len) return;
  const int pos = positions ? positions[(i64)b * seq + t] : dst;
  const h16* ks = k + b * k_sb + hh * k_sh + t * k_st;
  const h16* vs = v + b * v_sb + hh * v_sh + t * v_st;
  const i64 row = (((i64)b * kv_heads + hh) * max_len + dst) * 128;
  uint4 lo = *reinterpret_cast<const uint4*>(ks + c * 8);
  uint4 hi = *reinterpret_cast<const uint4*>(ks + (c + 8) * 8);
  rope_chunk_pair<128>(lo, hi, c, (float)pos, theta);
  *reinterpret_cast<uint4*>(k_cache + row + c * 8) = lo;
  *reinterpret_cast<uint4*>(k_cache + row + (c + 8) * 8) = hi;
  *reinterpret_cast<uint4*>(v_cache + row + c * 8) = *reinterpret_cast<const uint4*>(vs + c * 8);
  *reinterpret_cast<uint4*>(v_cache + row + (c + 8) * 8) = *reinterpret_cast<const uint4*>(vs + (c + 8) * 8);
}

// Grid (num_splits, kv_heads * ceil(G / 16), batch) with G = heads / kv_heads; 128 threads;
// kDecodeSmemBytes of dynamic shared memory (above 48 KiB: needs the opt-in attribute).
// q: [B, heads, 128] (strides q_sb, q_sh); k_new/v_new: [B, kv_heads, 128]; out like q.
// Workspace (num_splits > 1): ws_o [B, heads, num_splits, 128] f32, ws_lse [B, heads, num_splits]
// f32, ws_count [B, kv_heads * ceil(G / 16)] int32, zero before the first call (left zero).
MOLMO_GLOBAL void __launch_bounds__(128) molmo_decode_attention_kernel(
    const molmo::h16* q, const molmo::h16* k_new, const molmo::h16* v_new, molmo::h16* k_cache,
    molmo::h16* v_cache, molmo::h16* out, long long q_sb, long long q_sh, long long k_sb,
    long long k_sh, long long v_sb, long long v_sh, long long o_sb, long long o_sh,
    const int* cache_lens, const int* positions, int heads, int kv_heads, int max_len,
    int num_splits, float theta, float scale_log2, float* ws_o, float* ws_lse, int* ws_count) {
  using namespace molmo;
  constexpr int D = 128, BN = 64, KS = D / 16, NT = D / 8;
  MOLMO_DYNAMIC_SMEM(smem_raw);
  h16* sQ = reinterpret_cast<h16*>(smem_raw);
  h16* sK = sQ + 16 * D;
  h16* sV = sK + kDecodeStages * BN * D;
  int* s_flag = reinterpret_cast<int*>(sV + kDecodeStages * BN * D);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int g = lane >> 2, tig = lane & 3;
  const int G = heads / kv_heads;
  const int qgroups = (G + 15) / 16;
  const int b = blockIdx.z, split = blockIdx.x;
  const int kvh = blockIdx.y / qgroups, qg = blockIdx.y % qgroups;
  const int h0 = kvh * G + qg * 16;
  const int nq = imin(16, G - qg * 16);
  const float sl2 = scale_log2;

  const int past = cache_lens[b];
  const int L = imin(past + 1, max_len);  // keys including the new token
  const int n_tiles = (L + BN - 1) / BN;
  const int tps = (n_tiles + num_splits - 1) / num_splits;
  const int t_begin = split * tps, t_end = imin(t_begin + tps, n_tiles);
  const float rope_pos = (float)(positions ? positions[b] : past);
  const i64 head_off = ((i64)b * kv_heads + kvh) * max_len * D;
  h16* kc = k_cache + head_off;
  h16* vc = v_cache + head_off;

  // Cached rows come from the cache; the new row (index `past`) is not read back from global
  // memory: its tile gets it patched into shared memory from registers. So the first tiles can
  // be in flight while Q and the new K are RoPE'd.
  const int n_cached = imin(past, max_len);
  const bool has_new = past < max_len;
#pragma unroll
  for (int s = 0; s < kDecodeStages; ++s) {
    const int t = t_begin + s;
    if (t < t_end) {
      load_tile_async<D>(sK + s * BN * D, kc, D, t * BN, n_cached, tid);
      load_tile_async<D>(sV + s * BN * D, vc, D, t * BN, n_cached, tid);
    }
    cp_async_commit();
  }

  // Q rows (one per query head of the group), RoPE'd; rows >= nq stay zero.
  {
    const int r = tid >> 3, c = tid & 7;  // 16 rows x 8 chunk pairs = 128 threads
    uint4 lo = make_uint4(0, 0, 0, 0), hi = make_uint4(0, 0, 0, 0);
    if (r < nq) {
      const h16* qp = q + b * q_sb + (i64)(h0 + r) * q_sh;
      lo = *reinterpret_cast<const uint4*>(qp + c * 8);
      hi = *reinterpret_cast<const uint4*>(qp + (c + 8) * 8);
      rope_chunk_pair<D>(lo, hi, c, rope_pos, theta);
    }
    *reinterpret_cast<uint4*>(sQ + swz<D>(r, c)) = lo;
    *reinterpret_cast<uint4*>(sQ + swz<D>(r, c + 8)) = hi;
  }
  // The CTA(s) whose range holds the new token: RoPE its K, keep K/V in registers (threads 0-7:
  // K chunk pairs, 8-15: V chunk pairs) for the shared-memory patch, and write them to the cache.
  // Several query groups may cover the same tile; they write identical bits.
  const bool owns_new = has_new && past >= t_begin * BN && past < t_end * BN;
  uint4 new_lo = make_uint4(0, 0, 0, 0), new_hi = make_uint4(0, 0, 0, 0);
  if (owns_new && tid < 16) {
    const int c = tid & 7;
    const h16* src = tid < 8 ? k_new + b * k_sb + kvh * k_sh : v_new + b * v_sb + kvh * v_sh;
    new_lo = *reinterpret_cast<const uint4*>(src + c * 8);
    new_hi = *reinterpret_cast<const uint4*>(src + (c + 8) * 8);
    if (tid < 8) rope_chunk_pair<D>(new_lo, new_hi, c, rope_pos, theta);
    h16* dst = (tid < 8 ? kc : vc) + (i64)past * D;
    *reinterpret_cast<uint4*>(dst + c * 8) = new_lo;
    *reinterpret_cast<uint4*>(dst + (c + 8) * 8) = new_hi;
  }
  __syncthreads();  // Q staged

  unsigned qa[KS][4];
#pragma unroll
  for (int ks = 0; ks < KS; ++ks) ldsm_x4(qa[ks], sQ + swz<D>(lane & 15, 2 * ks + (lane >> 4)));

  float O[NT][4];
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int e = 0; e < 4; ++e) O[nt][e] = 0.f;
  float m_run[2] = {neg_inf(), neg_inf()}, l_run[2] = {0.f, 0.f};

  for (int t = t_begin; t < t_end; ++t) {
    const int stage = (t - t_begin) % kDecodeStages;
    const h16* sKs = sK + stage * BN * D;
    const h16* sVs = sV + stage * BN * D;
    cp_async_wait<kDecodeStages - 1>();
    __syncthreads();
    if (owns_new && past / BN == t) {  // block-uniform
      if (tid < 16) {
        h16* s = (tid < 8 ? sK : sV) + stage * BN * D;
        const int r = past - t * BN, c = tid & 7;
        *reinterpret_cast<uint4*>(s + swz<D>(r, c)) = new_lo;
        *reinterpret_cast<uint4*>(s + swz<D>(r, c + 8)) = new_hi;
      }
      __syncthreads();
    }
    const int key0 = t * BN + warp * 16;
    if (key0 < L) {
      float S[2][4] = {{0.f, 0.f, 0.f, 0.f}, {0.f, 0.f, 0.f, 0.f}};
#pragma unroll
      for (int ks = 0; ks < KS; ++ks) {
        unsigned r[4];
        ldsm_x4(r, sKs + swz<D>(warp * 16 + (lane & 7) + ((lane >> 4) << 3), 2 * ks + ((lane >> 3) & 1)));
        mma16816(S[0], qa[ks], r[0], r[1]);
        mma16816(S[1], qa[ks], r[2], r[3]);
      }
      if (key0 + 16 > L) {
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (key0 + 8 * nt + 2 * tig + (e & 1) >= L) S[nt][e] = neg_inf();
      }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        float mx = fmaxf(m_run[hf], fmaxf(fmaxf(S[0][2 * hf], S[0][2 * hf + 1]), fmaxf(S[1][2 * hf], S[1][2 * hf + 1])));
        mx = fmaxf(mx, shfl_xor(mx, 1));
        mx = fmaxf(mx, shfl_xor(mx, 2));
        const float m_use = mx == neg_inf() ? 0.f : mx;
        const float alpha = fast_exp2((m_run[hf] - m_use) * sl2);
        m_run[hf] = mx;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 2; ++nt)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float p = fast_exp2(fmaf(S[nt][2 * hf + e], sl2, -m_use * sl2));
            S[nt][2 * hf + e] = p;
            sum += p;
          }
        l_run[hf] = l_run[hf] * alpha + sum;
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          O[nt][2 * hf] *= alpha;
          O[nt][2 * hf + 1] *= alpha;
        }
      }
      const unsigned pa[4] = {pack_h2(S[0][0], S[0][1]), pack_h2(S[0][2], S[0][3]),
                              pack_h2(S[1][0], S[1][1]), pack_h2(S[1][2], S[1][3])};
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        unsigned r[4];
        ldsm_x4_trans(r, sVs + swz<D>(warp * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)));
        mma16816(O[2 * dp], pa, r[0], r[1]);
        mma16816(O[2 * dp + 1], pa, r[2], r[3]);
      }
    }
    __syncthreads();  // this stage is free again
    if (t + kDecodeStages < t_end) {
      load_tile_async<D>(sK + stage * BN * D, kc, D, (t + kDecodeStages) * BN, n_cached, tid);
      load_tile_async<D>(sV + stage * BN * D, vc, D, (t + kDecodeStages) * BN, n_cached, tid);
    }
    cp_async_commit();
  }
  cp_async_wait<0>();

  // ---- merge the 4 warps (each saw a different quarter of every tile) through shared memory
  float* sm_o = reinterpret_cast<float*>(sK);  // [4][16][128]
  float* sm_m = sm_o + 4 * 16 * D;             // [4][16]
  float* sm_l = sm_m + 4 * 16;                 // [4][16]
  __syncthreads();
#pragma unroll
  for (int hf = 0; hf < 2; ++hf) {
    float l = l_run[hf];
    l += shfl_xor(l, 1);
    l += shfl_xor(l, 2);
    const int row = g + 8 * hf;
    if (tig == 0) {
      sm_m[warp * 16 + row] = m_run[hf];
      sm_l[warp * 16 + row] = l;
    }
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      sm_o[(warp * 16 + row) * D + 8 * nt + 2 * tig] = O[nt][2 * hf];
      sm_o[(warp * 16 + row) * D + 8 * nt + 2 * tig + 1] = O[nt][2 * hf + 1];
    }
  }
  __syncthreads();

  const int row = tid >> 3, d0 = (tid & 7) * 16;  // 16 rows x 16 dims per thread
  float acc[16];
  float M = neg_inf();
#pragma unroll
  for (int w = 0; w < 4; ++w) M = fmaxf(M, sm_m[w * 16 + row]);
  const float M_use = M == neg_inf() ? 0.f : M;
  float lsum = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0.f;
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const float wgt = fast_exp2((sm_m[w * 16 + row] - M_use) * sl2);
    lsum += sm_l[w * 16 + row] * wgt;
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] += sm_o[(w * 16 + row) * D + d0 + i] * wgt;
  }
  const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
  const int hq = h0 + row;

  if (num_splits == 1) {
    if (row < nq) {
      h16* op = out + b * o_sb + (i64)hq * o_sh + d0;
      unsigned pk[8];
#pragma unroll
      for (int i = 0; i < 8; ++i) pk[i] = pack_h2(acc[2 * i] * inv, acc[2 * i + 1] * inv);
      *reinterpret_cast<uint4*>(op) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
      *reinterpret_cast<uint4*>(op + 8) = make_uint4(pk[4], pk[5], pk[6], pk[7]);
    }
    return;
  }

  // ---- split-K: publish the normalised partial and its log2-sum-exp, then the last CTA merges
  const i64 part = ((i64)b * heads + hq) * num_splits;
  if (row < nq) {
    float* wo = ws_o + (part + split) * D + d0;
#pragma unroll
    for (int i = 0; i < 16; ++i) wo[i] = acc[i] * inv;
    if ((tid & 7) == 0) ws_lse[part + split] = lsum > 0.f ? M_use * sl2 + log2f(lsum) : neg_inf();
  }
  __threadfence();
  __syncthreads();
  int* ticket = ws_count + (i64)b * gridDim.y + blockIdx.y;
  if (tid == 0) *s_flag = atomicAdd(ticket, 1) == num_splits - 1;
  __syncthreads();
  if (!*s_flag) return;
  __threadfence();
  if (row < nq) {
    float lmax = neg_inf();
    for (int s = 0; s < num_splits; ++s) lmax = fmaxf(lmax, ldcg_f32(ws_lse + part + s));
    float den = 0.f;
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    for (int s = 0; s < num_splits; ++s) {
      const float ls = ldcg_f32(ws_lse + part + s);
      if (ls == neg_inf()) continue;
      const float wgt = fast_exp2(ls - lmax);
      den += wgt;
      const float* wo = ws_o + (part + s) * D + d0;
#pragma unroll
      for (int i = 0; i < 16; ++i) acc[i] += wgt * ldcg_f32(wo + i);
    }
    const float dinv = den > 0.f ? 1.f / den : 0.f;
    h16* op = out + b * o_sb + (i64)hq * o_sh + d0;
    unsigned pk[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) pk[i] = pack_h2(acc[2 * i] * dinv, acc[2 * i + 1] * dinv);
    *reinterpret_cast<uint4*>(op) = make_uint4(pk[0], pk[1], pk[2], pk[3]);
    *reinterpret_cast<uint4*>(op + 8) = make_uint4(pk[4], pk[5], pk[6], pk[7]);
  }
  if (tid == 0) *ticket = 0;  // ready for the next call
}
