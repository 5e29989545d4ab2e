"""`molmo-edge doctor [BUNDLE]`: what this machine has, and whether a bundle and its engines can run here.

`gather_facts()` probes the machine (each probe is optional and never raises); `diagnose(facts,
bundle)` turns facts into findings, each with a status (ok / info / warn / fail) and a fix. The
split keeps every judgement testable with recorded facts from machines we do not have.
"""
from __future__ import annotations

import glob
import importlib
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from molmo_edge.runtime import machine


@dataclass
class Facts:
    python: str = ""
    platform: str = ""
    machine: str = ""
    memory_bytes: int | None = None
    l4t: str | None = None
    jetpack: str | None = None
    model: str | None = None
    power_mode: dict[str, Any] | None = None
    gpu: str | None = None                     # CUDA device 0 name
    compute_capability: str | None = None
    gpu_memory_bytes: int | None = None
    gpu_error: str | None = None
    cuda_runtime: str | None = None
    cuda_bindings: dict[str, str] = field(default_factory=dict)   # "cuda-python"/"pycuda" -> version
    tensorrt: str | None = None
    tensorrt_error: str | None = None
    onnxruntime: str | None = None
    ort_providers: list[str] = field(default_factory=list)
    cameras: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Finding:
    area: str
    status: str          # ok | info | warn | fail
    message: str
    fix: str = ""

    def line(self) -> str:
        mark = {"ok": "ok  ", "info": "info", "warn": "WARN", "fail": "FAIL"}[self.status]
        return f"[{mark}] {self.area}: {self.message}" + (f"\n       fix: {self.fix}" if self.fix else "")


def _version(module: str) -> str | None:
    try:
        import importlib.metadata as md
        return md.version(module)
    except Exception:  # noqa: BLE001
        return None


def gather_facts() -> Facts:
    f = Facts(python=platform.python_version(), platform=platform.platform(), machine=platform.machine())
    try:
        f.memory_bytes = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    info = machine.read_info()
    f.l4t, f.jetpack, f.model, f.power_mode = info.l4t, info.jetpack, info.model, info.power_mode
    for name, dist in (("cuda-python", "cuda-python"), ("pycuda", "pycuda")):
        v = _version(dist)
        if v:
            f.cuda_bindings[name] = v
    try:
        from molmo_edge.runtime.backends.cuda import open_cuda
        cuda = open_cuda()
        f.gpu, f.compute_capability, f.gpu_memory_bytes = cuda.device()
        f.cuda_runtime = cuda.runtime_version()
    except Exception as e:  # noqa: BLE001 - no bindings, no driver, no GPU
        f.gpu_error = str(e).splitlines()[0][:200]
    try:
        trt = importlib.import_module("tensorrt")
        f.tensorrt = str(trt.__version__)
    except Exception as e:  # noqa: BLE001
        f.tensorrt_error = f"{type(e).__name__}: {e}"[:200]
    try:
        import onnxruntime as ort
        f.onnxruntime = ort.__version__
        f.ort_providers = list(ort.get_available_providers())
    except Exception:  # noqa: BLE001
        pass
    f.cameras = sorted(glob.glob("/dev/video*"))
    return f


def _cuda_python_pin(jetpack: str | None) -> str:
    line = machine.jetpack_line(jetpack)
    cuda = machine.JETPACK_STACK.get(line or "", {}).get("cuda", "12.6")
    major = cuda.split(".")[0]
    return f"pip install 'cuda-python>={major},<{int(major) + 1}'"


def _ort_index(jetpack: str | None) -> str:
    line = machine.jetpack_line(jetpack) or ""
    if line.startswith("7"):
        return "pip install onnxruntime-gpu --extra-index-url https://pypi.jetson-ai-lab.io/jp7/cu130"
    return "pip install onnxruntime-gpu --extra-index-url https://pypi.jetson-ai-lab.io/jp6/cu126"


