"""Sources by URI: generated video files and image folders, a real MJPEG stream over loopback that
dies and comes back, a fake live source that dies mid-stream, and one-line errors for the rest."""
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import cv2
import numpy as np
import pytest

from molmo_edge.runtime.cameras import Source, SourceEnded, SourceError, _Reader, open_source


def make_video(path, n=30, fps=20, size=(160, 120)):
    """Frame i is filled with gray level 8*i (so a decoded frame tells which one it was)."""
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    assert w.isOpened()
    for i in range(n):
        w.write(np.full((size[1], size[0], 3), min(255, 8 * i), np.uint8))
    w.release()
    return str(path)


def test_video_file_lossless_and_realtime(tmp_path):
    video = make_video(tmp_path / "clip.mp4", n=30, fps=20)
    with open_source(video, realtime=False) as src:
        frames = list(src)
    assert [f.id for f in frames] == list(range(30)) and src.dropped == 0
    assert frames[0].rgb.shape == (120, 160, 3) and frames[0].rgb.dtype == np.uint8
    levels = [int(f.rgb.mean()) for f in frames]
    assert levels == sorted(levels) and abs(levels[-1] - 8 * 29) < 6
    assert all(b.timestamp >= a.timestamp for a, b in zip(frames, frames[1:]))
    frame_id, rgb, ts = frames[3]  # a Frame unpacks as (id, rgb, timestamp)
    assert frame_id == 3 and abs(ts - time.time()) < 30

    # realtime: paced at the file's 20 fps, ~1.5 s; a reader that keeps up misses nothing, and playback
    # starts at the first read, not at open (a model may load in between)
    with open_source(video) as src:
        time.sleep(0.5)
        assert src.frames == 0 and src.latest() is None
        t = time.monotonic()
        n = sum(1 for _ in src)
    assert 1.2 < time.monotonic() - t < 4 and n == 30 and src.fps == 20


def test_slow_reader_gets_newest_frame_not_a_backlog(tmp_path):
    video = make_video(tmp_path / "clip.mp4", n=40, fps=40)
    with open_source(video) as src:
        seen = []
        for f in src:
            seen.append(f)
            assert time.time() - f.timestamp < 0.3  # fresh (a backlog would age ~0.1 s per read)
            time.sleep(0.12)                          # a slow model: ~5 frames arrive per read
    assert len(seen) < 20 and src.dropped == 40 - len(seen)
    assert seen[-1].id == 39


def test_loop_and_read_timeout(tmp_path):
    video = make_video(tmp_path / "clip.mp4", n=5, fps=50)
    with open_source(video, loop=True, realtime=False) as src:
        ids = [src.read(timeout=5).id for _ in range(12)]
    assert ids == list(range(12))  # past the 5th frame: the file started again

    class Never(_Reader):
        def read(self):
            time.sleep(0.05)
            return None
    Source(Never, "unused", live=True).close()  # closing a source that never started
    src = Source(Never, "silent", live=True, on_status=lambda m: None)
    with pytest.raises(TimeoutError, match="no new frame from silent"):
        src.read(timeout=0.2)
    t = time.monotonic()
    src.close()
    assert time.monotonic() - t < 2.5


def test_image_folder_glob_and_single_image(tmp_path):
    folder = tmp_path / "shots"
    folder.mkdir()
    for i in (1, 2, 10):  # natural order: 2 before 10
        cv2.imwrite(str(folder / f"frame{i}.png"), np.full((20, 30, 3), i, np.uint8))
    (folder / "frame5.png").write_bytes(b"not a png")
    (folder / "notes.txt").write_text("ignored")
    said = []
    with open_source(str(folder), on_status=said.append) as src:
        assert [int(f.rgb[0, 0, 0]) for f in src] == [1, 2, 10]
    assert any("skipping" in m and "frame5.png" in m for m in said)
    with open_source(str(folder / "frame1*.png")) as src:
        assert [int(f.rgb[0, 0, 0]) for f in src] == [1, 10]
    with open_source(f"file://{folder}/frame2.png") as src:
        assert [f.rgb.shape for f in src] == [(20, 30, 3)]


