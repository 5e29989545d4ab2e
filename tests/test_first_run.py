"""The first-run report (molmo-edge doctor BUNDLE --verify, jetson/first-run.sh): its dry run through the
shell wrapper, and full runs against the TensorRT/CUDA stand-ins of test_trt_backend (in-process runner):
engines verified and benchmarked next to onnxruntime, and an engine refused by the parity check."""
import json
import os
import shutil
import subprocess
import sys

import pytest
from conftest import export_tiny_bundles

onnx = pytest.importorskip("onnx")

from test_trt_backend import FakeCuda, FakeTrt, _WrongContext  # noqa: E402

from molmo_edge.runtime.device.first_run import STEP_LIMITS, first_run, in_process_runner  # noqa: E402

SCRIPT = os.path.join(os.path.dirname(__file__), "..", "jetson", "first-run.sh")


@pytest.fixture(scope="module")
def source(tiny_checkpoints, tmp_path_factory):
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("fr"), ("molmo-7b-d",), check=False)["molmo-7b-d"]


@pytest.fixture()
def bundle(source, tmp_path):
    folder = str(tmp_path / "b")
    shutil.copytree(source, folder)
    return folder


def test_limits_fit_fifteen_minutes():
    assert sum(STEP_LIMITS.values()) <= 15 * 60


def test_dry_run_through_the_script(bundle, tmp_path):
    out = tmp_path / "report.json"
    r = subprocess.run(["bash", SCRIPT, bundle, "--dry-run", "--out", str(out)], capture_output=True, text=True,
                       env={**os.environ, "MOLMO_EDGE_VENV": sys.prefix})
    assert r.returncode == 0, r.stderr
    rep = json.loads(out.read_text())
    assert rep["format"] == "molmo-edge-first-run" and rep["dry_run"] is True
    names = [s["name"] for s in rep["steps"]]
    assert names[0] == "doctor" and names[-3:] == ["build", "bench onnxruntime", "bench tensorrt"]
    build = next(s for s in rep["steps"] if s["name"] == "build")
    assert build["argv"][:3] == ["molmo-edge", "build", bundle] and all(s["rc"] is None for s in rep["steps"])
    assert "would run: molmo-edge bench" in r.stderr
    r2 = subprocess.run(["bash", SCRIPT], capture_output=True, text=True)
    assert r2.returncode == 2 and "first-run.sh BUNDLE" in r2.stdout


def _stand_ins(monkeypatch, trt):
    import molmo_edge.runtime.backends.trt as trt_mod
    import molmo_edge.runtime.tensorrt.build as build_mod
    for mod in (trt_mod, build_mod):
        monkeypatch.setattr(mod, "import_tensorrt", lambda: trt)
        monkeypatch.setattr(mod, "open_cuda", lambda: trt.cuda)


def test_full_run_with_the_stand_ins(bundle, tmp_path, monkeypatch):
    from molmo_edge.runtime.cli.main import main
    _stand_ins(monkeypatch, FakeTrt(FakeCuda()))
    path, rep = first_run(bundle, str(tmp_path / "r.json"), runner=in_process_runner(main), progress=lambda *_: None)
    assert json.loads(open(path).read()) == json.loads(json.dumps(rep))
    assert [s["name"] for s in rep["steps"]] == ["doctor", "build", "bench onnxruntime", "bench tensorrt"]
    assert rep["steps"][0]["rc"] in (0, 1) and [s["rc"] for s in rep["steps"][1:]] == [0, 0, 0]
    assert rep["machine"]["python"] and rep["findings"]
    b = rep["build"]
    assert b["parity"]["vision"]["ok"] and b["parity"]["decoder"]["ok"] and b["host_memory"]["stages"]
    assert b["key"]["precision"] == "fp16" and "OBEY_PRECISION_CONSTRAINTS" in b["key"]["builder"]["decoder"]["flags"]
    s = rep["summary"]
    assert s["parity"] == "ok" and {"onnxruntime", "tensorrt"} <= set(s)
    for backend in ("onnxruntime", "tensorrt"):
        assert s[backend]["vision_ms_per_frame"] > 0 and s[backend]["decode_tokens_per_s"] > 0
    assert s["tensorrt"]["device"] == "cuda" and s["onnxruntime"]["graphs"]


def test_refused_engine_is_reported_and_onnxruntime_still_benchmarked(bundle, tmp_path, monkeypatch):
    from molmo_edge.runtime.cli.main import main
    trt = FakeTrt(FakeCuda())
    trt.context_class = _WrongContext
    _stand_ins(monkeypatch, trt)
    _, rep = first_run(bundle, str(tmp_path / "r.json"), runner=in_process_runner(main), progress=lambda *_: None)
    build = next(x for x in rep["steps"] if x["name"] == "build")
    assert build["rc"] == 2 and "NOT registered" in build["stderr_tail"]
    assert rep["summary"]["parity"] == "refused: decoder new_key.1"
    assert rep["parity_reports"][-1]["decoder"]["first_failure"]["output"] == "new_key.1"
    assert next(x for x in rep["steps"] if x["name"] == "bench tensorrt")["skipped"]
    assert rep["summary"]["onnxruntime"]["decode_tokens_per_s"] > 0
