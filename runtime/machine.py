"""Facts about this machine that reports and budgets need: memory, CPU, package versions."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform
from typing import Any

PACKAGES = (("molmo-edge", "molmo_edge"), ("numpy", "numpy"), ("onnxruntime", "onnxruntime"), ("onnx", "onnx"),
            ("torch", "torch"), ("opencv-python-headless", "opencv"))


def mem_available(default: int = 8 << 30) -> int:
    """Bytes the kernel says can be allocated without swapping (MemAvailable), or `default`."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return default


def package_versions(packages=PACKAGES) -> dict[str, str]:
    """Installed versions of the tools that made or run an artifact (missing ones are left out)."""
    out = {}
    for pkg, key in packages:
        try:
            out[key] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "platform": platform.platform(),
                            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    try:  # Jetson extras (power mode, tegrastats), when the tools exist
        from . import jetson_info
        info.update(jetson_info.snapshot())
    except Exception:  # noqa: BLE001 - optional: not a Jetson, or tools missing
        pass
    return info
