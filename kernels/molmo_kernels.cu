// Host entry points of molmo_kernels.h: argument checks, launch geometry, one launch each
// (prefill: two). Built by nvcc into the C library (launch.py `build_library`), and by g++
// with -DMOLMO_EMULATE into the CPU emulation library the tests run. The Python launchers in
// launch.py mirror this geometry for the NVRTC path; tests compare the two.
#include "molmo_kernels.h"

#include "molmo_device.cu"

#if !defined(MOLMO_EMULATE)
#define MOLMO_LAUNCH(kernel, grid, block, smem, stream, ...) \
  (kernel<<<grid, block, smem, stream>>>(__VA_ARGS__), cudaGetLastError())
#endif

namespace {

typedef molmo::h16 h16;

bool aligned(const void* p) { return p && (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
bool strides_ok(const molmo_strides& s) { return s.batch % 8 == 0 && s.head % 8 == 0 && s.token % 8 == 0; }
const h16* H(const molmo_half* p) { return reinterpret_cast<const h16*>(p); }
h16* H(molmo_half* p) { return reinterpret_cast<h16*>(p); }
float default_scale(float scale, int head_dim) { return scale > 0.f ? scale : 1.0f / sqrtf((float)head_dim); }
size_t align256(size_t n) { return (n + 255) & ~size_t(255); }

constexpr float kLog2e = 1.4426950408889634f;

}  // namespace

extern "C" cudaError_t molmo_vit_attention(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                           molmo_half* out, molmo_strides q_s, molmo_strides k_s,
                                           molmo_strides v_s, molmo_strides o_s, int n_crops, int heads,
                                           int seq, float scale, cudaStream_t stream) {
  if (!aligned(q) || !aligned(k) || !aligned(v) || !aligned(out) || !strides_ok(q_s) || !strides_ok(k_s) ||
      !strides_ok(v_s) || !strides_ok(o_s) || n_crops <= 0 || heads <= 0 || seq <= 0 || n_crops > 65535 ||
      heads > 65535)
    return cudaErrorInvalidValue;
  const dim3 grid((seq + 127) / 128, heads, n_crops);
  const float sl2 = default_scale(scale, 64) * kLog2e;
  return MOLMO_LAUNCH(molmo_vit_attention_kernel, grid, dim3(128), (128 + 2 * 64) * 64 * 2, stream, H(q), H(k),
                      H(v), H(out), q_s.batch, q_s.head, q_s.token, k_s.batch, k_s.head, k_s.token, v_s.batch,
                      v_s.head, v_s.token, o_s.batch, o_s.head, o_s.token, heads, seq, sl2);
}

extern "C" cudaError_t molmo_attention_pool(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                            molmo_half* out, molmo_strides q_s, molmo_strides k_s,
                                            molmo_strides v_s, molmo_strides o_s, int n_crops, int heads,
                                            int grid_h, int grid_w, int q_per_window, float scale,
                                            cudaStream_t stream) {
  if (!aligned(q) || !aligned(k) || !aligned(v) || !aligned(out) || !strides_ok(q_s) || !strides_ok(k_s) ||
      !strides_ok(v_s) || !strides_ok(o_s) || n_crops <= 0 || heads <= 0 || grid_h <= 0 || grid_w <= 0 ||
      grid_h % 2 || grid_w % 2)
    return cudaErrorInvalidValue;
  const long long items = (long long)n_crops * (grid_h / 2) * (grid_w / 2) * heads;
  const dim3 grid((unsigned)((items + 15) / 16));
  return MOLMO_LAUNCH(molmo_attention_pool_kernel, grid, dim3(128), 0, stream, H(q), H(k), H(v), H(out), q_s.batch,
                      q_s.head, q_s.token, k_s.batch, k_s.head, k_s.token, v_s.batch, v_s.head, v_s.token,
                      o_s.batch, o_s.head, o_s.token, n_crops, heads, grid_h, grid_w, q_per_window,
                      default_scale(scale, 64));
}

extern "C" cudaError_t molmo_kv_cache_append(const molmo_half* k, const molmo_half* v, molmo_half* k_cache,
                                             molmo_half* v_cache, molmo_strides k_s, molmo_strides v_s,
                                             const int32_t* cache_lens, const int32_t* positions, int batch,
                                             int kv_heads, int seq, int max_len, float rope_theta,
                                             cudaStream_t stream) {
  if (!aligned(k) || !aligned(v) || !aligned(k_cache) || !aligned(v_cache) || !cache_lens || !strides_ok(k_s) ||
      !strides_ok(v_s) || batch <= 0 || kv_heads <= 0 || seq <= 0 || max_len <= 0 || rope_theta <= 0.f)
    return cudaErrorInvalidValue;
  const long long items = (long long)batch * seq * kv_heads * 8;
  return MOLMO_LAUNCH(molmo_kv_append_kernel, dim3((unsigned)((items + 255) / 256)), dim3(256), 0, stream, H(k),
                      H(v), H(k_cache), H(v_cache), k_s.batch, k_s.head, k_s.token, v_s.batch, v_s.head, v_s.token,
                      cache_lens, positions, batch, kv_heads, seq, max_len, rope_theta);
}

extern "C" cudaError_t molmo_decoder_prefill(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                             molmo_half* k_cache, molmo_half* v_cache, molmo_half* out,
                                             molmo_strides q_s, molmo_strides k_s, molmo_strides v_s,
                                             molmo_strides o_s, const int32_t* cache_lens,
                                             const int32_t* positions, int batch, int heads, int kv_heads,
                                             int seq, int max_len, float rope_theta, float scale,
                                             cudaStream_t stream) {
  if (!aligned(q) || !aligned(out) || !strides_ok(q_s) || !strides_ok(o_s) || heads <= 0 || kv_heads <= 0 ||
      heads % kv_heads || heads > 65535 || batch > 65535)
    return cudaErrorInvalidValue;
  cudaError_t err = molmo_kv_cache_append(k, v, k_cache, v_cache, k_s, v_s, cache_lens, positions, batch,
                                          kv_heads, seq, max_len, rope_theta, stream);
  if (err != cudaSuccess) return err;
  const dim3 grid((seq + 63) / 64, heads, batch);
  const float sl2 = default_scale(scale, 128) * kLog2e;
  return MOLMO_LAUNCH(molmo_prefill_attention_kernel, grid, dim3(128), (64 + 2 * 64) * 128 * 2, stream, H(q),
                      H(k_cache), H(v_cache), H(out), q_s.batch, q_s.head, q_s.token, o_s.batch, o_s.head,
                      o_s.token, cache_lens, positions, heads, kv_heads, seq, max_len, rope_theta, sl2);
}

extern "C" int molmo_decode_default_splits(int batch, int heads, int kv_heads, int max_len, int num_sms) {
  if (batch <= 0 || heads <= 0 || kv_heads <= 0 || max_len <= 0) return 1;
  const int qgroups = (heads / kv_heads + 15) / 16;
  const long long base = (long long)batch * kv_heads * qgroups;
  const int tiles = (max_len + 63) / 64;
  const long long target = 2LL * (num_sms > 0 ? num_sms : 1);
  long long s = (target + base - 1) / base;
  if (s > tiles) s = tiles;
  return s < 1 ? 1 : (int)s;
}

extern "C" size_t molmo_decode_workspace_bytes(int batch, int heads, int kv_heads, int num_splits) {
  if (num_splits <= 1 || batch <= 0 || heads <= 0 || kv_heads <= 0) return 0;
  const size_t parts = (size_t)batch * heads * num_splits;
  const size_t qgroups = (size_t)(heads / kv_heads + 15) / 16;
  return align256(parts * 128 * sizeof(float)) + align256(parts * sizeof(float)) +
         align256((size_t)batch * kv_heads * qgroups * sizeof(int));
}

extern "C" cudaError_t molmo_decoder_decode(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                            molmo_half* k_cache, molmo_half* v_cache, molmo_half* out,
                                            molmo_strides q_s, molmo_strides k_s, molmo_strides v_s,
                                            molmo_strides o_s, const int32_t* cache_lens,
                                            const int32_t* positions, int batch, int heads, int kv_heads,
                                            int max_len, float rope_theta, float scale, int num_splits,
                                            void* workspace, cudaStream_t stream) {
  if (!aligned(q) || !aligned(k) || !aligned(v) || !aligned(k_cache) || !aligned(v_cache) || !aligned(out) ||
      !cache_lens || !strides_ok(q_s) || !strides_ok(k_s) || !strides_ok(v_s) || !strides_ok(o_s) || batch <= 0 ||
      heads <= 0 || kv_heads <= 0 || heads % kv_heads || max_len <= 0 || rope_theta <= 0.f || batch > 65535)
    return cudaErrorInvalidValue;
  if (num_splits <= 0) {
    int d = 0, sms = 1;
    cudaGetDevice(&d);
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d);
    num_splits = molmo_decode_default_splits(batch, heads, kv_heads, max_len, sms);
  }
  const int qgroups = (heads / kv_heads + 15) / 16;
  float* ws_o = nullptr;
  float* ws_lse = nullptr;
  int* ws_count = nullptr;
  if (num_splits > 1) {
    if (!aligned(workspace)) return cudaErrorInvalidValue;
    const size_t parts = (size_t)batch * heads * num_splits;
    char* w = static_cast<char*>(workspace);
    ws_o = reinterpret_cast<float*>(w);
    ws_lse = reinterpret_cast<float*>(w + align256(parts * 128 * sizeof(float)));
    ws_count = reinterpret_cast<int*>(w + align256(parts * 128 * sizeof(float)) + align256(parts * sizeof(float)));
  }
  // Above 48 KiB of dynamic shared memory needs the per-function opt-in, once per device (not on
  // every call: decode is captured into CUDA graphs).
  static bool smem_configured[64] = {};
  int dev = 0;
  cudaGetDevice(&dev);
  if (dev < 0 || dev >= 64 || !smem_configured[dev]) {
    cudaError_t err = cudaFuncSetAttribute(molmo_decode_attention_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           molmo::kDecodeSmemBytes);
    if (err != cudaSuccess) return err;
    if (dev >= 0 && dev < 64) smem_configured[dev] = true;
  }
  const dim3 grid(num_splits, kv_heads * qgroups, batch);
  const float sl2 = default_scale(scale, 128) * kLog2e;
  return MOLMO_LAUNCH(molmo_decode_attention_kernel, grid, dim3(128), molmo::kDecodeSmemBytes, stream, H(q), H(k),
                      H(v), H(k_cache), H(v_cache), H(out), q_s.batch, q_s.head, k_s.batch, k_s.head, v_s.batch,
                      v_s.head, o_s.batch, o_s.head, cache_lens, positions, heads, kv_heads, max_len, num_splits,
                      rope_theta, sl2, ws_o, ws_lse, ws_count);
}
