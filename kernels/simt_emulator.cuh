// A small deterministic CPU emulator of the CUDA features the molmo-edge kernels use, so the
// *same kernel source* runs and is tested on machines without a GPU (g++ -DMOLMO_EMULATE).
//
// Every CUDA thread of a block is a ucontext fiber; one OS thread runs them round-robin.
// __syncthreads is a block barrier, and every warp-collective (shuffle, ldmatrix, mma.sync) is a
// warp barrier where all 32 lanes deposit their operands and the last lane computes everybody's
// result, following the PTX ISA fragment layouts (written from the spec, independently of how
// the kernels use them). cp.async copies are deferred until the matching wait_group, shared
// memory starts filled with 0xFF bytes (fp16 NaN) so a read of an unwritten element poisons the
// output, and a barrier that not all threads reach is reported as a deadlock. Blocks run one
// after another, so atomics and fences are trivially ordered.
#pragma once
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#define MOLMO_DEVICE static inline
#define MOLMO_GLOBAL extern "C"
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define MOLMO_DYNAMIC_SMEM(name) unsigned char* name = ::emu::dynamic_smem()

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }

typedef int cudaError_t;
typedef void* cudaStream_t;
enum {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorLaunchFailure = 719,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize = 8 };
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount = 16 };

namespace emu {

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  dim3 tid;
  int linear = 0;
  bool done = false;
  // deferred cp.async: groups of (dst, src, bytes) copies
  struct Copy {
    void* dst;
    const void* src;
    int n;
  };
  std::vector<Copy> open_group;
  std::vector<std::vector<Copy>> groups;
};

struct WarpSync {
  int count = 0;
  long gen = 0;
  alignas(16) unsigned char in[2][32][64];
  alignas(16) unsigned char out[2][32][64];
};

struct Block {
  dim3 bid, bdim, gdim;
  std::vector<Fiber>* fibers = nullptr;
  std::vector<unsigned char> smem;
  std::vector<WarpSync> warps;
  ucontext_t sched;
  int nthreads = 0, cur = 0;
  int bar_count = 0;
  long bar_gen = 0;
  long progress = 0;
  std::function<void()> body;
  std::string error;
};

inline Block*& block() {
  static Block* b = nullptr;
  return b;
}
inline Fiber& self() { return (*block()->fibers)[block()->cur]; }
inline unsigned char* dynamic_smem() { return block()->smem.data(); }
inline std::string& last_error() {
  static std::string e;
  return e;
}

inline void yield() {
  Block* b = block();
  swapcontext(&self().ctx, &b->sched);
}

inline void fail(const std::string& msg) {
  Block* b = block();
  if (b->error.empty()) b->error = msg;
  for (;;) yield();  // never resumed: the scheduler stops on error
}

inline void syncthreads() {
  Block* b = block();
  const long gen = b->bar_gen;
  b->progress++;
  if (++b->bar_count == b->nthreads) {
    b->bar_count = 0;
    b->bar_gen++;
  } else {
    while (b->bar_gen == gen) yield();
  }
}

// All 32 lanes deposit `nin` bytes; the last one to arrive runs `compute(in, out)` for the warp.
template <class F>
inline void warp_op(const void* in, int nin, void* out, int nout, F compute) {
  Block* b = block();
  Fiber& f = self();
  WarpSync& w = b->warps[f.linear / 32];
  const int lane = f.linear % 32;
  const long gen = w.gen;
  const int slot = (int)(gen & 1);
  if (nin) std::memcpy(w.in[slot][lane], in, nin);
  b->progress++;
  if (++w.count == 32) {
    compute(w.in[slot], w.out[slot]);
    w.count = 0;
    w.gen++;
  } else {
    while (w.gen == gen) yield();
  }
  if (nout) std::memcpy(out, w.out[slot][lane], nout);
}

inline void trampoline() {
  Block* b = block();
  b->body();
  self().done = true;
  b->progress++;
}

