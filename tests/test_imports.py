"""`import molmo_edge.runtime` (and everything the runtime CLI path touches) must not import torch."""
import subprocess
import sys


def test_runtime_imports_no_torch():
    code = ("import sys, molmo_edge.runtime, molmo_edge.runtime.cli.main, molmo_edge.runtime.session, "
            "molmo_edge.runtime.preprocess, molmo_edge.runtime.backends.ort; "
            "bad = [m for m in ('torch', 'onnx', 'safetensors', 'transformers') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
