"""Launch the molmo-edge CUDA kernels from Python, without torch (kernels/build.py compiles them).

`Kernels` exposes one method per C entry point (same arguments: device pointers as ints, shapes,
(batch, head, token) element strides, a stream handle). `DirectKernels` launches the `__global__`
kernels itself through a launcher (cuda-python's driver API on a GPU, or the CPU emulator) with the
geometry of molmo_kernels.cu mirrored here; `CLibKernels` calls the C entry points of the library
(what the TensorRT plugins will call). `run_*` helpers take numpy arrays (for tests and checks).

Nothing here imports a CUDA binding at import time.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

from molmo_edge.kernels.build import _bindings, build_library, compile_cubin

KERNEL_NAMES = ("molmo_vit_attention_kernel", "molmo_attention_pool_kernel", "molmo_kv_append_kernel",
                "molmo_prefill_attention_kernel", "molmo_decode_attention_kernel")

# Parameter signatures of the __global__ kernels: P pointer, q int64, i int32, f float32.
SIGNATURES = {
    "molmo_vit_attention_kernel": "PPPP" + "q" * 12 + "iif",
    "molmo_attention_pool_kernel": "PPPP" + "q" * 12 + "iiiiif",
    "molmo_kv_append_kernel": "PPPP" + "q" * 6 + "PP" + "iiii" + "f",
    "molmo_prefill_attention_kernel": "PPPP" + "q" * 6 + "PP" + "iiii" + "ff",
    "molmo_decode_attention_kernel": "PPPPPP" + "q" * 8 + "PP" + "iiii" + "ff" + "PPP",
}
VIT_SMEM = (128 + 2 * 64) * 64 * 2
PREFILL_SMEM = (64 + 2 * 64) * 128 * 2
DECODE_SMEM = (16 * 128 + 2 * 2 * 64 * 128) * 2 + 16  # molmo::kDecodeSmemBytes
LOG2E = 1.4426950408889634

Strides = tuple[int, int, int]  # element strides (batch, head, token); head_dim is contiguous


# ---------------------------------------------------------------------------------------------
# the C library (nvcc build or CPU emulator) through ctypes
# ---------------------------------------------------------------------------------------------

class CStrides(ctypes.Structure):
    _fields_ = [("batch", ctypes.c_int64), ("head", ctypes.c_int64), ("token", ctypes.c_int64)]


_P, _S, _I, _F = ctypes.c_void_p, CStrides, ctypes.c_int, ctypes.c_float
_C_API = {
    "molmo_vit_attention": [_P] * 4 + [_S] * 4 + [_I] * 3 + [_F, _P],
    "molmo_attention_pool": [_P] * 4 + [_S] * 4 + [_I] * 5 + [_F, _P],
    "molmo_kv_cache_append": [_P] * 4 + [_S] * 2 + [_P] * 2 + [_I] * 4 + [_F, _P],
    "molmo_decoder_prefill": [_P] * 6 + [_S] * 4 + [_P] * 2 + [_I] * 5 + [_F, _F, _P],
    "molmo_decoder_decode": [_P] * 6 + [_S] * 4 + [_P] * 2 + [_I] * 4 + [_F, _F, _I, _P, _P],
}


class CLibrary:
    """ctypes binding of molmo_kernels.h (and, for the emulator build, its launch hook)."""

    def __init__(self, path: Path | str):
        self.path = Path(path)
        self.lib = ctypes.CDLL(str(path))
        for name, args in _C_API.items():
            fn = getattr(self.lib, name)
            fn.argtypes, fn.restype = args, ctypes.c_int
        self.lib.molmo_decode_default_splits.argtypes = [_I] * 5
        self.lib.molmo_decode_default_splits.restype = ctypes.c_int
        self.lib.molmo_decode_workspace_bytes.argtypes = [_I] * 4
        self.lib.molmo_decode_workspace_bytes.restype = ctypes.c_size_t
        self.emulated = hasattr(self.lib, "molmo_emu_launch")
        if self.emulated:
            self.lib.molmo_emu_launch.argtypes = [ctypes.c_char_p] + [ctypes.c_uint] * 6 + [ctypes.c_size_t, _P]
            self.lib.molmo_emu_launch.restype = ctypes.c_int
            self.lib.molmo_emulator_last_error.restype = ctypes.c_char_p

    def last_emulator_error(self) -> str:
        return self.lib.molmo_emulator_last_error().decode() if self.emulated else ""

    def call(self, name: str, *args: Any) -> None:
        conv = [CStrides(*a) if t is _S else a for t, a in zip(_C_API[name], args)]
        err = getattr(self.lib, name)(*conv)
        if err != 0:
            raise RuntimeError(f"{name} returned cudaError {err} {self.last_emulator_error()}".rstrip())


# ---------------------------------------------------------------------------------------------
# launchers of the __global__ kernels
# ---------------------------------------------------------------------------------------------

_CTYPE = {"P": ctypes.c_void_p, "q": ctypes.c_int64, "i": ctypes.c_int32, "f": ctypes.c_float}


def pack_params(sig: str, values: Sequence[Any]) -> tuple[Any, list[Any]]:
    """cuLaunchKernel-style kernelParams: an array of pointers to each value (kept alive by the
    returned list)."""
    if len(sig) != len(values):
        raise ValueError(f"kernel takes {len(sig)} arguments, got {len(values)}")
    objs = [_CTYPE[c](v if c != "P" else (int(v) if v else None)) for c, v in zip(sig, values)]
    arr = (ctypes.c_void_p * len(objs))(*[ctypes.addressof(o) for o in objs])
    return arr, objs


class Launcher(Protocol):
    name: str
    num_sms: int
    arch: int

    def launch(self, kernel: str, grid: tuple[int, int, int], block: int, smem: int, values: Sequence[Any],
               stream: int = 0) -> None: ...


class Memory(Protocol):
    def to_device(self, a: np.ndarray) -> int: ...
    def empty(self, nbytes: int) -> int: ...
    def zeros(self, nbytes: int) -> int: ...
    def to_host(self, ptr: int, shape: Sequence[int], dtype: Any) -> np.ndarray: ...
    def synchronize(self) -> None: ...
    def free_all(self) -> None: ...


class EmulatorLauncher:
    """Runs kernels on the CPU emulator: the kernelParams array is exactly what cuLaunchKernel
    would get; "device pointers" are host addresses (HostMemory)."""

    name = "emulator"
    num_sms = 8  # what the emulator's cudaDeviceGetAttribute reports
    arch = 0

    def __init__(self, lib: CLibrary | None = None):
        self.lib = lib or CLibrary(build_library(emulate=True))
        if not self.lib.emulated:
            raise ValueError("not an emulator library")
        self.memory = HostMemory()

    def launch(self, kernel, grid, block, smem, values, stream=0):
        arr, _keep = pack_params(SIGNATURES[kernel], values)
        rc = self.lib.lib.molmo_emu_launch(kernel.encode(), *grid, block, 1, 1, smem, ctypes.addressof(arr))
        if rc != 0:
            raise RuntimeError(f"{kernel}: emulated launch failed: {self.lib.last_emulator_error()}")


class HostMemory:
    """Host buffers standing in for device memory (emulator)."""

    def __init__(self) -> None:
        self._bufs: dict[int, np.ndarray] = {}

    def _keep(self, a: np.ndarray) -> int:
        ptr = a.ctypes.data
        self._bufs[ptr] = a
        return ptr

    def to_device(self, a: np.ndarray) -> int:
        return self._keep(np.require(np.array(a, copy=True), requirements=["C", "A"]))

    def empty(self, nbytes: int) -> int:
        return self._keep(np.full(max(nbytes, 16), 0xFF, np.uint8))  # NaN-filled like fresh memory

    def zeros(self, nbytes: int) -> int:
        return self._keep(np.zeros(max(nbytes, 16), np.uint8))

    def to_host(self, ptr, shape, dtype):
        n = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return np.frombuffer(ctypes.string_at(ptr, n), dtype=dtype).reshape(shape).copy()

    def synchronize(self) -> None:
        pass

    def free_all(self) -> None:
        self._bufs.clear()


class CudaPythonLauncher:
    """cuda-python driver API: cubin from compile_cubin (nvcc or NVRTC), cuModuleLoadData,
    cuLaunchKernel. Uses the device's primary context (shared with the CUDA runtime, torch, CuPy)."""

    name = "cuda-python"

    def __init__(self, device: int = 0, compiler: str = "auto"):
        drv, _ = _bindings()
        self.drv = drv
        self._check(drv.cuInit(0), "cuInit")
        self.device = self._check(drv.cuDeviceGet(device), "cuDeviceGet")
        ctx = self._check(drv.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        self._check(drv.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
        A = drv.CUdevice_attribute
        major = self._check(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device), "cc")
        minor = self._check(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR, self.device), "cc")
        self.num_sms = self._check(drv.cuDeviceGetAttribute(A.CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT, self.device), "sms")
        self.arch = 10 * major + minor
        self.compiled = compile_cubin(self.arch, compiler)
        self._image = np.frombuffer(self.compiled.cubin, np.uint8).copy()  # kept alive; passed by address
        self.module = self._check(drv.cuModuleLoadData(self._image.ctypes.data), "cuModuleLoadData")
        self.functions = {n: self._check(drv.cuModuleGetFunction(self.module, n.encode()), n) for n in KERNEL_NAMES}
        self._check(drv.cuFuncSetAttribute(self.functions["molmo_decode_attention_kernel"],
                                           drv.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                           DECODE_SMEM), "cuFuncSetAttribute")
        self.memory = CudaPythonMemory(drv)

    @staticmethod
    def _check(result: Any, what: str) -> Any:
        err, *rest = result if isinstance(result, tuple) else (result,)
        if int(err) != 0:
            raise RuntimeError(f"{what} failed: {err}")
        return rest[0] if len(rest) == 1 else (rest or None)

    def launch(self, kernel, grid, block, smem, values, stream=0):
        arr, _keep = pack_params(SIGNATURES[kernel], values)
        self._check(self.drv.cuLaunchKernel(self.functions[kernel], *grid, block, 1, 1, smem,
                                            self.drv.CUstream(int(stream)), ctypes.addressof(arr), 0), kernel)


