// Device helpers shared by every molmo-edge kernel: fp16 bit conversions, tensor-core mma,
// ldmatrix, cp.async, the swizzled shared-memory tile layout and RoPE.
//
// Device code never includes cuda_fp16.h or any other header, so NVRTC compiles it without a
// CUDA include path (the nvidia-cuda-nvrtc wheel alone is enough). fp16 values travel as raw
// `unsigned short` bits. When MOLMO_EMULATE is defined the same kernels are built by a host C++
// compiler against simt_emulator.cuh, which implements every primitive below on the CPU.
#pragma once

#if defined(MOLMO_EMULATE)
#include "simt_emulator.cuh"
#else
#define MOLMO_DEVICE __device__ __forceinline__
#define MOLMO_GLOBAL extern "C" __global__
#define MOLMO_DYNAMIC_SMEM(name) extern __shared__ __align__(128) unsigned char name[]
#endif

namespace molmo {

typedef unsigned short h16;   // IEEE binary16 bits
typedef long long i64;

constexpr float kLog2e = 1.4426950408889634f;

#if defined(MOLMO_EMULATE)
MOLMO_DEVICE float neg_inf() { return -__builtin_huge_valf(); }
#else
MOLMO_DEVICE float neg_inf() { return __int_as_float(0xff800000); }
#endif
MOLMO_DEVICE int imin(int a, int b) { return a < b ? a : b; }
MOLMO_DEVICE int imax(int a, int b) { return a > b ? a : b; }

#if !defined(MOLMO_EMULATE)

MOLMO_DEVICE float h2f(h16 h) {
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
}
MOLMO_DEVICE h16 f2h(float f) {
  h16 h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
}
MOLMO_DEVICE unsigned smem_u32(const void* p) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
  return a;
}

// D += A(16x16, row) * B(16x8, col), fp16 inputs, fp32 accumulators.
MOLMO_DEVICE void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Four 8x8 b16 matrices; lane l gives the row address for matrix l/8, row l%8. The "memory"
// clobber keeps plain shared-memory stores (output staging, RoPE'd Q) ordered before the load.
MOLMO_DEVICE void ldsm_x4(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}
MOLMO_DEVICE void ldsm_x4_trans(unsigned (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p))
               : "memory");
}

// 16-byte global->shared copy that bypasses L1; when !pred the destination is zero-filled
// (rows past the sequence end must be zeros, not stale bits: 0 * NaN would poison P.V).
MOLMO_DEVICE void cp_async16(void* smem, const void* gmem, bool pred) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
               :: "r"(smem_u32(smem)), "l"(gmem), "r"(pred ? 16 : 0)
               : "memory");
}
MOLMO_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N>
MOLMO_DEVICE void cp_async_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

MOLMO_DEVICE float shfl_xor(float v, int m) { return __shfl_xor_sync(0xffffffffu, v, m); }
MOLMO_DEVICE float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}
MOLMO_DEVICE float ldcg_f32(const float* p) { return __ldcg(p); }

#endif  // !MOLMO_EMULATE

MOLMO_DEVICE unsigned pack_h2(float lo, float hi) {
  return (unsigned)f2h(lo) | ((unsigned)f2h(hi) << 16);
}
MOLMO_DEVICE float lo_f(unsigned v) { return h2f((h16)(v & 0xffffu)); }
MOLMO_DEVICE float hi_f(unsigned v) { return h2f((h16)(v >> 16)); }

// Shared-memory tiles hold rows of D halves as D/8 chunks of 16 bytes; chunk c of row r is
// stored at chunk c ^ (r & 7). An ldmatrix reads one chunk column of 8 consecutive rows, and
// the XOR spreads those 8 chunks over all 32 banks (conflict-free), as do the 16-byte cp.async
// writes. Returns the offset in halves.
template <int D>
MOLMO_DEVICE int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// One 64-row tile of a [rows, D] fp16 matrix (row stride `stride`) into swizzled shared memory
// by 128 threads.
template <int D>
MOLMO_DEVICE void load_tile_async(h16* s, const h16* g, i64 stride, int row0, int nrows_valid, int tid) {
  // 64 rows x D halves, 16-byte chunks spread over 128 threads; rows >= nrows_valid are zero.
  constexpr int CH = D / 8;
#pragma unroll
  for (int i = 0; i < 64 * CH / 128; ++i) {
    const int idx = tid + i * 128;
    const int r = idx / CH, c = idx % CH;
    const bool ok = row0 + r < nrows_valid;
    const h16* src = g + (ok ? (i64)(row0 + r) * stride + c * 8 : 0);
    cp_async16(s + swz<D>(r, c), src, ok);
  }
}

// Llama-style (non-interleaved halves) RoPE of one 8-wide chunk pair of a D-wide row:
// x[i] and x[i + D/2] for i = 8*c .. 8*c+7 rotate by angle pos * theta^(-2i/D), in fp32,
// like rope_tables/apply_rope in export/model.py (fp32 tables, result rounded to fp16).
template <int D>
MOLMO_DEVICE void rope_chunk_pair(uint4& lo, uint4& hi, int c, float pos, float theta) {
  unsigned* a = reinterpret_cast<unsigned*>(&lo);
  unsigned* b = reinterpret_cast<unsigned*>(&hi);
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    float x1[2] = {lo_f(a[j]), hi_f(a[j])};
    float x2[2] = {lo_f(b[j]), hi_f(b[j])};
    float r1[2], r2[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int i = 8 * c + 2 * j + e;
      const float inv_freq = 1.0f / powf(theta, (float)(2 * i) / (float)D);
      float s, co;
      sincosf(pos * inv_freq, &s, &co);
      r1[e] = x1[e] * co - x2[e] * s;
      r2[e] = x2[e] * co + x1[e] * s;
    }
    a[j] = pack_h2(r1[0], r1[1]);
    b[j] = pack_h2(r2[0], r2[1]);
  }
}

}  // namespace molmo
