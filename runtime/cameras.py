"""Camera and video sources named by one URI, read by a capture thread that keeps only the newest frame.

    from molmo_edge.runtime.cameras import open_source
    with open_source("/dev/video0") as cam:          # or 0, csi://0, rtsp://..., clip.mp4, frames/, "shots/*.jpg"
        for frame in cam:                              # Frame(id, rgb, timestamp); unpacks as a tuple
            save(frame.rgb)                            # HxWx3 uint8 RGB
        print(cam.dropped, "frames were replaced before anyone read them")

URIs (as in jetson-inference's videoSource):
  `0`, `/dev/video0`        V4L2 camera
  `csi://0`                 Jetson CSI camera (nvarguscamerasrc through GStreamer; needs OpenCV with GStreamer)
  `rtsp://…`, `http(s)://…` network stream (FFmpeg), e.g. an MJPEG `…/video.mjpg`
  `gst:<pipeline>`          any GStreamer pipeline ending in appsink (one is appended if missing)
  `clip.mp4`, `file://…`    video file (played at its own frame rate; `loop=True` to repeat)
  `frames/`, `"shots/*.jpg"`, `photo.png`  a folder, glob or single image (every image, in name order)

The source is opened at once (a missing camera is an error right there); capture begins at the first
`read()`/`latest()` or `start()`. Why a thread: a camera delivers frames whether or not the model is ready. The thread reads them
all and keeps only the newest, so a slow consumer sees fresh frames instead of a growing backlog;
`dropped` counts the frames it replaced unread. A live source that fails is closed and reopened
with back-off (0.5 s doubling to 8 s), and says so through `on_status`. Files and image folders end
instead (`SourceEnded`); image folders are delivered losslessly (the thread waits for the reader)
unless `realtime=True`.
"""
from __future__ import annotations

import collections
import glob
import logging
import os
import re
import threading
import time
from typing import Callable, Iterator, NamedTuple

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError

__all__ = ["Frame", "Source", "SourceError", "SourceEnded", "open_source", "clip_arrays", "IMAGE_EXTENSIONS"]

log = logging.getLogger("molmo_edge.sources")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_BACKOFF = (0.5, 8.0)                 # first and largest wait between reconnect attempts, seconds
_NET_TIMEOUT_MS = 5000                # FFmpeg open/read timeout: a dead stream must not block the thread forever


class SourceError(MolmoEdgeError):
    """A source cannot be opened or was lost for good; the message names the source and the fix."""


class SourceEnded(Exception):
    """A finite source (video file, image folder) has delivered its last frame."""


class Frame(NamedTuple):
    id: int               # 0, 1, 2, ... in capture order (continues across reconnects)
    rgb: np.ndarray       # HxWx3 uint8 RGB, contiguous
    timestamp: float      # time.time() when it was captured


def clip_arrays(frames: list[Frame]) -> tuple[np.ndarray, np.ndarray]:
    """(frames uint8 [T, H, W, 3], seconds since the first frame [T] float64): a clip as a video model takes it,
    with the capture times as its timestamps (a camera's real rate, not a nominal fps)."""
    if not frames:
        raise SourceError("the clip is empty: no frame was captured yet; wait for the camera or lengthen --clip")
    t0 = frames[0].timestamp
    return np.stack([f.rgb for f in frames]), np.array([f.timestamp - t0 for f in frames], np.float64)


class _Reader:
    """One open connection to a source: `read()` returns an RGB frame, or None when it has no more."""
    fps: float = 0.0

    def read(self) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class _CvReader(_Reader):
    def __init__(self, cap) -> None:
        import cv2
        self.cap = cap
        self.fps = float(cap.get(cv2.CAP_PROP_FPS) or 0.0)

    def read(self) -> np.ndarray | None:
        from molmo_edge.runtime.preprocess import load_image
        ok, frame = self.cap.read()
        if not ok or frame is None or frame.size == 0:
            return None
        return load_image(frame, bgr=True)  # BGR/BGRA/gray/16-bit -> contiguous RGB uint8

    def close(self) -> None:
        self.cap.release()


