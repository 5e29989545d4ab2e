"""The one wrapper over the CUDA Python bindings the TensorRT backend and build need: cuda-python
(NVIDIA's own, preferred) or pycuda. Imported lazily: neither is a dependency of the library."""
from __future__ import annotations

import ctypes
from typing import Any

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError


class TensorRTMissing(MolmoEdgeError):
    """TensorRT's Python bindings or the CUDA bindings are not installed."""


class CudaError(MolmoEdgeError):
    """A CUDA call failed."""



# ---------------------------------------------------------------------------------------------
# CUDA: cuda-python (preferred, NVIDIA's own bindings) or pycuda
# ---------------------------------------------------------------------------------------------
class CudaPython:
    name = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart as rt  # older cuda-python
        self.rt = rt

    def _ok(self, res: Any, what: str) -> Any:
        err = res[0] if isinstance(res, tuple) else res
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise CudaError(f"{what} failed with {name}: check the GPU with `molmo-edge doctor`")
        return res[1] if isinstance(res, tuple) and len(res) == 2 else (res[1:] if isinstance(res, tuple) else None)

    def malloc(self, n: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(int(n), 1)), f"cudaMalloc({n})"))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def host_empty(self, n: int) -> np.ndarray:
        ptr = int(self._ok(self.rt.cudaMallocHost(max(int(n), 1)), f"cudaMallocHost({n})"))
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(max(int(n), 1),))
        self._pinned = getattr(self, "_pinned", {})
        self._pinned[arr.ctypes.data] = ptr
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        ptr = getattr(self, "_pinned", {}).pop(arr.ctypes.data, None)
        if ptr is not None:
            self._ok(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream(self) -> Any:
        return self._ok(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def handle(self, stream: Any) -> int:
        return int(stream)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                         stream), "cudaMemcpyAsync H2D")

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                         stream), "cudaMemcpyAsync D2H")

    def sync(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def device(self) -> tuple[str, str, int]:
        props = self._ok(self.rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.strip("\x00 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem)

    def runtime_version(self) -> str:
        v = int(self._ok(self.rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        return f"{v // 1000}.{v % 1000 // 10}"



class PyCuda:
    name = "pycuda"

    def __init__(self):
        import pycuda.driver as cuda  # noqa: PLC0415
        cuda.init()
        self.cuda = cuda
        self.ctx = cuda.Device(0).retain_primary_context()  # shared with TensorRT, no autoinit context
        self.ctx.push()
        self._allocs: dict[int, Any] = {}

    def malloc(self, n: int) -> int:
        a = self.cuda.mem_alloc(max(int(n), 1))
        self._allocs[int(a)] = a
        return int(a)

    def free(self, ptr: int) -> None:
        a = self._allocs.pop(ptr, None)
        if a is not None:
            a.free()

    def host_empty(self, n: int) -> np.ndarray:
        return self.cuda.pagelocked_empty(max(int(n), 1), np.uint8)

    def host_free(self, arr: np.ndarray) -> None:
        pass  # freed with the array

    def stream(self) -> Any:
        return self.cuda.Stream()

    def handle(self, stream: Any) -> int:
        return int(stream.handle)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dst, src, stream)

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, stream)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def device(self) -> tuple[str, str, int]:
        d = self.cuda.Device(0)
        major, minor = d.compute_capability()
        return d.name(), f"{major}.{minor}", int(d.total_memory())

    def runtime_version(self) -> str:
        major, minor, _ = self.cuda.get_version()
        return f"{major}.{minor}"



def open_cuda():
    """cuda-python when installed (the TensorRT samples' choice since 10.13), else pycuda."""
    errors = []
    for cls in (CudaPython, PyCuda):
        try:
            return cls()
        except ImportError as e:
            errors.append(f"{cls.name}: {e}")
    raise TensorRTMissing("no CUDA Python bindings (" + "; ".join(errors) + "): `pip install 'cuda-python>=12,<13'` "
                          "on JetPack 6 (CUDA 12.6), `'cuda-python>=13,<14'` on JetPack 7")
