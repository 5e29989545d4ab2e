// 2x2 attention pooling of the Molmo connector ("attention-meanq"), fused with the mean:
// for every 2x2 window of the patch grid and every head, the query is the mean of the window's
// 4 projected queries (= Wq . mean(x) + bq, since the projection is affine), attending over the
// window's 4 keys/values with an fp32 softmax. Optionally q is already one row per window.
//
// Why CUDA cores and not mma: per (window, head) this reads 12 rows of 64 halves (1.5 KiB) and
// does 512 FMAs, ~0.3 FMA per byte. It is bound by memory bandwidth by two orders of magnitude,
// so the kernel is shaped for bandwidth instead: 8 lanes per (window, head), 16-byte loads,
// consecutive lane groups on consecutive heads of the same token rows (coalesced).
#pragma once
#include "molmo_common.cuh"

// Grid ceil(n_crops * windows * heads / 16), 128 threads. q/k/v/out element strides
// (batch, head, token); tokens are patches in raster order of the grid_h x grid_w grid (q: one
// per window instead when q_per_window != 0); out has one token per window, windows in raster
// order of the (grid_h/2) x (grid_w/2) grid. head_dim 64.
MOLMO_GLOBAL void __launch_bounds__(128) molmo_attention_pool_kernel(
    const molmo::h16* q, const molmo::h16* k, const molmo::h16* v, molmo::h16* out,
    long long q_sb, long long q_sh, long long q_st, long long k_sb, long long k_sh, long long k_st,
    long long v_sb, long long v_sh, long long v_st, long long o_sb, long long o_sh, long long o_st,
    int n_crops, int heads, int grid_h, int grid_w, int q_per_window, float scale) {
  using namespace molmo;
  const int lane8 = threadIdx.x & 7;
  const int wins_w = grid_w / 2, n_win = (grid_h / 2) * wins_w;
  const i64 total = (i64)n_crops * n_win * heads;
  i64 item = (i64)blockIdx.x * 16 + (threadIdx.x >> 3);
  const bool valid = item < total;
  if (!valid) item = total - 1;  // idle groups still join the shuffles below
  const int h = (int)(item % heads);
  const i64 rest = item / heads;
  const int w = (int)(rest % n_win);
  const int n = (int)(rest / n_win);
  const int wy = w / wins_w, wx = w % wins_w;
  int patch[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) patch[i] = (2 * wy + (i >> 1)) * grid_w + 2 * wx + (i & 1);

  float qf[8];
  if (q_per_window) {
    uint4 u = *reinterpret_cast<const uint4*>(q + n * q_sb + h * q_sh + (i64)w * q_st + lane8 * 8);
    const unsigned* p = reinterpret_cast<const unsigned*>(&u);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      qf[2 * j] = lo_f(p[j]);
      qf[2 * j + 1] = hi_f(p[j]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < 8; ++j) qf[j] = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      uint4 u = *reinterpret_cast<const uint4*>(q + n * q_sb + h * q_sh + (i64)patch[i] * q_st + lane8 * 8);
      const unsigned* p = reinterpret_cast<const unsigned*>(&u);
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        qf[2 * j] += lo_f(p[j]);
        qf[2 * j + 1] += hi_f(p[j]);
      }
    }
#pragma unroll
    for (int j = 0; j < 8; ++j) qf[j] *= 0.25f;
  }

  float s[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 u = *reinterpret_cast<const uint4*>(k + n * k_sb + h * k_sh + (i64)patch[i] * k_st + lane8 * 8);
    const unsigned* p = reinterpret_cast<const unsigned*>(&u);
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) acc += qf[2 * j] * lo_f(p[j]) + qf[2 * j + 1] * hi_f(p[j]);
    // reduce over the 8 lanes of this group (xor 1, 2, 4 stays inside an aligned group of 8)
    acc += shfl_xor(acc, 1);
    acc += shfl_xor(acc, 2);
    acc += shfl_xor(acc, 4);
    s[i] = acc * scale;
  }
  const float mx = fmaxf(fmaxf(s[0], s[1]), fmaxf(s[2], s[3]));
  float den = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    s[i] = expf(s[i] - mx);
    den += s[i];
  }
  const float inv = 1.f / den;

  float o[8];
#pragma unroll
  for (int j = 0; j < 8; ++j) o[j] = 0.f;
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    uint4 u = *reinterpret_cast<const uint4*>(v + n * v_sb + h * v_sh + (i64)patch[i] * v_st + lane8 * 8);
    const unsigned* p = reinterpret_cast<const unsigned*>(&u);
    const float pi = s[i] * inv;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      o[2 * j] += pi * lo_f(p[j]);
      o[2 * j + 1] += pi * hi_f(p[j]);
    }
  }
  if (valid)
    *reinterpret_cast<uint4*>(out + n * o_sb + h * o_sh + (i64)w * o_st + lane8 * 8) =
        make_uint4(pack_h2(o[0], o[1]), pack_h2(o[2], o[3]), pack_h2(o[4], o[5]), pack_h2(o[6], o[7]));
}
