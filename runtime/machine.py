"""Facts about this machine, in one place: memory, CPU, package versions, and on a Jetson the L4T/JetPack
release, the module, the power mode and tegrastats samples.

Every Jetson reader has a pure parser (tested with recorded outputs) and a thin function that runs the
tool or reads the file; off Jetson they return None instead of failing. `snapshot()` is what
`molmo-edge bench` records next to its timings; `TegrastatsRecorder` samples during a run.
"""
from __future__ import annotations

import errno
import functools
import importlib.metadata as md
import os
import platform
import re
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
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
        info.update(snapshot())
    except Exception:  # noqa: BLE001 - optional: not a Jetson, or tools missing
        pass
    return info


VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    return _read("/proc/cpuinfo")  # read once: every onnxruntime session's options ask (int8_pairs_saturate)


def int8_pairs_saturate(cpuinfo: str | None = None, machine: str | None = None) -> bool:
    """True on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI): their INT8 MatMul multiplies u8 by s8 through
    VPMADDUBSW, whose int16 pair sums saturate. False on VNNI x86 and on other architectures (ARM's dot
    products do not saturate). cpuinfo: /proc/cpuinfo's text (read when None); unreadable on x86 counts as True."""
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64", "i686", "x86"):
        return False
    text = _cpuinfo() if cpuinfo is None else cpuinfo
    flags = next((line.split(":", 1)[1].split() for line in (text or "").splitlines() if line.startswith("flags")), None)
    return flags is None or not any(f in flags for f in VNNI_FLAGS)


# glibc raises its mmap threshold to the size of each large block it frees (up to 32 MiB), so after the first free
# the next blocks below that size come from the heap, and freed heap blocks under a live one stay resident
LARGE_FREE_BYTES = 4 << 20


def return_large_frees(threshold: int = LARGE_FREE_BYTES) -> bool:
    """Have glibc give blocks of `threshold` bytes and more back to the kernel when they are freed, for the
    batch jobs that free many large tensors (export's self-check, quantize, calibrate). Measured, full-width
    MolmoE-1B export check (2 layers, one 64-expert block at a time): 3.29 -> 2.13 GiB peak anonymous memory.
    Not for ask/serve: each large activation is then a fresh mmap, page faults included (decode of that
    bundle 53 -> 35-41 tokens/s). False where it does not apply: not glibc, or MALLOC_MMAP_THRESHOLD_ set."""
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") is not None:
        return False  # the user's own setting wins
    libc = _glibc()
    m_mmap_threshold = -3  # malloc.h; setting it also ends the dynamic threshold
    return bool(libc.mallopt(m_mmap_threshold, int(threshold))) if libc is not None else False


@functools.lru_cache(maxsize=1)
def _glibc():
    """This process's C library when it is glibc (mallopt, malloc_trim), else None."""
    try:
        import ctypes
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "gnu_get_libc_version") else None


def drop_mapped_pages(paths: list[str]) -> int:
    """Drop this process's resident pages of mappings of `paths` that hold no written page; returns the bytes of
    mappings advised. onnxruntime maps external data private and writable, and keeps a MatMulNBits/QMoE graph's
    original scales mapped (and resident: they were read to repack) for the session's life, though the kernels
    read only the repacked copy (measured: after dropping them a prefill and decode steps fault none back in;
    full-size MolmoE-1B INT4: 0.84 GiB). MADV_DONTNEED on a private mapping loses only written (copy-on-write)
    pages, so a mapping with any (smaps "Anonymous" above 0) is left alone; a later read of the others faults
    them in again from the file or the page cache. 0 where /proc/self/smaps is missing."""
    if not paths:
        return 0
    want = {os.path.realpath(p) for p in paths}
    try:
        import ctypes
        with open("/proc/self/smaps") as f:
            lines = f.read().splitlines()
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    except (OSError, AttributeError):
        return 0
    spans, span = [], None  # (lo, hi) of the wanted mappings with no written page
    for line in lines:
        parts = line.split()
        if "-" in parts[0] and len(parts) >= 5 and not parts[0].endswith(":"):  # a mapping's header line
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            span = (lo, hi) if len(parts) >= 6 and " ".join(parts[5:]) in want else None
            if span:
                spans.append(span)
        elif span and parts[0] == "Anonymous:" and int(parts[1]) > 0:
            spans.remove(span)
            span = None
    madv_dontneed = 4  # linux/mman.h
    return sum(hi - lo for lo, hi in spans if libc.madvise(lo, hi - lo, madv_dontneed) == 0)