class _ImageListReader(_Reader):
    def __init__(self, paths: list[str], on_status: Callable[[str], None]) -> None:
        self.paths, self.i, self.on_status = paths, 0, on_status

    def read(self) -> np.ndarray | None:
        from molmo_edge.runtime.preprocess import ImageError, load_image
        while self.i < len(self.paths):
            path = self.paths[self.i]
            self.i += 1
            try:
                return load_image(path)
            except ImageError as e:  # one bad file should not end a data set
                self.on_status(f"skipping {path}: {e}")
        return None


class Source:
    """Frames from one camera, stream, file or image folder, captured on a background thread.

    `read(timeout)` waits for a frame newer than the last one it returned; `latest()` peeks at the
    newest frame without waiting. Iterating yields frames until the source ends. Counters:
    `frames` (captured), `dropped` (replaced before being read), `reconnects`.

    With `history=S` the thread also keeps the last S seconds of frames, at most `history_fps` a
    second (a video model samples a clip at a few fps; keeping every 30 fps frame would only cost
    memory), and `clip(seconds)` returns them: "how many people walked in in the last ten seconds".
    """

    def __init__(self, open_reader: Callable[[], _Reader], name: str, *, live: bool, realtime: bool = True,
                 loop: bool = False, fps: float | None = None, retry_for: float | None = None,
                 on_status: Callable[[str], None] | None = None, history: float = 0.0,
                 history_fps: float = 4.0) -> None:
        if history < 0 or history_fps <= 0:
            raise SourceError(f"history {history} s at {history_fps} fps: both must be positive (e.g. --clip 10)")
        self.history, self.history_fps = float(history), float(history_fps)
        self._history: collections.deque[Frame] = collections.deque()
        self.name, self.live, self.loop = name, live, loop
        self.realtime = realtime or live
        self.retry_for = retry_for
        self._open = open_reader
        self._on_status = on_status or log.warning
        self.frames = self.dropped = self.reconnects = 0
        self.status = "running"          # running | reconnecting | ended | failed
        self.error: str | None = None
        self._cond = threading.Condition()
        self._newest: Frame | None = None
        self._last_read = -1
        self._stop = threading.Event()
        self._reader: _Reader | None = open_reader()  # opened here: a missing device fails at once, in the caller
        self.fps = float(fps or self._reader.fps or 30.0)  # pace of a realtime file/folder (a camera paces itself)
        self._thread = threading.Thread(target=self._run, name=f"source {name}", daemon=True)
        self._start_lock = threading.Lock()

    def start(self) -> "Source":
        """Begin capturing (the first read() or latest() does it too): a file opened before a slow model
        load then still plays from its first frame."""
        with self._start_lock:
            if self._reader is not None and not self._thread.is_alive() and self.status == "running":
                self._thread.start()
        return self

    # --- consumer side -------------------------------------------------------------------------
    def read(self, timeout: float | None = None) -> Frame:
        """The next frame newer than the last one read. Raises TimeoutError after `timeout` seconds,
        SourceEnded when a file/folder is finished, SourceError when a live source was given up."""
        self.start()
        with self._cond:
            if not self._cond.wait_for(lambda: self._has_new() or self.status in ("ended", "failed"), timeout):
                raise TimeoutError(f"no new frame from {self.name} within {timeout:g} s")
            if self._has_new():
                f = self._newest
                self._last_read = f.id
                self._cond.notify_all()  # a lossless producer waits for this
                return f
            if self.status == "failed":
                raise SourceError(self.error or f"{self.name} failed")
            raise SourceEnded(f"{self.name} ended after {self.frames} frames")

    def latest(self) -> Frame | None:
        """The newest captured frame (read or not), or None before the first one."""
        self.start()
        return self._newest

    def clip(self, seconds: float | None = None) -> list[Frame]:
        """The kept frames of the last `seconds` (default: all the history), oldest first, all of the newest
        frame's size (a reconnect may change the mode). Empty before the first frame."""
        if not self.history:
            raise SourceError(f"{self.name} keeps no history: open it with history=SECONDS (watch --clip SECONDS)")
        self.start()
        with self._cond:
            kept = list(self._history)
        if not kept:
            return []
        newest = kept[-1]
        since = newest.timestamp - (self.history if seconds is None else float(seconds))
        return [f for f in kept if f.timestamp >= since and f.rgb.shape == newest.rgb.shape]

    def __iter__(self) -> Iterator[Frame]:
        while True:
            try:
                yield self.read(timeout=None)
            except SourceEnded:
                return

    def close(self) -> None:
        self._stop.set()
        with self._start_lock:
            if not self._thread.is_alive() and self._reader is not None:  # never started
                self._reader.close()
                self._reader = None
                self._finish("ended", None)
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)  # a blocked device read may outlive this; the thread is a daemon

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Source {self.name} {self.status} frames={self.frames} dropped={self.dropped}>"

    def _has_new(self) -> bool:
        return self._newest is not None and self._newest.id > self._last_read

    # --- capture thread ------------------------------------------------------------------------
    def _run(self) -> None:
        reader, self._reader = self._reader, None
        start, n = time.monotonic(), 0
        try:
            while reader is not None and not self._stop.is_set():
                try:
                    rgb = reader.read()
                except Exception as e:  # a driver or decoder error is a lost frame, not a dead thread
                    self._say(f"{self.name}: read failed ({type(e).__name__}: {e})")
                    rgb = None
                if rgb is None:
                    reader.close()
                    if self.live:
                        reader = self._reconnect()
                    elif self.loop and n > 0:
                        reader, start, n = self._open(), time.monotonic(), 0
                    else:
                        reader = None
                    continue
                if self.realtime and not self.live:  # a file plays at its own speed, like a camera would
                    if self._stop.wait(max(0.0, start + n / self.fps - time.monotonic())):
                        break
                n += 1
                self._publish(rgb)
        except Exception as e:  # reopening a looping file failed, etc.
            self._finish("failed", f"{self.name} stopped: {e}")
            return
        finally:
            if reader is not None:
                reader.close()
        if self.status != "failed":
            self._finish("ended", None)

    def _publish(self, rgb: np.ndarray) -> None:
        with self._cond:
            if not self.realtime:  # lossless: wait until the previous frame was read
                self._cond.wait_for(lambda: not self._has_new() or self._stop.is_set())
            elif self._has_new():
                self.dropped += 1
            self._newest = Frame(self.frames, rgb, time.time())
            self.frames += 1
            if self.history:
                self._keep(self._newest)
            self._cond.notify_all()

    def _keep(self, frame: Frame) -> None:
        """Add to the clip history (called with the lock held): at most history_fps, at most history seconds."""
        h = self._history
        if h and frame.timestamp - h[-1].timestamp < 1.0 / self.history_fps:
            return
        h.append(frame)
        while h and h[0].timestamp < frame.timestamp - self.history:
            h.popleft()

    def _finish(self, status: str, error: str | None) -> None:
        with self._cond:
            self.status, self.error = status, error
            self._cond.notify_all()

    def _say(self, msg: str) -> None:
        try:
            self._on_status(msg)
        except Exception:  # a broken callback must not kill capture
            log.exception("on_status callback failed")

    def _reconnect(self) -> _Reader | None:
        """Reopen with back-off until it works, the source is closed, or `retry_for` seconds pass."""
        self.status = "reconnecting"
        lost, delay, tries = time.monotonic(), _BACKOFF[0], 0
        self._say(f"lost {self.name}; reconnecting (next try in {delay:g} s)")
        while not self._stop.wait(delay):
            tries += 1
            try:
                reader = self._open()
            except Exception as e:
                waited = time.monotonic() - lost
                if self.retry_for is not None and waited + delay >= self.retry_for:
                    self._finish("failed", f"lost {self.name} and could not reconnect for {waited:.0f} s ({e}); "
                                           "check the camera, cable or network and start again")
                    self._say(self.error)
                    return None
                delay = min(delay * 2, _BACKOFF[1])
                self._say(f"{self.name}: reconnect attempt {tries} failed; next try in {delay:g} s")
                continue
            self.reconnects += 1
            self.status = "running"
            self._say(f"reconnected to {self.name} after {time.monotonic() - lost:.1f} s ({tries} attempts)")
            return reader
        return None