class CudaPythonMemory:
    def __init__(self, drv: Any):
        self.drv = drv
        self._ptrs: list[Any] = []

    def _alloc(self, nbytes: int) -> int:
        p = CudaPythonLauncher._check(self.drv.cuMemAlloc(max(nbytes, 16)), "cuMemAlloc")
        self._ptrs.append(p)
        return int(p)

    def to_device(self, a):
        a = np.ascontiguousarray(a)
        p = self._alloc(a.nbytes)
        CudaPythonLauncher._check(self.drv.cuMemcpyHtoD(p, a, a.nbytes), "cuMemcpyHtoD")
        return p

    def empty(self, nbytes):
        p = self._alloc(nbytes)
        CudaPythonLauncher._check(self.drv.cuMemsetD8(p, 0xFF, max(nbytes, 16)), "cuMemsetD8")
        return p

    def zeros(self, nbytes):
        p = self._alloc(nbytes)
        CudaPythonLauncher._check(self.drv.cuMemsetD8(p, 0, max(nbytes, 16)), "cuMemsetD8")
        return p

    def to_host(self, ptr, shape, dtype):
        out = np.empty(shape, dtype)
        self.synchronize()
        CudaPythonLauncher._check(self.drv.cuMemcpyDtoH(out, ptr, out.nbytes), "cuMemcpyDtoH")
        return out

    def synchronize(self):
        CudaPythonLauncher._check(self.drv.cuCtxSynchronize(), "cuCtxSynchronize")

    def free_all(self):
        for p in self._ptrs:
            self.drv.cuMemFree(p)
        self._ptrs.clear()