def trim_heap() -> bool:
    """Give the free pages of glibc's heaps back to the kernel (malloc_trim) after a vision pass and at the end of
    a question: onnxruntime without its arena frees those activations, but glibc keeps freed heap blocks resident
    (a full-width 2-layer MolmoE-1B INT4 with INT8 vision kept +0.20 GiB after a question). Not between a prefill
    and its decode steps (they would fault their scratch back in: decode 9.3 -> 8.5 tokens/s), and not by lowering
    the mmap threshold (return_large_frees): every decode step would then map, fault in and unmap its scratch
    (GroupQueryAttention's float32 copies of an fp16 KV cache; full-size MolmoE-1B at 770 tokens of context,
    decode 9.8 -> 3.0 tokens/s). True when glibc trimmed."""
    libc = _glibc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


MADV_PAGEOUT = 21  # linux/mman.h, Linux 5.4+
PAGE_OUT_EVERY_S = 0.02


def _mapped_spans(ranges: list[tuple[str, int, int]], page: int) -> list[tuple[int, int]]:
    """(address, bytes) of this process's mappings of the file ranges (path, offset, length), whole pages only."""
    by_path: dict[str, list[tuple[int, int]]] = {}
    for path, off, n in ranges:
        by_path.setdefault(os.path.realpath(path), []).append((off, off + n))
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            parts = line.split(maxsplit=5)
            if len(parts) < 6 or parts[5].rstrip("\n") not in by_path:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            off = int(parts[2], 16)
            for a, b in by_path[parts[5].rstrip("\n")]:
                s, e = max(a, off), min(b, off + hi - lo)
                s, e = -(-s // page) * page, e // page * page
                if e > s:
                    out.append((lo + s - off, e - s))
    return out


class paging_out:
    """While the block runs (onnxruntime loading a graph), page this process's mappings of `ranges` (path,
    offset, length: what it reads only while loading, runtime.onnx_index) out every PAGE_OUT_EVERY_S, so they do
    not pile up in RSS: full-size MolmoE-1B INT4, 0.84 GiB of scales resident at the end of the load, all read
    and never again. MADV_PAGEOUT loses no data whatever the address holds by then (clean file pages are
    dropped, anonymous ones swapped or left), so a mapping onnxruntime replaced between reading /proc/self/maps
    and the advice costs a page fault at most; unlike MADV_DONTNEED, which is only safe once the load is over
    (drop_mapped_pages). It also evicts those pages from the page cache: on exit they are read back into it
    (POSIX_FADV_WILLNEED, asynchronous, not into this process) for the next process's load. A no-op where the
    kernel lacks MADV_PAGEOUT or /proc, or for a file this user may not write (the kernel then skips file
    pages)."""

    def __init__(self, ranges: list[tuple[str, int, int]]):
        self.ranges = ranges
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0

    def _run(self, libc, page: int) -> None:
        import ctypes
        while not self._stop.wait(PAGE_OUT_EVERY_S):
            try:
                spans = _mapped_spans(self.ranges, page)
            except OSError:
                return
            for a, n in spans:  # ENOMEM: unmapped meanwhile, fine; EINVAL: a kernel without MADV_PAGEOUT
                if libc.madvise(a, n, MADV_PAGEOUT) != 0 and ctypes.get_errno() == errno.EINVAL:
                    return
            self.rounds += 1

    def __enter__(self) -> "paging_out":
        if self.ranges and os.path.exists("/proc/self/maps"):
            try:
                import ctypes
                libc = ctypes.CDLL(None, use_errno=True)
                libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            except (OSError, AttributeError):
                return self
            self._thread = threading.Thread(target=self._run, args=(libc, os.sysconf("SC_PAGE_SIZE")),
                                            name="molmo-edge-page-out", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        for path, off, n in self.ranges:
            try:
                fd = os.open(path, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.posix_fadvise(fd, off, n, os.POSIX_FADV_WILLNEED)
            except (OSError, AttributeError):
                pass
            finally:
                os.close(fd)


NV_TEGRA_RELEASE = "/etc/nv_tegra_release"
DEVICE_TREE_MODEL = "/proc/device-tree/model"

# L4T release -> JetPack (jetson-containers l4t_version.py; docs/jetson-targets.md; tensorrt notes §6.1)
_L4T_JETPACK: list[tuple[tuple[int, ...], str]] = [
    ((35, 2, 1), "5.1"), ((35, 3, 1), "5.1.1"), ((35, 4, 1), "5.1.2"), ((35, 5, 0), "5.1.3"), ((35, 6, 0), "5.1.4"),
    ((35, 6, 1), "5.1.5"), ((36, 3, 0), "6.0"), ((36, 4, 0), "6.1"), ((36, 4, 3), "6.2"), ((36, 4, 4), "6.2.1"),
    ((36, 5, 0), "6.2.2"), ((38, 2, 0), "7.0"), ((38, 4, 0), "7.1"), ((39, 2, 0), "7.2"),
]
# JetPack line -> the stack it ships (same sources); "verify" marks what the docs leave open
JETPACK_STACK: dict[str, dict[str, str]] = {
    "5.1": {"cuda": "11.4", "tensorrt": "8.5", "python": "3.8", "ubuntu": "20.04"},
    "6.0": {"cuda": "12.2", "tensorrt": "8.6", "python": "3.10", "ubuntu": "22.04"},
    "6.1": {"cuda": "12.6", "tensorrt": "10.3", "python": "3.10", "ubuntu": "22.04"},
    "6.2": {"cuda": "12.6", "tensorrt": "10.3", "python": "3.10", "ubuntu": "22.04"},
    "7.0": {"cuda": "13.0", "tensorrt": "10.13", "python": "3.12", "ubuntu": "24.04"},
    "7.1": {"cuda": "13.0", "tensorrt": "10.13", "python": "3.12", "ubuntu": "24.04"},
    "7.2": {"cuda": "13.2", "tensorrt": "10.16 (verify)", "python": "3.12", "ubuntu": "24.04"},
}


def _run(cmd: list[str], timeout: float = 5.0) -> str | None:
    if not shutil.which(cmd[0]):
        return None
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout if r.returncode == 0 else None


def _read(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return None


# --- L4T / JetPack --------------------------------------------------------------------------
def parse_nv_tegra_release(text: str) -> str | None:
    """'# R36 (release), REVISION: 4.3, GCID: ...' -> '36.4.3'."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*(\d+)(?:\.(\d+))?", text or "")
    if not m:
        return None
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}"


def parse_l4t_core_version(text: str) -> str | None:
    """dpkg version of nvidia-l4t-core, '36.4.3-20250107174145' -> '36.4.3'."""
    m = re.match(r"\s*(\d+)\.(\d+)(?:\.(\d+))?", text or "")
    return f"{m.group(1)}.{m.group(2)}.{m.group(3) or 0}" if m else None


def _vtuple(v: str) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", v)[:3])


def jetpack_for_l4t(l4t: str | None) -> str | None:
    """The JetPack release of an L4T release: the newest entry not above it on the same major."""
    if not l4t:
        return None
    v = _vtuple(l4t)
    best = None
    for rel, jp in _L4T_JETPACK:
        if rel[0] == v[0] and rel <= v + (0,) * (3 - len(v)):
            best = jp
    return best


def jetpack_line(jetpack: str | None) -> str | None:
    """'6.2.1' -> '6.2' (the JETPACK_STACK key)."""
    if not jetpack:
        return None
    parts = jetpack.split(".")
    key = ".".join(parts[:2])
    return key if key in JETPACK_STACK else None


def read_l4t_release() -> str | None:
    text = _read(NV_TEGRA_RELEASE)
    rel = parse_nv_tegra_release(text or "")
    if rel:
        return rel
    out = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-l4t-core"])
    return parse_l4t_core_version(out or "")


def read_device_model() -> str | None:
    text = _read(DEVICE_TREE_MODEL)
    return text.strip("\x00\n ") if text else None


# --- power mode and clocks -------------------------------------------------------------------
def parse_nvpmodel(text: str) -> dict[str, Any] | None:
    """`nvpmodel -q` -> {'name': 'MAXN', 'id': 0}."""
    m = re.search(r"NV Power Mode:\s*(\S+)", text or "")
    if not m:
        return None
    out: dict[str, Any] = {"name": m.group(1)}
    ids = re.findall(r"^\s*(\d+)\s*$", text, re.M)
    if ids:
        out["id"] = int(ids[-1])
    return out


def read_power_mode() -> dict[str, Any] | None:
    return parse_nvpmodel(_run(["nvpmodel", "-q"]) or "")


def read_jetson_clocks() -> str | None:
    """`jetson_clocks --show` (needs root); None when it cannot be read."""
    if os.geteuid() != 0:
        return None
    out = _run(["jetson_clocks", "--show"])
    return out.strip() if out else None


# --- tegrastats ------------------------------------------------------------------------------
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)mW/(\d+)mW")   # VDD_IN, VIN_SYS_5V0, VDDQ_VDD2_1V8AO, GPU ...


def parse_tegrastats(line: str) -> dict[str, Any] | None:
    """One tegrastats line -> RAM, swap, CPU load, GPU load and clock, EMC, temperatures, power rails (mW)."""
    if not line or "RAM" not in line:
        return None
    out: dict[str, Any] = {}
    m = re.search(r"RAM (\d+)/(\d+)MB", line)
    if m:
        out["ram_used_mb"], out["ram_total_mb"] = int(m.group(1)), int(m.group(2))
    m = re.search(r"SWAP (\d+)/(\d+)MB", line)
    if m:
        out["swap_used_mb"] = int(m.group(1))
    m = re.search(r"CPU \[([^\]]*)\]", line)
    if m:
        loads = [int(x) for x in re.findall(r"(\d+)%@", m.group(1))]
        out["cpu_load_pct"] = round(sum(loads) / len(loads), 1) if loads else 0.0
    m = re.search(r"GR3D_FREQ (\d+)%(?:@\[?(\d+))?", line)
    if m:
        out["gpu_load_pct"] = int(m.group(1))
        if m.group(2):
            out["gpu_mhz"] = int(m.group(2))
    m = re.search(r"EMC_FREQ (\d+)%(?:@(\d+))?", line)
    if m:
        out["emc_load_pct"] = int(m.group(1))
    temps = {k: float(v) for k, v in re.findall(r"\b([A-Za-z][\w]*)@(-?\d+(?:\.\d+)?)C\b", line)}
    if temps:
        out["temp_c"] = temps
    rails = {name: int(now) for name, now, _avg in _RAIL.findall(line)}
    if rails:
        out["power_mw"] = rails
    return out


def summarize_tegrastats(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean/max of GPU load and of every rail, peak RAM, over a run's samples."""
    if not samples:
        return {"samples": 0}
    out: dict[str, Any] = {"samples": len(samples)}
    ram = [s["ram_used_mb"] for s in samples if "ram_used_mb" in s]
    if ram:
        out["ram_peak_mb"] = max(ram)
    gpu = [s["gpu_load_pct"] for s in samples if "gpu_load_pct" in s]
    if gpu:
        out["gpu_load_pct"] = {"mean": round(sum(gpu) / len(gpu), 1), "max": max(gpu)}
    rails: dict[str, list[int]] = {}
    for s in samples:
        for k, v in s.get("power_mw", {}).items():
            rails.setdefault(k, []).append(v)
    if rails:
        out["power_mw"] = {k: {"mean": round(sum(v) / len(v), 1), "max": max(v)} for k, v in rails.items()}
    return out


class TegrastatsRecorder:
    """Sample tegrastats while a block runs: `with TegrastatsRecorder() as r: ...; r.summary()`.
    Does nothing (0 samples) where tegrastats is missing."""

    def __init__(self, interval_ms: int = 200):
        self.interval_ms = interval_ms
        self.samples: list[dict[str, Any]] = []
        self._proc: subprocess.Popen | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "TegrastatsRecorder":
        self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> None:
        if not shutil.which("tegrastats"):
            return
        self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)], stdout=subprocess.PIPE,
                                      stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        for line in self._proc.stdout:
            s = parse_tegrastats(line)
            if s:
                self.samples.append(s)

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self._proc.kill()
            self._proc = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def summary(self) -> dict[str, Any]:
        return summarize_tegrastats(self.samples)


def tegrastats_sample(interval_ms: int = 200, timeout: float = 3.0) -> dict[str, Any] | None:
    """One parsed tegrastats line, or None where tegrastats is missing."""
    with TegrastatsRecorder(interval_ms) as r:
        t0 = time.monotonic()
        while not r.samples and time.monotonic() - t0 < timeout and r._proc is not None:
            time.sleep(0.05)
    return r.samples[0] if r.samples else None


@dataclass
class JetsonInfo:
    l4t: str | None
    jetpack: str | None
    model: str | None
    power_mode: dict[str, Any] | None

    @property
    def is_jetson(self) -> bool:
        return self.l4t is not None or (self.model or "").lower().startswith("nvidia jetson")


def read_info() -> JetsonInfo:
    l4t = read_l4t_release()
    return JetsonInfo(l4t, jetpack_for_l4t(l4t), read_device_model(), read_power_mode() if l4t else None)


def snapshot(tegrastats: bool = True) -> dict[str, Any]:
    """What bench records about a Jetson: release, module, power mode, clocks, one tegrastats sample.
    {} off Jetson."""
    info = read_info()
    if not info.is_jetson:
        return {}
    out: dict[str, Any] = {"jetson": {"l4t": info.l4t, "jetpack": info.jetpack, "model": info.model,
                                      "power_mode": info.power_mode, "jetson_clocks": read_jetson_clocks()}}
    if tegrastats:
        out["jetson"]["tegrastats"] = tegrastats_sample()
    return out