# --- URIs ----------------------------------------------------------------------------------------

def _redact(uri: str) -> str:
    """The URI without a password, for messages and logs."""
    return re.sub(r"(//[^/:@]+):[^/@]*@", r"\1:***@", uri)


def _has_gstreamer() -> bool:
    import cv2
    return bool(re.search(r"GStreamer:\s+YES", cv2.getBuildInformation()))


def _cv_opener(target, api: int, name: str, hint: str, params: tuple[int, ...] = (),
               props: tuple[tuple[int, float], ...] = ()) -> Callable[[], _Reader]:
    def opener() -> _Reader:
        import cv2
        cap = cv2.VideoCapture(target, api, list(params)) if params else cv2.VideoCapture(target, api)
        if not cap.isOpened():
            cap.release()
            raise SourceError(f"cannot open {name}: {hint}")
        for prop, value in props:
            cap.set(prop, value)
        return _CvReader(cap)
    return opener


def _v4l2(device: str, width: int | None, height: int | None, fps: float | None) -> Callable[[], _Reader]:
    import cv2
    if not os.path.exists(device):
        present = sorted(glob.glob("/dev/video*"))
        raise SourceError(f"no camera at {device}; " + (f"cameras present: {', '.join(present)}" if present else
                          "no /dev/video* devices at all: plug a camera in (in a container, pass --device /dev/video0)"))
    props = [(cv2.CAP_PROP_BUFFERSIZE, 1)]  # the driver's own queue is latency too
    props += [(p, v) for p, v in ((cv2.CAP_PROP_FRAME_WIDTH, width), (cv2.CAP_PROP_FRAME_HEIGHT, height),
                                  (cv2.CAP_PROP_FPS, fps)) if v]
    return _cv_opener(device, cv2.CAP_V4L2, device, "it exists but does not deliver video (busy in another "
                      "program, or not a capture node: try the next /dev/videoN)", props=tuple(props))