def test_clear_errors(tmp_path):
    cases = {
        "/dev/video97": "no camera at /dev/video97",
        "97": "no camera at /dev/video97",
        str(tmp_path / "missing.mp4"): "not found",
        "ftp://host/x": "unsupported source",
        "csi://front": "csi://N",
        "": "empty source",
    }
    empty = tmp_path / "empty"
    empty.mkdir()
    cases[str(empty)] = "holds no images"
    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00" * 1000)
    cases[str(bad)] = "not a video OpenCV can decode"
    if "GStreamer:                   NO" in cv2.getBuildInformation():
        cases["csi://0"] = "needs OpenCV built with GStreamer"
    for uri, msg in cases.items():
        with pytest.raises(SourceError, match=msg) as e:
            open_source(uri)
        assert "\n" not in str(e.value)
    with pytest.raises(SourceError) as e:  # nothing listens on port 9: refused at once, password hidden
        open_source("rtsp://admin:hunter2@127.0.0.1:9/stream")
    assert "hunter2" not in str(e.value) and "admin:***@" in str(e.value)


class FlakyCamera:
    """A fake live source: `life` frames per connection, then the device vanishes for `down` reopen attempts."""

    def __init__(self, life=5, down=2):
        self.life, self.down, self.opens, self.failed = life, down, 0, 0

    def open(self):
        if self.opens and self.failed < self.down:
            self.failed += 1
            raise SourceError("camera unplugged")
        self.opens += 1
        cam, left = self, self.life

        class R(_Reader):
            def read(self):
                nonlocal left
                time.sleep(0.01)
                left -= 1
                return np.full((8, 8, 3), cam.opens, np.uint8) if left >= 0 else None
        return R()


def test_live_source_reconnects_with_backoff_and_says_so(monkeypatch):
    monkeypatch.setattr("molmo_edge.runtime.cameras._BACKOFF", (0.05, 0.2))
    said = []
    cam = FlakyCamera(life=5, down=2)
    with Source(cam.open, "fake://cam", live=True, on_status=said.append) as src:
        seen = [src.read(timeout=5) for _ in range(8)]
        assert src.reconnects == 1 and src.status == "running"
    assert [int(f.rgb[0, 0, 0]) for f in seen] == [1] * 5 + [2] * 3  # frames from the second connection follow
    assert [f.id for f in seen] == list(range(8))
    assert said[0].startswith("lost fake://cam") and "attempt 1 failed" in said[1] and "reconnected" in said[-1]


def test_live_source_given_up_raises(monkeypatch):
    monkeypatch.setattr("molmo_edge.runtime.cameras._BACKOFF", (0.05, 0.1))
    cam = FlakyCamera(life=2, down=10**6)
    src = Source(cam.open, "fake://cam", live=True, retry_for=0.4, on_status=lambda m: None)
    assert [src.read(timeout=5).id for _ in range(2)] == [0, 1]
    with pytest.raises(SourceError, match="lost fake://cam and could not reconnect"):
        src.read(timeout=5)
    assert src.status == "failed"
    src.close()


