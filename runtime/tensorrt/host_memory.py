"""Peak host memory per build stage (parse, build, parity) from /proc/self/status.

Each stage resets the kernel's peak-RSS mark (`echo 5 > /proc/self/clear_refs`, Linux 4.0+), so VmHWM at
its end is that stage's own peak, not the process's so far. On Jetson, CUDA allocations live in the same
DRAM but are not part of RSS, so MemAvailable at each stage's end is recorded too. Off Linux only the
process peak (ru_maxrss) is known and every stage reports it. A reset is trusted only when VmHWM came back to
VmRSS; the kernel may fold memory freed within a stage into VmHWM late (this project's CI VM, Linux 6.18, did
not count a freed 200 MiB mapping), so a stage's transient peak may be a lower bound (not yet run on a Jetson).
"""
from __future__ import annotations

import contextlib
import resource
from typing import Any, Iterator

MiB = 2 ** 20


def _status_kib(field: str, path: str = "/proc/self/status") -> int | None:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _mem_available_kib() -> int | None:
    return _status_kib("MemAvailable", "/proc/meminfo")


def _reset_peak() -> bool:
    """Reset VmHWM; True only when it took (VmHWM back at VmRSS): some kernels accept the write and keep the
    peak (seen on this project's CI VM), and then a stage would report the process peak as its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    hwm, rss = _status_kib("VmHWM"), _status_kib("VmRSS")
    return hwm is not None and rss is not None and hwm - rss < 4096


class HostMemory:
    """with mem.stage("decoder: build"): ...  then mem.stages -> {name: {"peak_rss_mib", "available_mib"}}."""

    def __init__(self) -> None:
        self.stages: dict[str, dict[str, Any]] = {}

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        exact = _reset_peak()
        try:
            yield
        finally:
            hwm = _status_kib("VmHWM") if exact else None
            peak = hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            avail = _mem_available_kib()
            self.stages[name] = {"peak_rss_mib": round(peak / MiB, 1), "exact": exact and hwm is not None,
                                 "available_mib": round(avail / 1024, 1) if avail is not None else None}

    def peak_mib(self) -> float:
        return max((s["peak_rss_mib"] for s in self.stages.values()), default=0.0)

    def summary(self) -> dict[str, Any]:
        return {"peak_rss_mib": self.peak_mib(), "stages": self.stages}
