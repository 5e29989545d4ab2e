"""`molmo-edge doctor [BUNDLE]`: what this machine has, and whether a bundle and its engines can run here.

`gather_facts()` probes the machine (each probe is optional and never raises); `diagnose(facts,
bundle)` turns facts into findings, each with a status (ok / info / warn / fail) and a fix. The
split keeps every judgement testable with recorded facts from machines we do not have.
"""
from __future__ import annotations

import glob
import os
import platform
import re
import sys
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from molmo_edge.runtime import machine
from molmo_edge.runtime.device.install_probes import (NUMPY_ABI, OPENCV_WHEELS, ORT_DISTRIBUTIONS, configured_sources,
                                                      import_error, installed_distributions, opencv_has_gstreamer)


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
    ort_error: str | None = None
    # every installed distribution that provides the `onnxruntime/` package: name -> "version at location"
    ort_distributions: dict[str, str] = field(default_factory=dict)
    opencv: str | None = None                  # cv2.__version__
    opencv_path: str | None = None             # where `import cv2` comes from
    opencv_gstreamer: bool | None = None       # "GStreamer: YES" in cv2.getBuildInformation()
    opencv_error: str | None = None
    opencv_distributions: dict[str, str] = field(default_factory=dict)   # pip opencv-python* wheels
    numpy: str | None = None
    numpy_distributions: list[str] = field(default_factory=list)         # "version at location", every copy
    numpy_abi_errors: dict[str, str] = field(default_factory=dict)       # module -> import error naming numpy
    sources: list[str] = field(default_factory=list)                     # configured camera sources
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


def gather_facts(sources: list[str] | None = None) -> Facts:
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
        import numpy
        f.numpy = numpy.__version__
    except Exception:  # noqa: BLE001
        pass
    trt, err = import_error("tensorrt")
    if trt is not None:
        f.tensorrt = str(trt.__version__)
    else:
        f.tensorrt_error = err
    ort, err = import_error("onnxruntime")
    if ort is not None:
        f.onnxruntime = str(getattr(ort, "__version__", "?"))
        try:
            f.ort_providers = list(ort.get_available_providers())
        except Exception as e:  # noqa: BLE001 - a half-overwritten package has no providers
            f.ort_error = f"{type(e).__name__}: {e}"[:200]
    else:
        f.ort_error = err
    cv2, err = import_error("cv2")
    if cv2 is not None:
        f.opencv, f.opencv_path = str(getattr(cv2, "__version__", "?")), getattr(cv2, "__file__", None)
        try:
            f.opencv_gstreamer = opencv_has_gstreamer(cv2.getBuildInformation())
        except Exception:  # noqa: BLE001
            pass
    else:
        f.opencv_error = err
    for module, e in (("tensorrt", f.tensorrt_error), ("onnxruntime", f.ort_error), ("cv2", f.opencv_error)):
        if e and NUMPY_ABI.search(e):
            f.numpy_abi_errors[module] = e
    try:
        dists = installed_distributions()
    except Exception:  # noqa: BLE001
        dists = {}
    f.ort_distributions = {n: "; ".join(dists[n]) for n in ORT_DISTRIBUTIONS if n in dists}
    f.opencv_distributions = {n: "; ".join(dists[n]) for n in OPENCV_WHEELS if n in dists}
    f.numpy_distributions = list(dists.get("numpy", []))
    f.sources = configured_sources(sources)
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
    out += diagnose_install(f)
    if f.onnxruntime:
        gpu_ep = [p for p in f.ort_providers if p in ("CUDAExecutionProvider", "TensorrtExecutionProvider")]
        status = "ok" if gpu_ep or not (on_jetson or f.gpu) else "warn"
        out.append(Finding("onnxruntime", status, f"onnxruntime {f.onnxruntime}: {', '.join(f.ort_providers)}",
                           "" if status == "ok" else _ort_index(f.jetpack)))
    else:
        fix = ("jetson/setup.sh (or " + _ort_index(f.jetpack) + ")" if on_jetson else
               "pip install 'molmo-edge[cpu]' (or '[gpu]' with an NVIDIA GPU)")
        out.append(Finding("onnxruntime", "fail", f"onnxruntime is not importable ({f.ort_error or 'not installed'})", fix))
    if f.cameras:
        out.append(Finding("cameras", "ok", ", ".join(f.cameras)))
    else:
        out.append(Finding("cameras", "info", "no /dev/video* camera (CSI cameras need nvargus-daemon; files and RTSP "
                           "work anyway)"))
    return out


def _major(version: str) -> str:
    return version.split(" ")[0].split(".")[0]