class _MJPEG(BaseHTTPRequestHandler):
    """An IP camera's MJPEG stream (multipart/x-mixed-replace) at ~25 fps."""

    def log_message(self, *a):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "multipart/x-mixed-replace; boundary=frame")
        self.end_headers()
        i = 0
        try:
            while not self.server.dead:
                ok, buf = cv2.imencode(".jpg", np.full((48, 64, 3), (i * 10) % 250, np.uint8))
                self.wfile.write(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n%s\r\n" % (len(buf), buf.tobytes()))
                i += 1
                time.sleep(0.04)
        except OSError:
            pass


def _camera_server(port=0):
    srv = ThreadingHTTPServer(("127.0.0.1", port), _MJPEG)
    srv.dead, srv.daemon_threads = False, True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def _stop(srv):
    srv.dead = True
    srv.shutdown()
    srv.server_close()


def test_mjpeg_stream_dies_and_comes_back(monkeypatch):
    """The real FFmpeg path: an HTTP camera on loopback stops mid-stream, then returns on the same port."""
    monkeypatch.setattr("molmo_edge.runtime.cameras._BACKOFF", (0.2, 0.4))
    srv = _camera_server()
    port = srv.server_address[1]
    said = []
    src = open_source(f"http://127.0.0.1:{port}/video.mjpg", on_status=said.append)
    try:
        first = src.read(timeout=10)
        assert first.rgb.shape == (48, 64, 3)
        _stop(srv)
        deadline = time.monotonic() + 10
        while src.status != "reconnecting" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert src.status == "reconnecting" and said[0].startswith("lost http://127.0.0.1")
        before = src.frames
        srv = _camera_server(port)
        f = src.read(timeout=15)
        while f.id < before:
            f = src.read(timeout=15)
        assert src.reconnects == 1 and src.status == "running" and any("reconnected" in m for m in said)
    finally:
        src.close()
        _stop(srv)


def test_gstreamer_pipeline_when_available():
    if "GStreamer:                   NO" in cv2.getBuildInformation():
        pytest.skip("this OpenCV has no GStreamer (pip's opencv-python-headless); Jetson's python3-opencv does")
    with open_source("gst:videotestsrc num-buffers=5 ! video/x-raw,width=64,height=48") as src:
        assert [f.rgb.shape for f in src][:1] == [(48, 64, 3)]


def test_source_in_os_environment_untouched_for_files(tmp_path):
    """Only rtsp:// sets FFmpeg's capture options (TCP); files and folders leave the environment alone."""
    before = os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS")
    with open_source(make_video(tmp_path / "c.mp4", n=2), realtime=False) as src:
        list(src)
    assert os.environ.get("OPENCV_FFMPEG_CAPTURE_OPTIONS") == before
    with pytest.raises(SourceEnded):
        src.read(timeout=1)


def test_clip_keeps_the_last_seconds_at_a_bounded_rate(tmp_path):
    """A 20 fps video played in real time with history=1 s at 5 fps: the clip holds about the last second,
    thinned to <= 5 fps, oldest first, with capture times as timestamps."""
    from molmo_edge.runtime.cameras import clip_arrays
    path = make_video(str(tmp_path / "v.avi"), n=60, fps=20)
    with open_source(path, history=1.0, history_fps=5.0) as src:
        frames = []
        for f in src:
            frames.append(f)
            if len(frames) == 40:   # ~2 s of video: the history must have dropped the first second
                break
        clip = src.clip()
        short = src.clip(0.5)
    assert 4 <= len(clip) <= 6, [f.id for f in clip]
    assert clip[0].id > 10 and clip[-1].id >= 35
    times = [f.timestamp for f in clip]
    assert times == sorted(times) and min(b - a for a, b in zip(times, times[1:])) >= 0.2 - 1e-6
    assert 0 < len(short) < len(clip) and short[-1].id == clip[-1].id
    arr, ts = clip_arrays(clip)
    assert arr.shape == (len(clip), 120, 160, 3) and arr.dtype == np.uint8 and ts[0] == 0 and np.all(np.diff(ts) > 0)


def test_clip_needs_history(tmp_path):
    from molmo_edge.runtime.cameras import clip_arrays
    path = make_video(str(tmp_path / "v.avi"), n=5)
    with open_source(path) as src:
        with pytest.raises(SourceError, match="history=SECONDS"):
            src.clip(1.0)
    with pytest.raises(SourceError, match="clip is empty"):
        clip_arrays([])
    with pytest.raises(SourceError, match="must be positive"):
        open_source(path, history=-1)