// Runs kernel(args...) over the whole grid; returns false (and sets last_error) on a fault.
template <class K, class... A>
inline bool launch(K kernel, dim3 grid, dim3 blk, size_t smem_bytes, A... args) {
  const int nthreads = (int)(blk.x * blk.y * blk.z);
  if (nthreads % 32) {
    last_error() = "block size must be a multiple of 32";
    return false;
  }
  std::vector<Fiber> fibers(nthreads);
  for (auto& f : fibers) f.stack.resize(256 * 1024);
  Block b;
  b.gdim = grid;
  b.bdim = blk;
  b.nthreads = nthreads;
  b.fibers = &fibers;
  b.body = [&]() { kernel(args...); };
  block() = &b;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        b.bid = dim3(bx, by, bz);
        b.smem.assign(smem_bytes + 16, 0xFF);
        b.warps.assign(nthreads / 32, WarpSync());
        b.bar_count = 0;
        for (int i = 0; i < nthreads; ++i) {
          Fiber& f = fibers[i];
          f.linear = i;
          f.tid = dim3(i % blk.x, (i / blk.x) % blk.y, i / (blk.x * blk.y));
          f.done = false;
          f.open_group.clear();
          f.groups.clear();
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = f.stack.data();
          f.ctx.uc_stack.ss_size = f.stack.size();
          f.ctx.uc_link = &b.sched;
          makecontext(&f.ctx, trampoline, 0);
        }
        int remaining = nthreads;
        while (remaining > 0) {
          const long before = b.progress;
          for (int i = 0; i < nthreads; ++i) {
            if (fibers[i].done) continue;
            b.cur = i;
            swapcontext(&b.sched, &fibers[i].ctx);
            if (!b.error.empty()) break;
            if (fibers[i].done) --remaining;
          }
          if (!b.error.empty()) break;
          if (remaining > 0 && b.progress == before) b.error = "deadlock: a barrier is not reached by every thread";
          if (!b.error.empty()) break;
        }
        if (!b.error.empty()) {
          char where[96];
          std::snprintf(where, sizeof where, " (block %u,%u,%u)", bx, by, bz);
          last_error() = b.error + where;
          block() = nullptr;
          return false;
        }
      }
  block() = nullptr;
  return true;
}

}  // namespace emu

// ---- CUDA built-ins -----------------------------------------------------------------------
#define threadIdx (::emu::self().tid)
#define blockIdx (::emu::block()->bid)
#define blockDim (::emu::block()->bdim)
#define gridDim (::emu::block()->gdim)

static inline void __syncthreads() { emu::syncthreads(); }
static inline void __syncwarp() { emu::warp_op(nullptr, 0, nullptr, 0, [](unsigned char (*)[64], unsigned char (*)[64]) {}); }
static inline void __threadfence() {}
static inline void __threadfence_block() {}
static inline int atomicAdd(int* p, int v) {
  const int old = *p;
  *p = old + v;
  return old;
}

