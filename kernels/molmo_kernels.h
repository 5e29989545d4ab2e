/* molmo-edge fused attention kernels: plain C entry points.
 *
 * One entry point per kernel, shared by the Python launchers (through the C library built by
 * nvcc) and the TensorRT IPluginV3 plugins. All tensors are fp16 device pointers; accumulation
 * is fp32. Shapes are passed as ints, element strides as molmo_strides (the head dimension is
 * always contiguous). Every pointer must be 16-byte aligned and every stride a multiple of 8
 * elements (one 16-byte vector); violations return cudaErrorInvalidValue without launching.
 * A negative or zero `scale` means the default 1/sqrt(head_dim).
 * Calls are asynchronous on `stream`; launch errors are returned (cudaGetLastError).
 */
#ifndef MOLMO_KERNELS_H
#define MOLMO_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#if defined(MOLMO_EMULATE)
/* CPU emulation build (tests only): the emulator provides cudaError_t and cudaStream_t. */
#include "simt_emulator.cuh"
typedef unsigned short molmo_half;
#else
#include <cuda_runtime.h>
#if defined(__cplusplus)
#include <cuda_fp16.h>
typedef __half molmo_half;
#else
typedef unsigned short molmo_half; /* IEEE binary16 bits */
#endif
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Element strides of a [batch, head, token, head_dim] view of any layout. */
typedef struct molmo_strides {
  int64_t batch;
  int64_t head;
  int64_t token;
} molmo_strides;

/* ViT self-attention, non-causal, head_dim 64 (CLIP ViT-L/14: seq 577, 16 heads).
 * q, k, v, out: [n_crops, heads, seq, 64] views (e.g. [n_crops, seq, heads*64] from the fused
 * projection: strides {seq*1024, 64, 1024}). out = softmax(q k^T * scale) v. */
cudaError_t molmo_vit_attention(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                molmo_half* out, molmo_strides q_s, molmo_strides k_s,
                                molmo_strides v_s, molmo_strides o_s, int n_crops, int heads,
                                int seq, float scale, cudaStream_t stream);

/* 2x2 attention pooling with the window mean as query, head_dim 64.
 * k, v: per patch, tokens in raster order of a grid_h x grid_w grid (both even).
 * q: per patch as well (the kernel averages the 4 projected queries of each window), or, when
 * q_per_window != 0, one already-averaged query per window.
 * out: one token per window, windows in raster order of the (grid_h/2) x (grid_w/2) grid. */
cudaError_t molmo_attention_pool(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                 molmo_half* out, molmo_strides q_s, molmo_strides k_s,
                                 molmo_strides v_s, molmo_strides o_s, int n_crops, int heads,
                                 int grid_h, int grid_w, int q_per_window, float scale,
                                 cudaStream_t stream);

/* Decoder KV cache: k_cache and v_cache are [batch, kv_heads, max_len, 128] each, contiguous.
 * cache_lens [batch] (device int32): tokens already cached per batch row; this call writes its
 * new tokens at cache_lens[b] + t and does not change cache_lens (the caller advances it).
 * positions (device int32, may be NULL): RoPE positions, [batch, seq] for prefill and [batch]
 * for decode; NULL means position = cache index. K is stored after RoPE (llama-style halves,
 * inv_freq = rope_theta^(-2i/128), fp32 angles), V as given. Rows past max_len are dropped. */

/* RoPE k and append k, v ([batch, kv_heads, seq, 128] views) to the cache. */
cudaError_t molmo_kv_cache_append(const molmo_half* k, const molmo_half* v, molmo_half* k_cache,
                                  molmo_half* v_cache, molmo_strides k_s, molmo_strides v_s,
                                  const int32_t* cache_lens, const int32_t* positions, int batch,
                                  int kv_heads, int seq, int max_len, float rope_theta,
                                  cudaStream_t stream);

/* Causal prefill: appends k, v to the cache (as molmo_kv_cache_append), then
 * out[b, h, t] = softmax over keys j <= cache_lens[b] + t of (rope(q) . K[j]) * scale, V.
 * q/out: [batch, heads, seq, 128] views; k/v: [batch, kv_heads, seq, 128] views.
 * heads % kv_heads == 0 (MHA and GQA; query head h reads KV head h / (heads / kv_heads)). */
cudaError_t molmo_decoder_prefill(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                  molmo_half* k_cache, molmo_half* v_cache, molmo_half* out,
                                  molmo_strides q_s, molmo_strides k_s, molmo_strides v_s,
                                  molmo_strides o_s, const int32_t* cache_lens,
                                  const int32_t* positions, int batch, int heads, int kv_heads,
                                  int seq, int max_len, float rope_theta, float scale,
                                  cudaStream_t stream);

/* Single-token decode: writes rope(k) and v ([batch, kv_heads, 128] views; the token stride is
 * ignored) into the cache at cache_lens[b], then attends q ([batch, heads, 128]) over cache
 * indices 0 .. cache_lens[b], split over the sequence into num_splits parts merged in the same
 * launch. num_splits <= 0 picks molmo_decode_default_splits(batch, heads, kv_heads, max_len,
 * <SM count>). With more than one split, `workspace` must hold
 * molmo_decode_workspace_bytes(batch, heads, kv_heads, num_splits) bytes, zeroed once after
 * allocation (the kernel leaves it ready for the next call; calls sharing a workspace must be
 * stream-ordered). */
cudaError_t molmo_decoder_decode(const molmo_half* q, const molmo_half* k, const molmo_half* v,
                                 molmo_half* k_cache, molmo_half* v_cache, molmo_half* out,
                                 molmo_strides q_s, molmo_strides k_s, molmo_strides v_s,
                                 molmo_strides o_s, const int32_t* cache_lens,
                                 const int32_t* positions, int batch, int heads, int kv_heads,
                                 int max_len, float rope_theta, float scale, int num_splits,
                                 void* workspace, cudaStream_t stream);

/* Split count for decode: enough CTAs for ~2 waves on num_sms SMs, at most one split per 64-key
 * tile of max_len (the longest context the splits must cover). */
int molmo_decode_default_splits(int batch, int heads, int kv_heads, int max_len, int num_sms);

/* Workspace bytes for decode with num_splits > 1 (0 when num_splits <= 1). */
size_t molmo_decode_workspace_bytes(int batch, int heads, int kv_heads, int num_splits);

#ifdef __cplusplus
}
#endif
#endif /* MOLMO_KERNELS_H */
