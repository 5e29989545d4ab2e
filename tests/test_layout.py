"""The house rules of docs/architecture.md, enforced: imports point one way, and the library stays lean.

cli -> everything; serve, device, tensorrt, export, calibration, kernels -> the runtime library (and
themselves); the library -> nothing of ours above it. Lazy imports inside functions count too: a
lazy reverse import is still a reverse dependency.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# top folder / sub-package -> room; the package-dir mapping of pyproject.toml in reverse
ROOMS = {"runtime/tensorrt": "tensorrt", "runtime/device": "device", "runtime/serve": "serve", "runtime/cli": "cli",
         "runtime": "library", "export": "export", "calibration": "calibration", "kernels": "kernels"}
ALLOWED = {"library": {"library"}, "cli": set(ROOMS.values())}
for _room in ("tensorrt", "device", "serve", "export", "calibration", "kernels"):
    ALLOWED[_room] = {"library", _room}


def room_of_module(module: str) -> str | None:
    """molmo_edge.runtime.serve.app -> serve; molmo_edge.export.graph -> export; None for others' modules."""
    parts = module.split(".")
    if parts[0] != "molmo_edge" or len(parts) < 2:
        return None
    if parts[1] == "runtime" and len(parts) > 2 and f"runtime/{parts[2]}" in ROOMS:
        return ROOMS[f"runtime/{parts[2]}"]
    return ROOMS.get(parts[1])


def room_of_file(rel: str) -> str:
    for prefix, room in ROOMS.items():  # longest prefixes first (dict order above)
        if rel.startswith(prefix + "/"):
            return room
    raise ValueError(rel)


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in the file, including those inside functions."""
    tree = ast.parse(path.read_text(), str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                raise AssertionError(f"{path}:{node.lineno}: relative import; use molmo_edge.… so rooms are visible")
            out.append((node.lineno, node.module or ""))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names]  # `from pkg import module`
    return out


def violations(root: Path) -> list[str]:
    bad: dict[tuple[str, int], str] = {}
    for prefix in ("runtime", "export", "calibration", "kernels"):
        for path in sorted((root / prefix).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            mine = room_of_file(rel)
            for line, module in imports_of(path):
                theirs = room_of_module(module)
                if theirs and theirs not in ALLOWED[mine]:
                    bad.setdefault((rel, line), f"{rel}:{line}: {mine} imports {module} ({theirs})")
    return sorted(bad.values())


def test_imports_point_one_way():
    assert violations(REPO) == []


def test_the_rule_catches_a_reverse_import(tmp_path):
    """A copy of the tree with one planted reverse import (the library reaching up into the CLI) fails."""
    import shutil
    for prefix in ("runtime", "export", "calibration", "kernels"):
        shutil.copytree(REPO / prefix, tmp_path / prefix, ignore=shutil.ignore_patterns("__pycache__", "*.json", "*.cu*",
                                                                                         "*.h", "*.html"))
    session = tmp_path / "runtime" / "session.py"
    session.write_text(session.read_text() + "\n\ndef _planted():\n    from molmo_edge.runtime.cli.main import main\n")
    calib = tmp_path / "calibration" / "frames.py"
    calib.write_text(calib.read_text() + "\nimport molmo_edge.export.graph\n")
    found = violations(tmp_path)
    assert any(v.startswith("runtime/session.py") and "library imports molmo_edge.runtime.cli.main" in v for v in found)
    assert any(v.startswith("calibration/frames.py") and "(export)" in v for v in found)
    assert len(found) == 2, found


def test_library_imports_nothing_heavy():
    """Every module of the library (and the CLI, TensorRT and device modules, whose heavy imports are lazy) imports
    no torch, onnx, TensorRT or CUDA bindings at import time."""
    mods = ["molmo_edge.runtime.cli.main", "molmo_edge.runtime.tensorrt.check", "molmo_edge.runtime.tensorrt.build",
            "molmo_edge.runtime.device.doctor", "molmo_edge.runtime.device.plan", "molmo_edge.runtime.device.bench"]
    mods += sorted("molmo_edge.runtime." + p.relative_to(REPO / "runtime").with_suffix("").as_posix().replace("/", ".")
                  for p in (REPO / "runtime").rglob("*.py")
                  if room_of_file(p.relative_to(REPO).as_posix()) == "library" and p.name != "__init__.py")
    code = ("import sys, importlib\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "bad = [m for m in ('torch', 'onnx', 'tensorrt', 'cuda', 'pycuda', 'cupy', 'transformers', 'safetensors')"
            " if m in sys.modules]\n"
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
