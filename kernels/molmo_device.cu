// Device-only translation unit: every molmo-edge kernel, `extern "C"` so the names are stable
// for NVRTC / cuModuleGetFunction. Compiled by launch.py (NVRTC or nvcc -cubin) and included by
// molmo_kernels.cu, which adds the host entry points of molmo_kernels.h.
#include "flash_attention.cuh"
#include "pool_attention.cuh"
#include "decode_attention.cuh"
