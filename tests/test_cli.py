"""The CLI as users and the golden-check tool drive it (real subprocesses)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import GOLDEN, golden_or_skip

BIN = Path(sys.executable).parent


def cli(*args, check=True):
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    r = subprocess.run([sys.executable, "-m", "molmo_edge.runtime.cli", *map(str, args)], capture_output=True, text=True, env=env)
    if check and r.returncode != 0:
        raise AssertionError(f"exit {r.returncode}: {r.stderr}")
    return r


def _golden_check(model, backend=None):
    golden_or_skip()
    tool = GOLDEN.parent / "tools" / "golden-check"
    if not tool.exists():
        pytest.skip(f"{tool} not found")
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    cmd = [sys.executable, str(tool), str(model)] + (["--backend", backend] if backend else [])
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "all checks pass" in r.stdout, r.stdout + r.stderr


def test_help_teaches():
    out = cli("--help").stdout
    for word in ("preprocess", "forward", "ask", "export", "demo", "examples"):
        assert word in out
    assert "--max-crops" in cli("preprocess", "--help").stdout


def test_golden_through_cli_torch():
    pytest.importorskip("torch")
    _golden_check(GOLDEN / "molmoe-tiny")


def test_golden_through_cli_bundle(tmp_path):
    pytest.importorskip("torch")
    golden_or_skip()
    out = cli("export", GOLDEN / "molmoe-tiny", "-o", tmp_path / "b").stdout.strip()
    assert out == str((tmp_path / "b").resolve())
    _golden_check(tmp_path / "b", "onnxruntime")


def test_ask_bundle_json_points_overlay(tiny_checkpoints, tmp_path):
    cli("export", tiny_checkpoints["molmoe-1b"], "-o", tmp_path / "b")
    img = tmp_path / "img.png"
    import cv2
    cv2.imwrite(str(img), np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8))
    r = cli("ask", tmp_path / "b", "--image", img, "--prompt", "Point to the cup", "--prompt", "Count the cups",
            "--max-new-tokens", "5", "--json", "--overlay", tmp_path / "o.jpg")
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2
    for d in lines:
        assert {"text", "token_ids", "points", "count", "timings"} <= set(d)
        assert {"preprocess", "vision", "prefill", "decode"} <= set(d["timings"])
        assert len(d["token_ids"]) <= 5
    assert lines[1]["timings"]["vision"] == 0.0  # second question reuses the vision pass
    assert (tmp_path / "o.jpg").stat().st_size > 0
    # preprocess and forward accept the bundle too
    cli("preprocess", tmp_path / "b", "--image", img, "--prompt", "hi", "-o", tmp_path / "p.npz")
    cli("forward", tmp_path / "b", "--inputs", tmp_path / "p.npz", "-o", tmp_path / "f.npz")
    f = np.load(tmp_path / "f.npz")
    assert f["logits"].shape[0] == np.load(tmp_path / "p.npz")["input_ids"].shape[0]
    assert f["image_features"].ndim == 3


@pytest.mark.parametrize("args,msg", [
    (["ask", "{ck}", "hi", "--image", "{tmp}/missing.jpg"], "missing.jpg"),
    (["ask", "{ck}", "hi", "--image", "{tmp}/corrupt.jpg"], "corrupt.jpg"),
    (["forward", "{ck}", "--inputs", "{tmp}/none.npz", "-o", "{tmp}/x.npz"], "molmo-edge preprocess"),
    (["ask", "{ck}", "hi", "--backend", "onnxruntime"], "molmo-edge export"),
    (["ask", "{tmp}/nowhere", "hi"], "neither a folder nor"),
    (["preprocess", "{ck}", "--prompt", "x", "--max-crops", "0", "-o", "{tmp}/x.npz"], "--max-crops"),
])
def test_errors_are_one_clear_line(tiny_checkpoints, tmp_path, args, msg):
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    args = [a.format(ck=tiny_checkpoints["molmo-7b-d"], tmp=tmp_path) for a in args]
    r = cli(*args, check=False)
    assert r.returncode == 2, r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert msg in last and "Traceback" not in r.stderr


def test_demo_runs_end_to_end(tmp_path):
    pytest.importorskip("torch")
    r = cli("demo", "--workdir", tmp_path, "--max-new-tokens", "4")
    lines = [json.loads(x) for x in r.stdout.strip().splitlines()]
    assert len(lines) == 2 and all(d["untrained_random_weights"] for d in lines)
    assert "UNTRAINED" in r.stderr
    assert (tmp_path / "overlay.jpg").exists() and (tmp_path / "bundle" / "manifest.json").exists()