def default_launcher(device: int = 0) -> Launcher:
    """The GPU launch path: cuda-python's driver API (NVIDIA's own bindings, the same the TensorRT backend uses)."""
    return CudaPythonLauncher(device)


# ---------------------------------------------------------------------------------------------
# the entry points, two ways
# ---------------------------------------------------------------------------------------------

def _check_args(ptrs: Sequence[int], strides: Sequence[Strides]) -> None:
    for p in ptrs:
        if not p or int(p) % 16:
            raise ValueError("device pointers must be non-null and 16-byte aligned")
    for s in strides:
        if any(int(x) % 8 for x in s):
            raise ValueError(f"strides {tuple(s)} must be multiples of 8 elements")


def _scale(scale: float | None, d: int) -> float:
    return scale if scale is not None and scale > 0 else 1.0 / float(np.sqrt(d))


def decode_default_splits(batch: int, heads: int, kv_heads: int, max_len: int, num_sms: int) -> int:
    """Mirror of molmo_decode_default_splits."""
    if batch <= 0 or heads <= 0 or kv_heads <= 0 or max_len <= 0:
        return 1
    base = batch * kv_heads * ((heads // kv_heads + 15) // 16)
    s = -(-2 * max(num_sms, 1) // base)
    return max(1, min(s, (max_len + 63) // 64))


def decode_workspace_bytes(batch: int, heads: int, kv_heads: int, num_splits: int) -> int:
    """Mirror of molmo_decode_workspace_bytes."""
    if num_splits <= 1 or batch <= 0 or heads <= 0 or kv_heads <= 0:
        return 0
    a = lambda n: (n + 255) & ~255  # noqa: E731
    parts = batch * heads * num_splits
    return a(parts * 128 * 4) + a(parts * 4) + a(batch * kv_heads * ((heads // kv_heads + 15) // 16) * 4)


class DirectKernels:
    """The C entry points re-expressed in Python over a kernel launcher (same geometry as
    molmo_kernels.cu)."""

    def __init__(self, launcher: Launcher):
        self.launcher = launcher
        self.memory = launcher.memory  # type: ignore[attr-defined]
        self.num_sms = launcher.num_sms

    def vit_attention(self, q, k, v, out, q_s, k_s, v_s, o_s, n_crops, heads, seq, scale=None, stream=0):
        _check_args((q, k, v, out), (q_s, k_s, v_s, o_s))
        self.launcher.launch("molmo_vit_attention_kernel", (-(-seq // 128), heads, n_crops), 128, VIT_SMEM,
                             [q, k, v, out, *q_s, *k_s, *v_s, *o_s, heads, seq, _scale(scale, 64) * LOG2E], stream)

    def attention_pool(self, q, k, v, out, q_s, k_s, v_s, o_s, n_crops, heads, grid_h, grid_w, q_per_window=False,
                       scale=None, stream=0):
        _check_args((q, k, v, out), (q_s, k_s, v_s, o_s))
        if grid_h % 2 or grid_w % 2:
            raise ValueError("the patch grid must be even for 2x2 pooling")
        items = n_crops * (grid_h // 2) * (grid_w // 2) * heads
        self.launcher.launch("molmo_attention_pool_kernel", (-(-items // 16), 1, 1), 128, 0,
                             [q, k, v, out, *q_s, *k_s, *v_s, *o_s, n_crops, heads, grid_h, grid_w,
                              int(bool(q_per_window)), _scale(scale, 64)], stream)

    def kv_cache_append(self, k, v, k_cache, v_cache, k_s, v_s, cache_lens, positions, batch, kv_heads, seq,
                        max_len, rope_theta, stream=0):
        _check_args((k, v, k_cache, v_cache), (k_s, v_s))
        items = batch * seq * kv_heads * 8
        self.launcher.launch("molmo_kv_append_kernel", (-(-items // 256), 1, 1), 256, 0,
                             [k, v, k_cache, v_cache, *k_s, *v_s, cache_lens, positions, batch, kv_heads, seq,
                              max_len, rope_theta], stream)

    def decoder_prefill(self, q, k, v, k_cache, v_cache, out, q_s, k_s, v_s, o_s, cache_lens, positions, batch,
                        heads, kv_heads, seq, max_len, rope_theta, scale=None, stream=0):
        _check_args((q, out), (q_s, o_s))
        if heads % kv_heads:
            raise ValueError("heads must be a multiple of kv_heads")
        self.kv_cache_append(k, v, k_cache, v_cache, k_s, v_s, cache_lens, positions, batch, kv_heads, seq,
                             max_len, rope_theta, stream)
        self.launcher.launch("molmo_prefill_attention_kernel", (-(-seq // 64), heads, batch), 128, PREFILL_SMEM,
                             [q, k_cache, v_cache, out, *q_s, *o_s, cache_lens, positions, heads, kv_heads, seq,
                              max_len, rope_theta, _scale(scale, 128) * LOG2E], stream)

    def decoder_decode(self, q, k, v, k_cache, v_cache, out, q_s, k_s, v_s, o_s, cache_lens, positions, batch,
                       heads, kv_heads, max_len, rope_theta, scale=None, num_splits=0, workspace=0, stream=0):
        _check_args((q, k, v, k_cache, v_cache, out), (q_s, k_s, v_s, o_s))
        if heads % kv_heads:
            raise ValueError("heads must be a multiple of kv_heads")
        if num_splits <= 0:
            num_splits = decode_default_splits(batch, heads, kv_heads, max_len, self.num_sms)
        qgroups = (heads // kv_heads + 15) // 16
        ws = [0, 0, 0]
        if num_splits > 1:
            if not workspace or workspace % 16:
                raise ValueError("decode with several splits needs a 16-byte aligned, zeroed workspace")
            parts = batch * heads * num_splits
            a = lambda n: (n + 255) & ~255  # noqa: E731
            ws = [workspace, workspace + a(parts * 512), workspace + a(parts * 512) + a(parts * 4)]
        self.launcher.launch("molmo_decode_attention_kernel", (num_splits, kv_heads * qgroups, batch), 128,
                             DECODE_SMEM, [q, k, v, k_cache, v_cache, out, q_s[0], q_s[1], k_s[0], k_s[1], v_s[0],
                                           v_s[1], o_s[0], o_s[1], cache_lens, positions, heads, kv_heads, max_len,
                                           num_splits, rope_theta, _scale(scale, 128) * LOG2E, *ws], stream)


class CLibKernels:
    """The same methods, calling the C entry points of a CLibrary (nvcc build or emulator)."""

    def __init__(self, lib: CLibrary, memory: Memory, num_sms: int = 0):
        self.lib, self.memory, self.num_sms = lib, memory, num_sms

    def vit_attention(self, q, k, v, out, q_s, k_s, v_s, o_s, n_crops, heads, seq, scale=None, stream=0):
        self.lib.call("molmo_vit_attention", q, k, v, out, q_s, k_s, v_s, o_s, n_crops, heads, seq,
                      scale or 0.0, stream or None)

    def attention_pool(self, q, k, v, out, q_s, k_s, v_s, o_s, n_crops, heads, grid_h, grid_w, q_per_window=False,
                       scale=None, stream=0):
        self.lib.call("molmo_attention_pool", q, k, v, out, q_s, k_s, v_s, o_s, n_crops, heads, grid_h, grid_w,
                      int(bool(q_per_window)), scale or 0.0, stream or None)

    def kv_cache_append(self, k, v, k_cache, v_cache, k_s, v_s, cache_lens, positions, batch, kv_heads, seq,
                        max_len, rope_theta, stream=0):
        self.lib.call("molmo_kv_cache_append", k, v, k_cache, v_cache, k_s, v_s, cache_lens, positions or None,
                      batch, kv_heads, seq, max_len, rope_theta, stream or None)

    def decoder_prefill(self, q, k, v, k_cache, v_cache, out, q_s, k_s, v_s, o_s, cache_lens, positions, batch,
                        heads, kv_heads, seq, max_len, rope_theta, scale=None, stream=0):
        self.lib.call("molmo_decoder_prefill", q, k, v, k_cache, v_cache, out, q_s, k_s, v_s, o_s, cache_lens,
                      positions or None, batch, heads, kv_heads, seq, max_len, rope_theta, scale or 0.0,
                      stream or None)

    def decoder_decode(self, q, k, v, k_cache, v_cache, out, q_s, k_s, v_s, o_s, cache_lens, positions, batch,
                       heads, kv_heads, max_len, rope_theta, scale=None, num_splits=0, workspace=0, stream=0):
        self.lib.call("molmo_decoder_decode", q, k, v, k_cache, v_cache, out, q_s, k_s, v_s, o_s, cache_lens,
                      positions or None, batch, heads, kv_heads, max_len, rope_theta, scale or 0.0, num_splits,
                      workspace or None, stream or None)


Kernels = DirectKernels | CLibKernels


def emulator_kernels(direct: bool = True) -> Kernels:
    """Kernels on the CPU emulator: through the Python launch path (direct) or the C entry points."""
    lib = CLibrary(build_library(emulate=True))
    if direct:
        return DirectKernels(EmulatorLauncher(lib))
    return CLibKernels(lib, HostMemory(), EmulatorLauncher.num_sms)


# ---------------------------------------------------------------------------------------------
# numpy in, numpy out (tests, checks)
# ---------------------------------------------------------------------------------------------

def _tok_major(shape: Sequence[int]) -> Strides:
    """(batch, head, token) strides of a contiguous [B, T, H, D] array."""
    _, t, h, d = shape
    return (t * h * d, d, h * d)


def run_vit_attention(kern: Kernels, q: np.ndarray, k: np.ndarray, v: np.ndarray, scale: float | None = None
                      ) -> np.ndarray:
    """q, k, v [n, seq, heads, 64] fp16 -> out [n, seq, heads, 64] fp16."""
    m = kern.memory
    n, s, h, d = q.shape
    dq, dk, dv = (m.to_device(np.asarray(x, np.float16)) for x in (q, k, v))
    do = m.empty(q.size * 2)
    st = _tok_major(q.shape)
    kern.vit_attention(dq, dk, dv, do, st, st, st, st, n, h, s, scale)
    return m.to_host(do, q.shape, np.float16)


def run_attention_pool(kern: Kernels, q: np.ndarray, k: np.ndarray, v: np.ndarray, grid_h: int, grid_w: int,
                       q_per_window: bool = False, scale: float | None = None) -> np.ndarray:
    m = kern.memory
    n, p, h, d = k.shape
    w = (grid_h // 2) * (grid_w // 2)
    dq, dk, dv = (m.to_device(np.asarray(x, np.float16)) for x in (q, k, v))
    do = m.empty(n * w * h * d * 2)
    kern.attention_pool(dq, dk, dv, do, _tok_major(q.shape), _tok_major(k.shape), _tok_major(v.shape),
                        _tok_major((n, w, h, d)), n, h, grid_h, grid_w, q_per_window, scale)
    return m.to_host(do, (n, w, h, d), np.float16)


def run_decoder_prefill(kern: Kernels, q, k, v, k_cache, v_cache, cache_lens, theta, positions=None, scale=None):
    """q [B, T, H, 128], k/v [B, T, Hkv, 128], caches [B, Hkv, L, 128] -> (out, k_cache, v_cache)."""
    m = kern.memory
    b, t, h, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    dq, dk, dv, dkc, dvc = (m.to_device(np.asarray(x, np.float16)) for x in (q, k, v, k_cache, v_cache))
    dl = m.to_device(np.asarray(cache_lens, np.int32))
    dp = m.to_device(np.asarray(positions, np.int32)) if positions is not None else 0
    do = m.empty(q.size * 2)
    kern.decoder_prefill(dq, dk, dv, dkc, dvc, do, _tok_major(q.shape), _tok_major(k.shape), _tok_major(v.shape),
                         _tok_major(q.shape), dl, dp, b, h, hkv, t, max_len, theta, scale)
    return (m.to_host(do, q.shape, np.float16), m.to_host(dkc, k_cache.shape, np.float16),
            m.to_host(dvc, v_cache.shape, np.float16))


def run_decoder_decode(kern: Kernels, q, k, v, k_cache, v_cache, cache_lens, theta, positions=None, scale=None,
                       num_splits: int = 0):
    """q [B, H, 128], k/v [B, Hkv, 128], caches [B, Hkv, L, 128] -> (out [B, H, 128], k_cache, v_cache)."""
    m = kern.memory
    b, h, d = q.shape
    hkv, max_len = k_cache.shape[1], k_cache.shape[2]
    dq, dk, dv, dkc, dvc = (m.to_device(np.asarray(x, np.float16)) for x in (q, k, v, k_cache, v_cache))
    dl = m.to_device(np.asarray(cache_lens, np.int32))
    dp = m.to_device(np.asarray(positions, np.int32)) if positions is not None else 0
    do = m.empty(q.size * 2)
    splits = num_splits if num_splits > 0 else decode_default_splits(b, h, hkv, max_len, kern.num_sms)
    ws = m.zeros(decode_workspace_bytes(b, h, hkv, splits)) if splits > 1 else 0
    s_q = (h * d, d, 0)
    s_kv = (hkv * d, d, 0)
    kern.decoder_decode(dq, dk, dv, dkc, dvc, do, s_q, s_kv, s_kv, s_q, dl, dp, b, h, hkv, max_len, theta, scale,
                        splits, ws)
    out = m.to_host(do, q.shape, np.float16)
    if ws:  # the last CTA of every (batch, KV head group) must have reset its ticket
        parts = b * h * splits
        a = lambda n: (n + 255) & ~255  # noqa: E731
        n_tickets = b * hkv * ((h // hkv + 15) // 16)
        tickets = m.to_host(ws + a(parts * 512) + a(parts * 4), (n_tickets,), np.int32)
        if tickets.any():
            raise RuntimeError(f"decode workspace tickets were not reset: {tickets}")
    return out, m.to_host(dkc, k_cache.shape, np.float16), m.to_host(dvc, v_cache.shape, np.float16)
