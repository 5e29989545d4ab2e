"""Build and launch the molmo-edge CUDA kernels from Python, without torch.

Compilation: `compile_cubin(arch)` builds the device code (molmo_device.cu) with nvcc when it is
on PATH, else with NVRTC through cuda-python (`cuda.bindings.nvrtc`, or `cuda.nvrtc` in older
cuda-python), and caches the cubin on disk (~/.cache/molmo-edge/kernels, or
$MOLMO_EDGE_KERNEL_CACHE) keyed by source hash, architecture and compiler version.
`build_library()` builds the C entry points of molmo_kernels.h into a shared library with nvcc;
`build_library(emulate=True)` builds the same sources with a host C++ compiler against the CPU
SIMT emulator (tests on machines without a GPU).

Launching: `Kernels` exposes one method per C entry point (same arguments: device pointers as
ints, shapes, (batch, head, token) element strides, a stream handle). `DirectKernels` launches
the `__global__` kernels itself through a launcher (cuda-python driver API, PyCUDA, CuPy, or the
emulator) with the geometry of molmo_kernels.cu mirrored here; `CLibKernels` calls the C library.
`run_*` helpers take numpy arrays (for tests and checks).

Nothing here imports a CUDA binding at import time.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, Sequence

import numpy as np

KERNEL_DIR = Path(__file__).resolve().parent
HEADERS = ("molmo_common.cuh", "flash_attention.cuh", "pool_attention.cuh", "decode_attention.cuh")
DEVICE_SOURCES = (*HEADERS, "molmo_device.cu")
LIBRARY_SOURCES = (*DEVICE_SOURCES, "molmo_kernels.cu", "molmo_kernels.h")
EMULATOR_SOURCES = (*LIBRARY_SOURCES, "simt_emulator.cuh", "emulate.cu")
TARGET_ARCHS = (87, 90, 110)  # Orin, H100, Thor
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


class KernelBuildError(RuntimeError):
    pass


class BackendUnavailable(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------
# sources, cache
# ---------------------------------------------------------------------------------------------

def cache_dir() -> Path:
    env = os.environ.get("MOLMO_EDGE_KERNEL_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "molmo-edge" / "kernels"


def source_hash(names: Sequence[str] = DEVICE_SOURCES) -> str:
    h = hashlib.sha256()
    for n in names:
        h.update(n.encode() + b"\0" + (KERNEL_DIR / n).read_bytes() + b"\0")
    return h.hexdigest()[:20]


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)  # concurrent builders race harmlessly: identical content


# ---------------------------------------------------------------------------------------------
# compilers
# ---------------------------------------------------------------------------------------------

def nvcc_path() -> str | None:
    found = shutil.which("nvcc")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    return None


def nvcc_version(nvcc: str) -> str:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"V(\d+\.\d+\.\d+)", out)
    return m.group(1) if m else "unknown"


def _bindings() -> tuple[Any, Any]:
    """(driver, nvrtc) modules of cuda-python: cuda.bindings.* (12.6+, 13.x) or cuda.* (older)."""
    try:
        from cuda.bindings import driver, nvrtc  # type: ignore[import-not-found]
        return driver, nvrtc
    except ImportError:
        pass
    try:
        from cuda import cuda as driver, nvrtc  # type: ignore[import-not-found,attr-defined]
        return driver, nvrtc
    except ImportError as e:
        raise BackendUnavailable("cuda-python is not installed (pip install cuda-python nvidia-cuda-nvrtc)") from e


def nvrtc_available() -> bool:
    try:
        nvrtc_version()
        return True
    except (BackendUnavailable, OSError, RuntimeError):
        return False


def _nvrtc_check(result: Any, what: str) -> Any:
    err, *rest = result if isinstance(result, tuple) else (result,)
    if int(err) != 0:
        raise KernelBuildError(f"{what} failed: {err}")
    return rest[0] if len(rest) == 1 else rest


def nvrtc_version() -> str:
    _, nvrtc = _bindings()
    try:
        major, minor = _nvrtc_check(nvrtc.nvrtcVersion(), "nvrtcVersion")
    except Exception as e:  # the NVRTC shared library itself may be missing
        raise BackendUnavailable(f"NVRTC is not loadable: {e}") from e
    return f"{major}.{minor}"


def nvrtc_supported_archs() -> list[int]:
    _, nvrtc = _bindings()
    return [int(a) for a in _nvrtc_check(nvrtc.nvrtcGetSupportedArchs(), "nvrtcGetSupportedArchs")]


@dataclass
class CompileResult:
    cubin: bytes
    log: str          # compiler output, including ptxas resource usage (-v)
    compiler: str     # "nvcc-13.0.88" / "nvrtc-13.5"
    path: Path        # cached cubin


def _compile_nvcc(arch: int, nvcc: str) -> tuple[bytes, str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "molmo.cubin"
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
               "-o", str(out), str(KERNEL_DIR / "molmo_device.cu")]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelBuildError(f"nvcc failed for sm_{arch}:\n{r.stderr}{r.stdout}")
        return out.read_bytes(), r.stderr + r.stdout


def _compile_nvrtc(arch: int) -> tuple[bytes, str]:
    _, nvrtc = _bindings()
    src = (KERNEL_DIR / "molmo_device.cu").read_bytes()
    prog = _nvrtc_check(nvrtc.nvrtcCreateProgram(src, b"molmo_device.cu", 0, [], []), "nvrtcCreateProgram")
    try:
        opts = [f"--gpu-architecture=sm_{arch}".encode(), b"-std=c++17", b"--ptxas-options=-v",
                b"--include-path=" + str(KERNEL_DIR).encode()]
        res = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        size = _nvrtc_check(nvrtc.nvrtcGetProgramLogSize(prog), "nvrtcGetProgramLogSize")
        log = b" " * size
        _nvrtc_check(nvrtc.nvrtcGetProgramLog(prog, log), "nvrtcGetProgramLog")
        log_text = log.rstrip(b"\0 ").decode(errors="replace")
        if int(res[0]) != 0:
            raise KernelBuildError(f"NVRTC failed for sm_{arch}: {res[0]}\n{log_text}")
        size = _nvrtc_check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
        cubin = b" " * size
        _nvrtc_check(nvrtc.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
        return cubin, log_text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(arch: int, compiler: str = "auto", use_cache: bool = True) -> CompileResult:
    """Cubin of every kernel for sm_<arch>. compiler: "auto" (nvcc if on PATH, else NVRTC),
    "nvcc" or "nvrtc"."""
    nvcc = nvcc_path()
    if compiler == "auto":
        compiler = "nvcc" if nvcc else "nvrtc"
    if compiler == "nvcc":
        if not nvcc:
            raise BackendUnavailable("nvcc is not on PATH (nor in $CUDA_HOME/bin, /usr/local/cuda/bin)")
        tag = f"nvcc-{nvcc_version(nvcc)}"
    elif compiler == "nvrtc":
        tag = f"nvrtc-{nvrtc_version()}"
    else:
        raise ValueError(f"unknown compiler {compiler!r}")
    path = cache_dir() / f"molmo-{source_hash()}-sm_{arch}-{tag}.cubin"
    log_path = path.with_suffix(".log")
    if use_cache and path.exists() and log_path.exists():
        return CompileResult(path.read_bytes(), log_path.read_text(), tag, path)
    cubin, log = _compile_nvcc(arch, nvcc) if compiler == "nvcc" else _compile_nvrtc(arch)
    _atomic_write(log_path, log.encode())
    _atomic_write(path, cubin)
    return CompileResult(cubin, log, tag, path)


def ptxas_usage(log: str) -> dict[str, dict[str, int]]:
    """Per kernel: registers, spill_stores, spill_loads, stack, parsed from ptxas -v output."""
    usage: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?(\w+)'?", line)
        if m:
            current = m.group(1)
            usage.setdefault(current, {})
        if current is None:
            continue
        if (m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)):
            usage[current].update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        if (m := re.search(r"Used (\d+) registers", line)):
            usage[current]["registers"] = int(m.group(1))
    return usage


def cubin_symbols(cubin: bytes) -> set[str]:
    """Names in the ELF string tables of a cubin (enough to find the kernel entry symbols)."""
    return {s.decode(errors="replace") for s in re.findall(rb"[A-Za-z_][A-Za-z0-9_.$]{3,}", cubin)}


def _host_cxx() -> str | None:
    for c in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if c and shutil.which(c):
            return shutil.which(c)
    return None


def build_library(archs: Sequence[int] = TARGET_ARCHS, emulate: bool = False, use_cache: bool = True) -> Path:
    """Shared library with the C entry points of molmo_kernels.h: nvcc for `archs`, or (emulate)
    the host C++ compiler against the CPU emulator. Cached like the cubins."""
    if emulate:
        cxx = _host_cxx()
        if not cxx:
            raise BackendUnavailable("no host C++ compiler (g++/c++/clang++) for the CPU emulator")
        path = cache_dir() / f"libmolmo_emu-{source_hash(EMULATOR_SOURCES)}.so"
        cmd = [cxx, "-std=c++20", "-O2", "-shared", "-fPIC", "-DMOLMO_EMULATE", "-x", "c++",
               str(KERNEL_DIR / "emulate.cu")]
    else:
        nvcc = nvcc_path()
        if not nvcc:
            raise BackendUnavailable("nvcc is not on PATH; the C library needs it")
        tag = "-".join(str(a) for a in archs)
        path = cache_dir() / f"libmolmo_kernels-{source_hash(LIBRARY_SOURCES)}-sm{tag}-nvcc{nvcc_version(nvcc)}.so"
        cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", "-std=c++17", "--threads", str(len(archs))]
        for a in archs:
            cmd += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        cmd += [str(KERNEL_DIR / "molmo_kernels.cu")]
    if use_cache and path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".so")
    os.close(fd)
    r = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
    if r.returncode != 0:
        os.unlink(tmp)
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{r.stderr}{r.stdout}")
    os.replace(tmp, path)
    return path


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


class PyCudaLauncher:
    """PyCUDA alternative: the same cubin through pycuda.driver.module_from_buffer."""

    name = "pycuda"

    def __init__(self, compiler: str = "auto"):
        try:
            import pycuda.autoprimaryctx  # noqa: F401  (primary context, shared with the runtime)
            import pycuda.driver as cuda
        except ImportError as e:
            raise BackendUnavailable("pycuda is not installed") from e
        self.cuda = cuda
        dev = cuda.Context.get_device()
        major, minor = dev.compute_capability()
        self.arch = 10 * major + minor
        self.num_sms = dev.get_attribute(cuda.device_attribute.MULTIPROCESSOR_COUNT)
        self.compiled = compile_cubin(self.arch, compiler)
        self.module = cuda.module_from_buffer(self.compiled.cubin)
        self.functions = {}
        for n in KERNEL_NAMES:
            f = self.module.get_function(n)
            f.prepare(SIGNATURES[n])
            self.functions[n] = f
        self.functions["molmo_decode_attention_kernel"].set_attribute(
            cuda.function_attribute.MAX_DYNAMIC_SHARED_SIZE_BYTES, DECODE_SMEM)
        self.memory = PyCudaMemory(cuda)

    def launch(self, kernel, grid, block, smem, values, stream=0):
        if stream:
            raise ValueError("the PyCUDA launcher runs on the default stream (it cannot wrap a foreign handle)")
        vals = [(int(v) if v else 0) if c == "P" else v for c, v in zip(SIGNATURES[kernel], values)]
        self.functions[kernel].prepared_async_call(grid, (block, 1, 1), None, *vals, shared_size=smem)


class PyCudaMemory:
    def __init__(self, cuda: Any):
        self.cuda = cuda
        self._bufs: list[Any] = []

    def _alloc(self, nbytes: int) -> Any:
        b = self.cuda.mem_alloc(max(nbytes, 16))
        self._bufs.append(b)
        return b

    def to_device(self, a):
        a = np.ascontiguousarray(a)
        b = self._alloc(a.nbytes)
        self.cuda.memcpy_htod(b, a)
        return int(b)

    def empty(self, nbytes):
        b = self._alloc(nbytes)
        self.cuda.memset_d8(b, 0xFF, max(nbytes, 16))
        return int(b)

    def zeros(self, nbytes):
        b = self._alloc(nbytes)
        self.cuda.memset_d8(b, 0, max(nbytes, 16))
        return int(b)

    def to_host(self, ptr, shape, dtype):
        out = np.empty(shape, dtype)
        self.cuda.Context.synchronize()
        self.cuda.memcpy_dtoh(out, ptr)
        return out

    def synchronize(self):
        self.cuda.Context.synchronize()

    def free_all(self):
        for b in self._bufs:
            b.free()
        self._bufs.clear()


class CuPyLauncher:
    """CuPy alternative (RawModule over the cached cubin); memory through CuPy's allocator."""

    name = "cupy"

    def __init__(self, compiler: str = "auto"):
        try:
            import cupy
        except ImportError as e:
            raise BackendUnavailable("cupy is not installed") from e
        self.cp = cupy
        dev = cupy.cuda.Device()
        self.arch = int(dev.compute_capability)
        self.num_sms = int(dev.attributes["MultiProcessorCount"])
        self.compiled = compile_cubin(self.arch, compiler)
        self.module = cupy.RawModule(path=str(self.compiled.path))
        self.functions = {n: self.module.get_function(n) for n in KERNEL_NAMES}
        self.functions["molmo_decode_attention_kernel"].max_dynamic_shared_size_bytes = DECODE_SMEM
        self.memory = CuPyMemory(cupy)

    def launch(self, kernel, grid, block, smem, values, stream=0):
        conv = {"P": lambda v: np.uint64(int(v) if v else 0), "q": np.int64, "i": np.int32, "f": np.float32}
        args = tuple(conv[c](v) for c, v in zip(SIGNATURES[kernel], values))
        with self.cp.cuda.ExternalStream(int(stream)):
            self.functions[kernel](tuple(grid), (block, 1, 1), args, shared_mem=smem)


