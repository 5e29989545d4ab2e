"""The Jetson targets as one data table (shared/docs/jetson-targets.md §6, its sources named there).

Dense INT8/FP16 tensor throughput is *derived* as that document does: published sparse GPU TOPS / 2
(Ampere structured sparsity), FP16 = dense INT8 / 2. Thor's figures are derived from its published
2,070 FP4 TFLOPS (sparse) with Blackwell's dense FP4:FP8:FP16 = 4:2:1 ratio: an upper bound, not a
measurement. `os_reserve_gb` (Ubuntu + L4T services, headless) and `runtime_overhead_gb` (CUDA
context, cuBLAS/cuDNN/TensorRT libraries) are this project's assumptions, stated as such.
"""
from __future__ import annotations

from dataclasses import dataclass

from molmo_edge.runtime.errors import MolmoEdgeError


@dataclass(frozen=True)
class DeviceSpec:
    key: str
    name: str
    gpu: str
    sm: str                       # compute capability
    memory_gb: float              # unified LPDDR (CPU and GPU share it)
    bandwidth_gbs: float          # DRAM bandwidth
    int8_tops: float              # dense INT8 tensor throughput (derived)
    fp16_tflops: float            # dense FP16 tensor throughput (derived)
    power_w: str
    jetpack: str                  # the JetPack line that supports it (TensorRT version follows)
    tensorrt: str
    os_reserve_gb: float          # assumption: memory the OS and L4T services keep (headless)
    runtime_overhead_gb: float = 0.6   # assumption: CUDA context + cuBLAS/cuDNN/TensorRT libraries
    super_bandwidth_gbs: float | None = None   # JetPack 6.2 "MAXN SUPER" mode
    super_int8_tops: float | None = None
    super_fp16_tflops: float | None = None
    note: str = ""

    def at(self, super_mode: bool) -> "DeviceSpec":
        """The spec in the JetPack 6.2 Super power mode (Orin Nano/NX), or itself."""
        if not super_mode:
            return self
        if self.super_bandwidth_gbs is None:
            raise MolmoEdgeError(f"{self.key} has no Super power mode; drop --super")
        from dataclasses import replace
        return replace(self, bandwidth_gbs=self.super_bandwidth_gbs, int8_tops=self.super_int8_tops or self.int8_tops,
                       fp16_tflops=self.super_fp16_tflops or self.fp16_tflops, name=self.name + " (MAXN SUPER)")


DEVICES: dict[str, DeviceSpec] = {d.key: d for d in (
    DeviceSpec("orin-nano-8gb", "Jetson Orin Nano 8GB", "Ampere, 1024 CUDA / 32 tensor cores, no DLA", "8.7",
               8.0, 68.0, 20.0, 10.0, "7-15 W (25 W Super)", "6.1/6.2", "10.3", os_reserve_gb=1.5,
               super_bandwidth_gbs=102.0, super_int8_tops=33.0, super_fp16_tflops=17.0,
               note="40 TOPS sparse INT8 (67 Super) published"),
    DeviceSpec("orin-nx-16gb", "Jetson Orin NX 16GB", "Ampere, 1024 CUDA / 32 tensor cores + 2 DLA", "8.7",
               16.0, 102.4, 29.0, 15.0, "10-25 W (10-40 W Super)", "6.1/6.2", "10.3", os_reserve_gb=2.0,
               super_bandwidth_gbs=102.4, note="100 TOPS sparse incl. DLA (157 Super) published; GPU share derived"),
    DeviceSpec("agx-orin-64gb", "Jetson AGX Orin 64GB", "Ampere, 2048 CUDA / 64 tensor cores + 2 DLA", "8.7",
               64.0, 204.8, 85.0, 42.0, "15-60 W", "6.1/6.2", "10.3", os_reserve_gb=3.0,
               note="275 TOPS sparse (GPU ~170 + DLA) published"),
    DeviceSpec("thor", "Jetson AGX Thor T5000", "Blackwell, 2560 CUDA (20 SMs visible), 5th-gen tensor cores", "11.0",
               128.0, 273.0, 517.0, 259.0, "40-130 W", "7.0/7.1", "10.13", os_reserve_gb=4.0,
               note="2,070 FP4 TFLOPS sparse published; INT8/FP16 dense derived from it (upper bound)"),
)}


def get_device(key: str) -> DeviceSpec:
    if key not in DEVICES:
        raise MolmoEdgeError(f"unknown device {key!r}; choose one of {', '.join(DEVICES)}")
    return DEVICES[key]


def match_device(model: str | None, memory_bytes: int | None = None) -> str | None:
    """The table key for a /proc/device-tree/model string (and total memory), or None."""
    m = (model or "").lower()
    gb = (memory_bytes or 0) / 2**30
    if "thor" in m:
        return "thor"
    if "orin" not in m:
        return None
    if "agx" in m:
        return "agx-orin-64gb" if gb == 0 or gb > 40 else None   # the 32 GB AGX is not in the table
    if "nano" in m:
        return "orin-nano-8gb" if gb == 0 or gb > 5 else None    # 4 GB Nano is not in the table
    if "nx" in m:
        return "orin-nx-16gb" if gb == 0 or gb > 10 else None    # 8 GB NX is not in the table
    return None