def diagnose_machine(f: Facts) -> list[Finding]:
    out: list[Finding] = []
    on_jetson = f.l4t is not None
    out.append(Finding("python", "ok", f"Python {f.python} on {f.machine} ({f.platform})"))
    if on_jetson:
        line = machine.jetpack_line(f.jetpack)
        stack = machine.JETPACK_STACK.get(line or "", {})
        if not f.jetpack:
            out.append(Finding("jetpack", "warn", f"L4T {f.l4t} is not a JetPack release this tool knows",
                               "use JetPack 6.1/6.2 (Orin) or 7.0/7.1 (Thor)"))
        elif line in ("6.1", "6.2", "7.0", "7.1"):
            out.append(Finding("jetpack", "ok", f"{f.model or 'Jetson'}: L4T {f.l4t} = JetPack {f.jetpack} "
                               f"(CUDA {stack['cuda']}, TensorRT {stack['tensorrt']}, Python {stack['python']})"))
        else:
            out.append(Finding("jetpack", "warn", f"JetPack {f.jetpack} (L4T {f.l4t}) is not a supported target "
                               "(TensorRT engines here target JetPack 6.1/6.2 with TensorRT 10.3 and 7.0/7.1 with 10.13)",
                               "flash JetPack 6.2 (Orin) or 7.x (Thor) with SDK Manager"))
        if f.power_mode:
            name = f.power_mode.get("name", "?")
            status = "ok" if "MAXN" in name.upper() else "info"
            out.append(Finding("power", status, f"power mode {name} (id {f.power_mode.get('id', '?')})",
                               "" if status == "ok" else "for benchmarks: sudo nvpmodel -m 0 && sudo jetson_clocks"))
    else:
        out.append(Finding("jetpack", "info", "not a Jetson (no /etc/nv_tegra_release): engines built here run only here"))
    if f.gpu:
        out.append(Finding("gpu", "ok", f"{f.gpu} (sm_{(f.compute_capability or '?').replace('.', '')}, "
                           f"{(f.gpu_memory_bytes or 0) / 2**30:.1f} GiB), CUDA runtime {f.cuda_runtime or '?'}"))
    else:
        status = "fail" if on_jetson else "info"
        fix = _cuda_python_pin(f.jetpack) if not f.cuda_bindings else \
            ("check the driver: `cat /proc/driver/nvidia/version`, and that this user is in the `video` group"
             if on_jetson else "")
        out.append(Finding("gpu", status, f"no CUDA device visible ({f.gpu_error or 'no CUDA bindings'})", fix))
    if f.cuda_bindings:
        out.append(Finding("cuda-bindings", "ok", ", ".join(f"{k} {v}" for k, v in f.cuda_bindings.items())))
        cp = f.cuda_bindings.get("cuda-python")
        want = machine.JETPACK_STACK.get(machine.jetpack_line(f.jetpack) or "", {}).get("cuda")
        if cp and want and cp.split(".")[0] != want.split(".")[0]:
            out.append(Finding("cuda-bindings", "warn", f"cuda-python {cp} does not match JetPack's CUDA {want} driver",
                               _cuda_python_pin(f.jetpack)))
    else:
        out.append(Finding("cuda-bindings", "warn" if on_jetson or f.tensorrt else "info",
                           "neither cuda-python nor pycuda is installed (the TensorRT backend needs one)",
                           _cuda_python_pin(f.jetpack)))
    if f.tensorrt:
        expected = machine.JETPACK_STACK.get(machine.jetpack_line(f.jetpack) or "", {}).get("tensorrt")
        if expected and not f.tensorrt.startswith(expected.split(" ")[0]):
            out.append(Finding("tensorrt", "warn", f"TensorRT {f.tensorrt}, but JetPack {f.jetpack} ships {expected}",
                               "use JetPack's own TensorRT (python3-libnvinfer); PyPI wheels are SBSA builds, not for JetPack 6"))
        else:
            out.append(Finding("tensorrt", "ok", f"TensorRT {f.tensorrt}"))
    else:
        status = "fail" if on_jetson else "info"
        fix = ("sudo apt install python3-libnvinfer python3-libnvinfer-dev (JetPack), or run jetson/setup.sh"
               if on_jetson else "the onnxruntime backend works without it; TensorRT engines need `pip install tensorrt-cu12` "
               "on an NVIDIA GPU, or a Jetson")
        out.append(Finding("tensorrt", status, f"TensorRT Python bindings missing ({f.tensorrt_error or 'not installed'})", fix))
    if f.onnxruntime:
        gpu_ep = [p for p in f.ort_providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
        status = "ok" if gpu_ep or not (on_jetson or f.gpu) else "warn"
        out.append(Finding("onnxruntime", status, f"onnxruntime {f.onnxruntime}: {', '.join(f.ort_providers)}",
                           "" if status == "ok" else _ort_index(f.jetpack)))
    else:
        out.append(Finding("onnxruntime", "fail", "onnxruntime is not installed", "pip install onnxruntime"))
    if f.cameras:
        out.append(Finding("cameras", "ok", ", ".join(f.cameras)))
    else:
        out.append(Finding("cameras", "info", "no /dev/video* camera (CSI cameras need nvargus-daemon; files and RTSP "
                           "work anyway)"))
    return out


def diagnose_bundle(f: Facts, folder: str, check_trt: Callable[[str, str], Any] | None = None) -> list[Finding]:
    """Findings about a bundle on this machine. check_trt(folder, version) -> a check-trt report (the CLI passes
    runtime.tensorrt.check.check_bundle; device/ does not import tensorrt/); None skips that part."""
    from molmo_edge.runtime.bundle import load_bundle
    from molmo_edge.runtime.errors import MolmoEdgeError
    out: list[Finding] = []
    try:
        bundle = load_bundle(folder)
    except MolmoEdgeError as e:
        return [Finding("bundle", "fail", str(e))]
    cfg = bundle.config
    out.append(Finding("bundle", "ok", f"{folder}: {cfg.family}, graphs {', '.join(bundle.manifest['graphs'])}"))
    # TensorRT parser support for this machine's TensorRT, or the JetPack's, or both releases
    from molmo_edge.runtime.backends.trt_engines import TRT_VERSIONS
    versions: list[str] = []
    if f.tensorrt:
        versions = [".".join(f.tensorrt.split(".")[:2])]
    elif f.jetpack:
        exp = machine.JETPACK_STACK.get(machine.jetpack_line(f.jetpack) or "", {}).get("tensorrt", "")
        versions = [exp] if exp in TRT_VERSIONS else []
    versions = [v for v in versions if v in TRT_VERSIONS] or list(TRT_VERSIONS)
    for v in versions if check_trt else []:
        rep = check_trt(folder, v)
        for key, probs in rep.graphs.items():
            errs = [p for p in probs if p.severity == "error"]
            if errs:
                ops = sorted({p.op for p in errs if p.op})
                status = "fail" if f.tensorrt else "warn"
                out.append(Finding(f"check-trt {v}", status, f"{key}: {len(errs)} problem(s) for TensorRT {v} "
                                   f"(ops: {', '.join(ops) or '-'}; first: {errs[0].message})",
                                   f"molmo-edge check-trt {folder} --trt {v} lists them; "
                                   + ("run this graph on onnxruntime (--backend onnxruntime)" if key.startswith("decoder")
                                      else "re-export the graph")))
            else:
                out.append(Finding(f"check-trt {v}", "ok", f"{key} parses on TensorRT {v}"))
    # engines
    if f.tensorrt and f.gpu:
        from molmo_edge.runtime.backends.trt_engines import EngineError, TrtEnv, find_engine, list_engines
        env = TrtEnv(f.tensorrt, f.gpu, f.compute_capability or "?", f.l4t, f.jetpack, f.cuda_runtime)
        if not list_engines(folder):
            out.append(Finding("engines", "warn", "no TensorRT engines built yet", f"molmo-edge build {folder}"))
        for prec in ("fp16", "int8"):
            try:
                rec = find_engine(folder, bundle.manifest, env, prec)
                out.append(Finding("engines", "ok", f"{prec}: {os.path.basename(rec.path)} is current for this machine"))
            except EngineError as e:
                if list_engines(folder):
                    out.append(Finding("engines", "warn", f"{prec}: {str(e).split(': build one here')[0]}",
                                       f"molmo-edge build {folder} --precision {prec}"))
    elif os.path.isdir(os.path.join(folder, "engines")):
        out.append(Finding("engines", "info", "engines exist but TensorRT or the GPU is missing here, so they cannot be checked"))
    # memory fit on a known Jetson module
    from molmo_edge.runtime.device.targets import DEVICES, match_device
    dev = match_device(f.model, f.memory_bytes)
    if dev:
        from molmo_edge.runtime.backends.trt_engines import default_workspace_mb
        from molmo_edge.runtime.device.plan import PlanSettings, make_plan
        p = make_plan(cfg, DEVICES[dev], PlanSettings(precision="fp16", max_crops=cfg.preprocess.max_crops,
                                                      max_seq=cfg.max_sequence_length,
                                                      workspace_mb=default_workspace_mb(f.memory_bytes)))
        if p.fits:
            out.append(Finding("memory", "ok", f"fp16 at {cfg.preprocess.max_crops} crops fits {p.device}: "
                               f"{p.total_gib:.1f} of {p.module_gib:.0f} GiB"))
        else:
            alt = p.suggestions[0] if p.suggestions else None
            fix = ("; ".join(f"--{k.replace('_', '-')} {v}" for k, v in alt["change"].items()) + f" ({alt['total_gib']:.1f} GiB)"
                   if alt else "use a larger module")
            out.append(Finding("memory", "fail", f"fp16 at {cfg.preprocess.max_crops} crops needs {p.total_gib:.1f} GiB, "
                               f"{p.device} has {p.module_gib:.0f}", f"molmo-edge plan {folder} --device {dev}: {fix}"))
    return out


def diagnose(f: Facts, bundle: str | None = None, check_trt: Callable[[str, str], Any] | None = None) -> list[Finding]:
    out = diagnose_machine(f)
    if bundle:
        out += diagnose_bundle(f, bundle, check_trt)
    return out


def format_findings(findings: list[Finding]) -> str:
    return "\n".join(x.line() for x in findings)


def exit_code(findings: list[Finding]) -> int:
    return 1 if any(x.status == "fail" for x in findings) else 0


if __name__ == "__main__":  # pragma: no cover
    fs = diagnose(gather_facts(), sys.argv[1] if len(sys.argv) > 1 else None)
    print(format_findings(fs))