class CuPyMemory:
    def __init__(self, cp: Any):
        self.cp = cp
        self._arrs: list[Any] = []

    def _keep(self, a: Any) -> int:
        self._arrs.append(a)
        return int(a.data.ptr)

    def to_device(self, a):
        return self._keep(self.cp.asarray(np.ascontiguousarray(a)))

    def empty(self, nbytes):
        return self._keep(self.cp.full(max(nbytes, 16), 0xFF, self.cp.uint8))

    def zeros(self, nbytes):
        return self._keep(self.cp.zeros(max(nbytes, 16), self.cp.uint8))

    def to_host(self, ptr, shape, dtype):
        self.synchronize()
        for a in self._arrs:
            if int(a.data.ptr) == ptr:
                return self.cp.asnumpy(a).view(dtype).reshape(-1)[: int(np.prod(shape))].reshape(shape)
        raise KeyError("pointer not allocated by this CuPyMemory")

    def synchronize(self):
        self.cp.cuda.runtime.deviceSynchronize()

    def free_all(self):
        self._arrs.clear()


def default_launcher(device: int = 0) -> Launcher:
    """The first GPU launcher that works: cuda-python, then PyCUDA, then CuPy."""
    errors = []
    for make in (lambda: CudaPythonLauncher(device), PyCudaLauncher, CuPyLauncher):
        try:
            return make()
        except BackendUnavailable as e:
            errors.append(str(e))
    raise BackendUnavailable("no GPU launcher available: " + "; ".join(errors))


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
