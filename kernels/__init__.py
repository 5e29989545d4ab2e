"""Fused CUDA kernels, their launchers and numpy references: a library the runtime does not call yet
(it waits for the TensorRT plugins); see kernels/README.md.

    kernels/molmo_kernels.h   the C entry points (one per kernel), for C/C++ callers and TRT plugins
    kernels/*.cu, *.cuh       kernel sources (molmo_device.cu: device code; molmo_kernels.cu: entry points)
    launch.py                 NVRTC/nvcc builds with an on-disk cache; launch paths: cuda-python on a GPU,
                              the C entry points (ctypes), the CPU emulator
    reference.py              numpy references
    gpu_check.sh              tests + benchmarks on a GPU machine -> one JSON

Importing this package loads neither torch nor any CUDA binding; launch.py imports them lazily.
"""