def _gstreamer(pipeline: str, name: str) -> Callable[[], _Reader]:
    import cv2
    if not _has_gstreamer():
        raise SourceError(f"{name} needs OpenCV built with GStreamer, and this one is not (pip's opencv-python is "
                          "not); on Jetson use JetPack's python3-opencv, e.g. a venv made with --system-site-packages")
    if "appsink" not in pipeline:
        pipeline += " ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true max-buffers=1 sync=false"
    return _cv_opener(pipeline, cv2.CAP_GSTREAMER, name, "the GStreamer pipeline did not start; run it with "
                      "gst-launch-1.0 (ending in fakesink) to see why")


def _csi_pipeline(sensor: int, width: int | None, height: int | None, fps: float | None) -> str:
    w, h, f = width or 1280, height or 720, int(fps or 30)
    return (f"nvarguscamerasrc sensor-id={sensor} ! video/x-raw(memory:NVMM),width={w},height={h},framerate={f}/1 ! "
            "nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! "
            "appsink drop=true max-buffers=1 sync=false")


def _image_paths(uri: str) -> list[str] | None:
    """The images a folder, glob or image path names (None if `uri` is none of those)."""
    if os.path.isdir(uri):
        paths = [os.path.join(uri, f) for f in os.listdir(uri)]
    elif any(c in uri for c in "*?["):
        paths = glob.glob(uri)
    elif os.path.isfile(uri) and uri.lower().endswith(IMAGE_EXTENSIONS):
        return [uri]
    else:
        return None
    natural = lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p)]  # noqa: E731 (frame2 < frame10)
    return sorted((p for p in paths if p.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(p)), key=natural)