namespace molmo {

static inline float h2f(unsigned short h) {
  _Float16 x;
  std::memcpy(&x, &h, 2);
  return (float)x;
}
static inline unsigned short f2h(float f) {
  _Float16 x = (_Float16)f;  // round to nearest even, like cvt.rn.f16.f32
  unsigned short h;
  std::memcpy(&h, &x, 2);
  return h;
}

static inline float shfl_xor(float v, int m) {
  float r;
  emu::warp_op(&v, 4, &r, 4, [m](unsigned char (*in)[64], unsigned char (*out)[64]) {
    for (int l = 0; l < 32; ++l) std::memcpy(out[l], in[l ^ m], 4);
  });
  return r;
}
static inline float fast_exp2(float x) { return std::exp2(x); }
static inline float ldcg_f32(const float* p) { return *p; }

// ldmatrix .m8n8.x4 .b16: lane l addresses row l%8 of matrix l/8. Without .trans lane t gets
// elements (row t/4, cols 2(t%4), 2(t%4)+1) of each matrix; with .trans (rows 2(t%4), 2(t%4)+1;
// col t/4). Element pairs pack low half first.
static inline void ldsm_impl(unsigned (&r)[4], const void* p, bool trans) {
  const unsigned char* sm = emu::dynamic_smem();
  const unsigned char* a = static_cast<const unsigned char*>(p);
  if (a < sm || a + 16 > sm + emu::block()->smem.size() || ((a - sm) & 15))
    emu::fail("ldmatrix address outside shared memory or not 16-byte aligned");
  emu::warp_op(&p, 8, r, 16, [trans](unsigned char (*in)[64], unsigned char (*out)[64]) {
    const unsigned short* rows[32];
    for (int l = 0; l < 32; ++l) std::memcpy(&rows[l], in[l], 8);
    for (int t = 0; t < 32; ++t) {
      unsigned res[4];
      for (int i = 0; i < 4; ++i) {
        const unsigned short* const* m = rows + 8 * i;
        unsigned short e0, e1;
        if (!trans) {
          e0 = m[t / 4][2 * (t % 4)];
          e1 = m[t / 4][2 * (t % 4) + 1];
        } else {
          e0 = m[2 * (t % 4)][t / 4];
          e1 = m[2 * (t % 4) + 1][t / 4];
        }
        res[i] = (unsigned)e0 | ((unsigned)e1 << 16);
      }
      std::memcpy(out[t], res, 16);
    }
  });
}
static inline void ldsm_x4(unsigned (&r)[4], const void* p) { ldsm_impl(r, p, false); }
static inline void ldsm_x4_trans(unsigned (&r)[4], const void* p) { ldsm_impl(r, p, true); }

// mma.m16n8k16.row.col f32.f16.f16.f32, PTX ISA fragment layout; g = lane/4, c = lane%4:
// A: a0,a1 (g, 2c..2c+1), a2,a3 (g+8, 2c..), a4,a5 (g, 2c+8..), a6,a7 (g+8, 2c+8..)
// B: b0,b1 (k=2c..2c+1, n=g), b2,b3 (k=2c+8.., n=g);  C/D: c0,c1 (g, 2c..), c2,c3 (g+8, 2c..)
static inline void mma16816(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  struct In {
    unsigned a[4], b[2];
    float c[4];
  } in{{a[0], a[1], a[2], a[3]}, {b0, b1}, {d[0], d[1], d[2], d[3]}};
  emu::warp_op(&in, sizeof(In), d, 16, [](unsigned char (*ins)[64], unsigned char (*outs)[64]) {
    float A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      In x;
      std::memcpy(&x, ins[l], sizeof(In));
      const int g = l / 4, c = l % 4;
      auto lo = [](unsigned v) { return h2f((unsigned short)(v & 0xffff)); };
      auto hi = [](unsigned v) { return h2f((unsigned short)(v >> 16)); };
      A[g][2 * c] = lo(x.a[0]);
      A[g][2 * c + 1] = hi(x.a[0]);
      A[g + 8][2 * c] = lo(x.a[1]);
      A[g + 8][2 * c + 1] = hi(x.a[1]);
      A[g][2 * c + 8] = lo(x.a[2]);
      A[g][2 * c + 9] = hi(x.a[2]);
      A[g + 8][2 * c + 8] = lo(x.a[3]);
      A[g + 8][2 * c + 9] = hi(x.a[3]);
      B[2 * c][g] = lo(x.b[0]);
      B[2 * c + 1][g] = hi(x.b[0]);
      B[2 * c + 8][g] = lo(x.b[1]);
      B[2 * c + 9][g] = hi(x.b[1]);
      C[g][2 * c] = x.c[0];
      C[g][2 * c + 1] = x.c[1];
      C[g + 8][2 * c] = x.c[2];
      C[g + 8][2 * c + 1] = x.c[3];
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l / 4, c = l % 4;
      const int rr[4] = {g, g, g + 8, g + 8}, cc[4] = {2 * c, 2 * c + 1, 2 * c, 2 * c + 1};
      float res[4];
      for (int e = 0; e < 4; ++e) {
        float s = C[rr[e]][cc[e]];
        for (int kk = 0; kk < 16; ++kk) s += A[rr[e]][kk] * B[kk][cc[e]];
        res[e] = s;
      }
      std::memcpy(outs[l], res, 16);
    }
  });
}

static inline void cp_async16(void* smem, const void* gmem, bool pred) {
  unsigned char* sm = emu::dynamic_smem();
  unsigned char* d = static_cast<unsigned char*>(smem);
  if (d < sm || d + 16 > sm + emu::block()->smem.size() || ((d - sm) & 15))
    emu::fail("cp.async destination outside shared memory or not 16-byte aligned");
  if (pred && (reinterpret_cast<uintptr_t>(gmem) & 15)) emu::fail("cp.async source not 16-byte aligned");
  emu::self().open_group.push_back({smem, pred ? gmem : nullptr, 16});
}
static inline void cp_async_commit() {
  auto& f = emu::self();
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}
template <int N>
static inline void cp_async_wait() {
  auto& f = emu::self();
  while ((int)f.groups.size() > N) {
    for (auto& c : f.groups.front()) {
      if (c.src)
        std::memcpy(c.dst, c.src, c.n);
      else
        std::memset(c.dst, 0, c.n);
    }
    f.groups.erase(f.groups.begin());
  }
}

}  // namespace molmo

// ---- host runtime stand-ins used by molmo_kernels.cu -------------------------------------
#define MOLMO_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (::emu::launch(kernel, grid, block, smem, __VA_ARGS__) ? cudaSuccess : cudaErrorLaunchFailure)
template <class F>
static inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
static inline cudaError_t cudaGetDevice(int* d) {
  *d = 0;
  return cudaSuccess;
}
static inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr, int) {
  *v = 8;
  return cudaSuccess;
}
