"""The device-dependent dependencies (onnxruntime, OpenCV) and the one message for a missing one.

They are extras, not core dependencies (pyproject.toml), because their flavour depends on the device:
`onnxruntime` vs `onnxruntime-gpu` are different distributions that install the same `onnxruntime/`
package, and a pip `opencv-python-headless` shadows a system OpenCV built with GStreamer (Jetson CSI
cameras). A plain `pip install -e .` therefore never replaces what JetPack provides; a missing one is
one clear error naming the extra to install.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from molmo_edge.runtime.errors import MolmoEdgeError

# import name -> what provides it, per device
PROVIDERS = {
    "onnxruntime": "onnxruntime",
    "cv2": "OpenCV",
}
INSTALL_HINT = ("on a PC `pip install 'molmo-edge[cpu]'`, with an NVIDIA GPU (x86) `pip install 'molmo-edge[gpu]'`, "
                "on a Jetson `jetson/setup.sh` (JetPack's onnxruntime-gpu and system OpenCV, extra [jetson])")


class MissingDependency(MolmoEdgeError):
    """onnxruntime or OpenCV is not installed (they are extras: [cpu], [gpu] or [jetson])."""


def missing_message(module: str, detail: str = "") -> str:
    what = PROVIDERS.get(module, module)
    why = f" ({detail})" if detail else ""
    return f"{what} is not installed{why}: {INSTALL_HINT}"


def require(module: str) -> ModuleType:
    """Import onnxruntime or cv2, or raise MissingDependency with the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingDependency(missing_message(module, str(e).splitlines()[0][:160] if str(e) else "")) from None


def as_missing(e: BaseException) -> MissingDependency | None:
    """The clear error for an ImportError of onnxruntime/cv2 raised anywhere below (None for others)."""
    name = getattr(e, "name", None) or ""
    root = name.split(".")[0]
    if isinstance(e, ImportError) and root in PROVIDERS:
        return MissingDependency(missing_message(root))
    return None