def open_source(uri: str | int, *, loop: bool = False, realtime: bool | None = None, fps: float | None = None,
                width: int | None = None, height: int | None = None, retry_for: float | None = None,
                on_status: Callable[[str], None] | None = None, history: float = 0.0,
                history_fps: float = 4.0) -> Source:
    """Open the camera, stream, file or image folder that `uri` names (see the module doc) and start capturing.

    loop: start a file/folder again at its end. realtime: pace a file/folder like a camera, at `fps` or
    the file's own rate, dropping what the reader misses (default: on for video files; off for image
    folders, which are then delivered without loss).
    width/height/fps: requested capture mode of V4L2 and CSI cameras. retry_for: give a lost live
    source up after this many seconds (default: keep trying). on_status: called with one-line
    messages (lost, reconnecting, reconnected); default: the `molmo_edge.sources` logger.
    history/history_fps: keep the last `history` seconds at up to `history_fps` for `Source.clip()`.
    Raises SourceError at once when the source cannot be opened.
    """
    import cv2
    uri = str(uri).strip()
    name = _redact(uri)
    live = dict(live=True, fps=fps, retry_for=retry_for, on_status=on_status, history=history, history_fps=history_fps)
    kept = dict(history=history, history_fps=history_fps)
    if not uri:
        raise SourceError("empty source; pass a camera (0, /dev/video0, csi://0), a stream URL, a video file or an image folder")
    if uri.isdigit() or uri.startswith("/dev/video"):
        device = f"/dev/video{uri}" if uri.isdigit() else uri
        return Source(_v4l2(device, width, height, fps), device, **live)
    if uri.startswith("csi://"):
        sensor = uri[len("csi://"):]
        if not sensor.isdigit():
            raise SourceError(f"{uri}: a CSI camera is csi://N with N the sensor id, e.g. csi://0")
        return Source(_gstreamer(_csi_pipeline(int(sensor), width, height, fps), uri), uri, **live)
    if uri.startswith(("gst:", "gst://")):
        return Source(_gstreamer(uri.split(":", 1)[1].lstrip("/"), "gst: pipeline"), "gst: pipeline", **live)
    scheme = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", uri)
    if scheme and scheme.group(1).lower() in ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt"):
        if scheme.group(1).lower().startswith("rtsp"):
            os.environ.setdefault("OPENCV_FFMPEG_CAPTURE_OPTIONS", "rtsp_transport;tcp")  # UDP loses packets: smeared frames
        params = (cv2.CAP_PROP_OPEN_TIMEOUT_MSEC, _NET_TIMEOUT_MS, cv2.CAP_PROP_READ_TIMEOUT_MSEC, _NET_TIMEOUT_MS)
        return Source(_cv_opener(uri, cv2.CAP_FFMPEG, name, "no stream there; check the address, port, path and "
                                 "credentials, and that the camera is on", params), name, **live)
    if scheme and scheme.group(1).lower() != "file":
        raise SourceError(f"unsupported source {name!r}: use 0, /dev/video0, csi://0, rtsp://..., http(s)://..., "
                          "gst:PIPELINE, a video file, or a folder or glob of images")
    path = uri[len("file://"):] if uri.startswith("file://") else uri
    say = on_status or log.warning
    images = _image_paths(path)
    if images is not None:
        if not images:
            raise SourceError(f"{path} holds no images ({', '.join(IMAGE_EXTENSIONS)}); check the folder or pattern")
        opener = lambda: _ImageListReader(images, say)  # noqa: E731
        return Source(opener, path, live=False, realtime=bool(realtime), loop=loop, fps=fps, on_status=on_status, **kept)
    if not os.path.exists(path):
        raise SourceError(f"source {path!r} not found: no such file or folder (cameras are 0, /dev/video0 or csi://0)")
    opener = _cv_opener(path, cv2.CAP_FFMPEG, path, "not a video OpenCV can decode (unsupported codec or a "
                        "damaged file); convert it with ffmpeg -i IN -c:v libx264 OUT.mp4")
    return Source(opener, path, live=False, realtime=realtime is not False, loop=loop, fps=fps, on_status=on_status,
                  **kept)
