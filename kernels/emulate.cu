// CPU emulation library (tests): the host entry points of molmo_kernels.h plus a generic launcher
// taking cuLaunchKernel-style parameters, so launch.py's NVRTC-path argument packing and grid
// geometry run unchanged against the emulated kernels. Build: g++ -std=c++20 -DMOLMO_EMULATE
// -x c++ -shared -fPIC emulate.cu.
#if !defined(MOLMO_EMULATE)
#error "emulate.cu is the CPU emulation build; compile it with -DMOLMO_EMULATE"
#endif
#include "molmo_kernels.cu"

#include <cstring>
#include <utility>

namespace {
template <class... A, size_t... I>
bool launch_unpacked(void (*k)(A...), dim3 g, dim3 b, size_t smem, void** params, std::index_sequence<I...>) {
  return emu::launch(k, g, b, smem, *static_cast<A*>(params[I])...);
}
template <class... A>
bool launch_params(void (*k)(A...), dim3 g, dim3 b, size_t smem, void** params) {
  return launch_unpacked(k, g, b, smem, params, std::index_sequence_for<A...>{});
}
}  // namespace

extern "C" const char* molmo_emulator_last_error() { return emu::last_error().c_str(); }

// Returns 0 on success, 1 for an unknown kernel, 2 when the emulated launch faulted
// (molmo_emulator_last_error() says why).
extern "C" int molmo_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                                unsigned bz, size_t smem, void** params) {
  const dim3 g(gx, gy, gz), b(bx, by, bz);
  bool ok;
  if (!std::strcmp(name, "molmo_vit_attention_kernel"))
    ok = launch_params(molmo_vit_attention_kernel, g, b, smem, params);
  else if (!std::strcmp(name, "molmo_attention_pool_kernel"))
    ok = launch_params(molmo_attention_pool_kernel, g, b, smem, params);
  else if (!std::strcmp(name, "molmo_kv_append_kernel"))
    ok = launch_params(molmo_kv_append_kernel, g, b, smem, params);
  else if (!std::strcmp(name, "molmo_prefill_attention_kernel"))
    ok = launch_params(molmo_prefill_attention_kernel, g, b, smem, params);
  else if (!std::strcmp(name, "molmo_decode_attention_kernel"))
    ok = launch_params(molmo_decode_attention_kernel, g, b, smem, params);
  else
    return 1;
  return ok ? 0 : 2;
}