def diagnose_install(f: Facts) -> list[Finding]:
    """Installs that break the device's stack: two onnxruntime distributions over one package, an OpenCV
    without GStreamer where a csi:// camera is configured, a numpy of another ABI than the compiled modules'."""
    out: list[Finding] = []
    on_jetson = f.l4t is not None
    if len(f.ort_distributions) > 1:
        names = sorted(f.ort_distributions)
        keep = "onnxruntime-gpu" if "onnxruntime-gpu" in names and (on_jetson or f.gpu) else names[0]
        how = (_ort_index(f.jetpack) if on_jetson and keep == "onnxruntime-gpu"
               else f"pip install {keep}")
        out.append(Finding("onnxruntime", "fail", f"{len(names)} onnxruntime distributions are installed at once "
                           f"({'; '.join(f'{n} {v}' for n, v in sorted(f.ort_distributions.items()))}): they share one "
                           "`onnxruntime/` package, the last one installed owns its files (CUDA provider lost or mixed)",
                           f"pip uninstall -y {' '.join(names)} && {how}"))
    csi = [s for s in f.sources if s.lower().startswith("csi://")]
    wheels = sorted(f.opencv_distributions)
    if csi and (f.opencv is None or f.opencv_gstreamer is not True):
        what = (f"OpenCV is not importable ({f.opencv_error or 'not installed'})" if f.opencv is None else
                f"OpenCV {f.opencv} at {f.opencv_path or '?'} has no GStreamer" if f.opencv_gstreamer is False else
                f"OpenCV {f.opencv} does not say whether it has GStreamer")
        if wheels and on_jetson:
            fix = (f"pip uninstall -y {' '.join(wheels)} (pip's wheels have no GStreamer and shadow JetPack's OpenCV), "
                   "then `python3 -c 'import cv2'` must come from /usr/lib/python3/dist-packages")
        elif on_jetson:
            fix = "sudo apt install libopencv-python (JetPack's OpenCV, built with GStreamer), or re-run jetson/setup.sh"
        else:
            fix = "csi:// needs an OpenCV built with GStreamer (JetPack's); use /dev/videoN, rtsp:// or a file here"
        out.append(Finding("opencv", "fail", f"{what}, but csi:// camera {csi[0]} is configured: it cannot open", fix))
    elif f.opencv:
        gst = {True: "with GStreamer", False: "without GStreamer", None: "GStreamer unknown"}[f.opencv_gstreamer]
        status = "warn" if on_jetson and wheels else "ok"
        out.append(Finding("opencv", status, f"OpenCV {f.opencv} ({gst}) from {f.opencv_path or '?'}"
                           + (f"; pip wheels {', '.join(wheels)} installed" if wheels else ""),
                           f"pip uninstall -y {' '.join(wheels)} (keeps JetPack's GStreamer OpenCV for csi://)"
                           if status == "warn" else ""))
    elif f.opencv_error and not f.numpy_abi_errors.get("cv2"):
        out.append(Finding("opencv", "warn", f"OpenCV is not importable ({f.opencv_error}): cameras, watch and overlays "
                           "need it", "jetson/setup.sh" if on_jetson else "pip install 'molmo-edge[cpu]'"))
    for module, err in sorted(f.numpy_abi_errors.items()):
        built_for_1 = re.search(r"NumPy 1\.x|multiarray failed|_ARRAY_API", err, re.I) is not None
        majors = sorted({_major(d) for d in f.numpy_distributions})
        fix = ("pip install 'numpy<2' (the module was built against numpy 1.x; JetPack 6's system modules are)"
               if built_for_1 else f"pip install --upgrade numpy (the module needs a newer numpy than {f.numpy})")
        out.append(Finding("numpy", "fail", f"numpy {f.numpy or '?'} does not match the ABI {module} was built for "
                           f"({err})" + (f"; numpy copies: {', '.join(f.numpy_distributions)}" if len(majors) > 1 else ""),
                           fix))
    if not f.numpy_abi_errors and len({_major(d) for d in f.numpy_distributions}) > 1 and on_jetson:
        out.append(Finding("numpy", "warn", f"numpy {f.numpy} shadows another major version "
                           f"({', '.join(f.numpy_distributions)}): system modules built for it may fail to import",
                           "pip install 'numpy<2'" if any(_major(d) == "1" for d in f.numpy_distributions) else ""))
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
                parity = rec.facts.get("parity")
                name = os.path.basename(rec.path)
                if not parity:
                    out.append(Finding("engines", "warn", f"{prec}: {name} is current but was built before engines were "
                                       "checked against onnxruntime", f"molmo-edge build {folder} --precision {prec} --force"))
                elif parity.get("skipped"):
                    out.append(Finding("engines", "warn", f"{prec}: {name} is current but registered with --no-verify "
                                       "(not checked against onnxruntime)", f"molmo-edge build {folder} --precision {prec} --force"))
                else:
                    worst = max((parity.get(r, {}).get("worst") or {}).get("max_rel", 0) for r in ("vision", "decoder"))
                    out.append(Finding("engines", "ok", f"{prec}: {name} is current for this machine and matched "
                                       f"onnxruntime (worst max relative error {worst:.3g})"))
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
