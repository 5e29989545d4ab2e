"""What a device's Python install looks like, for `doctor`: which distributions provide onnxruntime and OpenCV,
whether OpenCV has GStreamer, which camera sources the services are configured with, and whether an import
fails on a numpy ABI mismatch. Each probe reads only; none raises."""
from __future__ import annotations

import contextlib
import importlib
import io
import os
import re
import shlex
from typing import Any

# distributions that install the `onnxruntime/` package (each replaces the others' files)
ORT_DISTRIBUTIONS = ("onnxruntime", "onnxruntime-gpu", "onnxruntime-directml", "onnxruntime-openvino", "onnxruntime-qnn",
                     "onnxruntime-rocm", "onnxruntime-cann", "onnxruntime-training", "ort-nightly", "ort-nightly-gpu")
OPENCV_WHEELS = ("opencv-python", "opencv-python-headless", "opencv-contrib-python", "opencv-contrib-python-headless")
# what an extension module built against another numpy major says when imported
NUMPY_ABI = re.compile(r"compiled using NumPy|numpy\.core\.multiarray failed to import|_ARRAY_API not found|"
                        r"numpy\.dtype size changed|binary incompatibility", re.I)
SERVICE_ENV_FILES = ("/etc/default/molmo-edge", "/etc/default/molmo-edge-watch")
SOURCE_VARS = ("MOLMO_EDGE_SOURCE", "MOLMO_EDGE_ARGS", "MOLMO_EDGE_WATCH_ARGS")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def installed_distributions() -> dict[str, list[str]]:
    """Normalised distribution name -> ["version at location", ...] (a venv over system site-packages sees both)."""
    import importlib.metadata as md
    out: dict[str, list[str]] = {}
    for d in md.distributions():
        try:
            name = _norm(d.metadata["Name"] or "")
            where = str(d.locate_file(""))
        except Exception:  # noqa: BLE001 - a damaged dist-info must not stop doctor
            continue
        entry = f"{d.version} at {where}"
        if name and entry not in out.setdefault(name, []):
            out[name].append(entry)
    return out


def opencv_has_gstreamer(build_info: str) -> bool | None:
    """From cv2.getBuildInformation(): the Video I/O line `GStreamer: YES (1.20.3)` / `NO`; None if absent."""
    m = re.search(r"^\s*GStreamer:\s*(YES|NO)\b", build_info, re.M)
    return None if m is None else m.group(1) == "YES"


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError:   # an unbalanced quote: plain words are good enough to find --source
        return text.split()


def sources_in(text: str) -> list[str]:
    """Camera sources in a service's settings: values of MOLMO_EDGE_SOURCE=... and `--source X` in argument strings."""
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        var, _, value = line.partition("=")
        var = var.strip().removeprefix("export ").strip()
        words = _words(value)
        if var == "MOLMO_EDGE_SOURCE":
            out += words[:1]
        elif var in SOURCE_VARS:
            words = [x for w in words for x in (_words(w) if " " in w else [w])]   # VAR="--a 1 --b 2"
            out += [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--source"]
            out += [w.split("=", 1)[1] for w in words if w.startswith("--source=")]
    return out


def configured_sources(extra: list[str] | None = None, env: dict[str, str] | None = None,
                       files: tuple[str, ...] = SERVICE_ENV_FILES) -> list[str]:
    """Sources given to doctor, in its environment (systemd passes the unit's to ExecStartPre) and in the
    service settings files; only the source values are read."""
    env = os.environ if env is None else env
    found = list(extra or [])
    found += sources_in("\n".join(f"{k}={env[k]}" for k in SOURCE_VARS if k in env))
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as fh:
                found += sources_in(fh.read())
        except OSError:
            pass
    return list(dict.fromkeys(redact(s) for s in found))


def redact(uri: str) -> str:
    """rtsp://user:password@cam/1 -> rtsp://***@cam/1: doctor's output and first-run reports carry no secrets."""
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1***@", uri)


def import_error(module: str) -> tuple[Any, str | None]:
    """(module or None, first line of the import error); stderr noise of a numpy-ABI failure is kept out."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stderr(buf):
            return importlib.import_module(module), None
    except Exception as e:  # noqa: BLE001 - ImportError, AttributeError (_ARRAY_API), ValueError (dtype size)
        said = buf.getvalue()
        msg = f"{type(e).__name__}: {e}"
        if NUMPY_ABI.search(said) and not NUMPY_ABI.search(msg):
            msg += " (" + next((x.strip() for x in said.splitlines() if NUMPY_ABI.search(x)), "") + ")"
        return None, msg[:300]
