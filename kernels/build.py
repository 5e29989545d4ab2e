"""Build the molmo-edge CUDA kernels without torch: cubins (nvcc, else NVRTC through cuda-python) for the
launchers, and the C entry points as a shared library (nvcc, or g++ against the CPU SIMT emulator).

Everything built is cached on disk (~/.cache/molmo-edge/kernels, or $MOLMO_EDGE_KERNEL_CACHE) keyed by
source hash, architecture and compiler version. Nothing here imports a CUDA binding at import time.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from molmo_edge.runtime.files import atomic_path, write_bytes_atomic

KERNEL_DIR = Path(__file__).resolve().parent
HEADERS = ("molmo_common.cuh", "flash_attention.cuh", "pool_attention.cuh", "decode_attention.cuh")
DEVICE_SOURCES = (*HEADERS, "molmo_device.cu")
LIBRARY_SOURCES = (*DEVICE_SOURCES, "molmo_kernels.cu", "molmo_kernels.h")
EMULATOR_SOURCES = (*LIBRARY_SOURCES, "simt_emulator.cuh", "emulate.cu")
TARGET_ARCHS = (87, 90, 110)  # Orin, H100, Thor
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
    write_bytes_atomic(log_path, log.encode())
    write_bytes_atomic(path, cubin)
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
    with atomic_path(path) as tmp:  # concurrent builders race harmlessly: identical content
        r = subprocess.run(cmd + ["-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelBuildError(f"{' '.join(cmd)} failed:\n{r.stderr}{r.stdout}")
    return path
