"""The watch loop on generated video files and on sources that die mid-stream, in-process and through
`molmo-edge watch` (real subprocesses). The model is the real tiny pointing bundle from test_server."""
import json
import os
import signal
import subprocess
import sys

import cv2
import numpy as np
import pytest

from molmo_edge.runtime.cameras import Source, open_source
from molmo_edge.runtime.serve.watch import OverlayVideo, scene_changed, scene_signature, watch
from test_server import POINT_ANSWER, pointing_bundle  # noqa: F401 (fixture)
from test_cameras import FlakyCamera, _camera_server, _stop


def scenes_video(path, pattern, fps=10, size=(160, 120)):
    """One frame per letter of `pattern`; equal letters are the same scene."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for ch in pattern:
        img = np.full((size[1], size[0], 3), 30, np.uint8)
        k = ord(ch) - ord("a")
        cv2.rectangle(img, (5 + 14 * k, 20), (35 + 14 * k, 90), (0, 200, 255), -1)
        w.write(img)
    w.release()
    return str(path)


@pytest.fixture(scope="module")
def model(pointing_bundle):  # noqa: F811
    from molmo_edge.runtime.session import Molmo
    return Molmo.load(pointing_bundle)


def _ctrl_c_works() -> None:
    # a test run started in the background of a non-interactive shell (`.ci/run &`) ignores SIGINT, and a child
    # Python then never turns Ctrl-C into KeyboardInterrupt: the watch command is started as a terminal would
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def cli(*args, **kw):
    return subprocess.Popen([sys.executable, "-m", "molmo_edge.runtime.cli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            preexec_fn=_ctrl_c_works, **kw)


def test_every_frame_of_a_video_two_prompts_one_vision_pass(model, tmp_path):
    video = scenes_video(tmp_path / "v.mp4", "abcdefgh")
    lines = []
    with open_source(video, realtime=False) as src:
        s = watch(model, src, ["Point to the box.", "How many boxes?"], emit=lines.append, max_new_tokens=16)
    assert s.stopped_by == "end" and s.frames_answered == 8 and s.answers == 16 and s.dropped == 0
    assert [ln["frame"] for ln in lines] == [i // 2 for i in range(16)]
    for i, ln in enumerate(lines):
        assert set(ln) == {"time", "timestamp", "frame", "prompt", "answer", "points", "count", "latency_ms", "dropped", "skipped"}
        assert ln["answer"] == POINT_ANSWER and ln["count"] == 1 and ln["time"].endswith("Z")
        p = ln["points"][0]
        assert (p["x"], p["y"], p["x_pct"], p["y_pct"]) == (pytest.approx(0.61 * 160), pytest.approx(0.42 * 120), 61.0, 42.0)
        lat = ln["latency_ms"]
        assert {"preprocess", "vision", "prefill", "decode", "total", "age"} <= set(lat)
        assert (lat["vision"] > 0) == (i % 2 == 0)  # the second prompt reuses the frame's vision pass
    json.dumps(lines)


def test_on_change_skips_unchanged_scenes(model, tmp_path):
    video = scenes_video(tmp_path / "v.mp4", "aaaaabbbbbaaaa")
    lines = []
    with open_source(video, realtime=False) as src:
        s = watch(model, src, ["What changed?"], on_change=True, emit=lines.append, max_new_tokens=16)
    assert [ln["frame"] for ln in lines] == [0, 5, 10]
    assert [ln["skipped"] for ln in lines] == [0, 4, 4] and s.skipped == 11 and s.frames_read == 14
    a = scene_signature(np.zeros((480, 640, 3), np.uint8))
    noisy = np.clip(np.random.default_rng(0).normal(0, 8, (480, 640, 3)), 0, 255).astype(np.uint8)
    assert not scene_changed(a, scene_signature(noisy), 0.02)  # sensor noise is not a change


def test_every_seconds_and_dropped_frames(model, tmp_path):
    video = scenes_video(tmp_path / "v.mp4", "abcdefgh" * 3, fps=20)  # 24 frames, 1.2 s in real time
    lines = []
    with open_source(video) as src:
        s = watch(model, src, ["Where?"], every=0.5, emit=lines.append, max_new_tokens=16)
    assert 2 <= s.frames_answered <= 4 and s.frames_read + s.dropped == 24
    assert sum(ln["skipped"] + ln["dropped"] for ln in lines) + s.frames_answered <= 24
    ts = [ln["timestamp"] for ln in lines]
    assert all(b - a >= 0.5 for a, b in zip(ts, ts[1:]))


def test_live_source_dies_mid_stream_and_comes_back(model, monkeypatch):
    monkeypatch.setattr("molmo_edge.runtime.cameras._BACKOFF", (0.05, 0.1))
    said, lines = [], []
    cam = FlakyCamera(life=4, down=2)
    with Source(cam.open, "fake://cam", live=True, on_status=said.append) as src:
        s = watch(model, src, ["Where?"], emit=lines.append, max_frames=7, max_new_tokens=16)
    assert s.stopped_by == "max-frames" and s.reconnects >= 1 and s.frames_answered == 7
    assert [ln["frame"] for ln in lines] == sorted({ln["frame"] for ln in lines})
    assert any(m.startswith("lost fake://cam") for m in said) and any("reconnected" in m for m in said)

    cam = FlakyCamera(life=3, down=10**6)
    with Source(cam.open, "fake://cam", live=True, retry_for=0.3, on_status=said.append) as src:
        s = watch(model, src, ["Where?"], emit=lines.append, max_new_tokens=16)
    assert s.stopped_by == "source-failed" and "could not reconnect" in s.error and s.frames_answered >= 1


def test_overlay_video_has_the_points(model, tmp_path):
    video = scenes_video(tmp_path / "v.mp4", "abcab")
    out = str(tmp_path / "overlay.mp4")
    with open_source(video, realtime=False) as src:
        s = watch(model, src, ["Point."], overlay=OverlayVideo(out, fps=5), emit=lambda ln: None, max_new_tokens=16)
    cap = cv2.VideoCapture(out)
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(f)
    assert len(frames) == s.frames_answered == 5
    x, y = round(0.61 * 160), round(0.42 * 120)
    b, g, r = frames[0][y, x].astype(int)
    assert r > 150 and b < 120  # the red marker (the scene there is dark gray)


def test_watch_command_on_a_video_file(pointing_bundle, tmp_path):  # noqa: F811
    video = scenes_video(tmp_path / "v.mp4", "abcdef")
    jsonl, overlay = tmp_path / "out.jsonl", tmp_path / "out.mp4"
    # --loop: the 0.6 s video plays in real time, and a loaded machine may answer fewer than 3 frames in one pass
    p = cli("watch", pointing_bundle, "--source", video, "--loop", "--prompt", "Point to the box.", "--prompt",
            "Count the boxes.", "--jsonl", jsonl, "--overlay", overlay, "--max-frames", "3", "--max-crops", "2")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err
    lines = [json.loads(ln) for ln in jsonl.read_text().splitlines()]
    assert len(lines) == 6 and {ln["prompt"] for ln in lines} == {"Point to the box.", "Count the boxes."}
    assert out == ""  # with --jsonl the lines go to the file only
    summary = json.loads(err.split("summary: ", 1)[1].splitlines()[0])
    assert summary["frames_answered"] == 3 and summary["stopped_by"] == "max-frames"
    assert f"wrote {overlay} (3 frames)" in err and os.path.getsize(overlay) > 0


def test_watch_command_ctrl_c_stops_cleanly_with_a_summary(pointing_bundle, tmp_path):  # noqa: F811
    video = scenes_video(tmp_path / "v.mp4", "abcd")
    p = cli("watch", pointing_bundle, "--source", video, "--loop", "--prompt", "Where?", "--on-change")
    lines = [json.loads(p.stdout.readline()) for _ in range(3)]  # stdout: one JSON line per answer
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0 and "Traceback" not in err, err
    summary = json.loads(err.split("summary: ", 1)[1].splitlines()[0])
    assert summary["stopped_by"] == "interrupt" and summary["frames_answered"] >= 3
    assert all(ln["answer"] == POINT_ANSWER for ln in lines)


def test_watch_command_camera_lost_for_good(pointing_bundle):  # noqa: F811
    """A real MJPEG camera on loopback dies mid-stream; watch says so, retries, then gives up with one line."""
    cam = _camera_server()
    p = cli("watch", pointing_bundle, "--source", f"http://127.0.0.1:{cam.server_address[1]}/video.mjpg",
            "--prompt", "Where?", "--every", "0.2", "--give-up-after", "1.5")
    try:
        first = json.loads(p.stdout.readline())
        assert first["answer"] == POINT_ANSWER
        _stop(cam)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2 and "source: lost http://127.0.0.1" in err and "reconnect attempt" in err
    assert err.strip().splitlines()[-1].startswith("error: lost http://127.0.0.1") and "Traceback" not in err
    assert '"stopped_by": "source-failed"' in err


def test_watch_command_errors(pointing_bundle, tmp_path):  # noqa: F811
    p = cli("watch", pointing_bundle, "--source", "/dev/video97", "--prompt", "x")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and err.startswith("error: no camera at /dev/video97") and len(err.splitlines()) == 1
    p = cli("watch", "/nonexistent-bundle", "--source", scenes_video(tmp_path / "v.mp4", "a"), "--prompt", "x")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "error:" in err and "Traceback" not in err
    p = cli("watch", "b", "--source", "0", "--prompt", "x", "--every", "1", "--on-change")
    _, err = p.communicate(timeout=60)
    assert p.returncode == 2 and "not allowed with argument" in err
