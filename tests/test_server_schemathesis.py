"""Schemathesis (its default checks: server errors, status codes, content types, response schemas,
positive data accepted, negative data rejected, auth, methods...) against a real server on loopback,
bounded to about a minute per run, with and without an API key. Zero failures allowed."""
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'molmo-edge[serve]'")
pytest.importorskip("schemathesis", reason="schemathesis is not installed: pip install schemathesis")
from serve_helpers import make_video, request, serving, shared_pointing_bundle  # noqa: E402

from molmo_edge.runtime.serve.server import Limits  # noqa: E402

TESTS = Path(__file__).resolve().parent
# limits small enough that no valid request can overflow the tiny model's context
LIMITS = Limits(max_prompt_chars=100, max_messages=4, max_prompts=2, max_new_tokens=8, default_new_tokens=8,
                max_crops=1, max_image_pixels=100_000, timeout_s=30, queue_size=8)
SECONDS = int(os.environ.get("MOLMO_SCHEMATHESIS_SECONDS", "50"))


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_pointing_bundle(tmp_path_factory)


def run_schemathesis(base: str, tmp: Path, *extra: str) -> subprocess.CompletedProcess:
    exe = shutil.which("schemathesis") or shutil.which("st")
    cmd = [exe or sys.executable, *([] if exe else ["-m", "schemathesis.cli"]), "run", base + "/openapi.json",
           "--max-time", str(SECONDS), "--workers", "1", "--seed", os.environ.get("MOLMO_SCHEMATHESIS_SEED", "7"), "--max-examples", "30", "--request-timeout", "30",
           "--report", "junit", "--report-dir", str(tmp), *extra]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "schemathesis_hooks",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=SECONDS * 3 + 60, env=env, cwd=tmp)


@pytest.mark.parametrize("key", [None, "st-key;é"])
def test_schemathesis_default_checks_pass(bundle, tmp_path, key):
    from molmo_edge.runtime.cameras import open_source
    src = open_source(make_video(tmp_path / "cam.mp4"), loop=True)
    try:
        with serving(bundle, src, limits=LIMITS, api_key=key) as (base, st):
            t = time.monotonic()
            while src.latest() is None and time.monotonic() - t < 10:
                time.sleep(0.05)
            auth = ["-H", "Authorization: Bearer st-key;\u00e9"] if key else []
            r = run_schemathesis(base, tmp_path, *auth)
            out = r.stdout + r.stderr
            assert r.returncode == 0, out[-6000:]
            assert request(base, "GET", "/healthz")[0] == 200
            assert st.metrics.requests._metrics, "schemathesis sent nothing"
    finally:
        src.close()
