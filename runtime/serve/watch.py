"""The watch loop: ask one or more questions about frames from a source, one JSON line per answer.

    from molmo_edge.runtime import Molmo
    from molmo_edge.runtime.cameras import open_source
    from molmo_edge.runtime.serve.watch import watch
    with open_source("/dev/video0") as cam:
        summary = watch(Molmo.load("bundle/"), cam, ["How many people are there?"], every=2.0, emit=print)

Each line (a dict given to `emit`) is one (frame, prompt) pair: time, timestamp, frame id, prompt,
answer, points (pixels and percent), count, latency per stage in ms (preprocess, vision, prefill,
decode, total, and age: capture to answer), and the frames dropped (replaced in the capture thread
before being read) and skipped (read but not answered: `every`, `on_change`) since the previous line.
Several prompts about one frame share its vision pass (the runtime caches the image's features),
so only the first line of a frame has a non-zero vision time.

With `clip=S` (Molmo2 bundles: a video model) each question is about the last S seconds of the source
as a video, sampled the way the model expects with the capture times as timestamps ("how many people
walked in?"); the line then also has `clip` (frames, seconds, start, end). The source must keep that
history (`open_source(uri, history=S)`); by default a clip is answered every S seconds, starting once
S seconds were seen (or when a file ends sooner).
"""
from __future__ import annotations

import datetime
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.cameras import Frame, Source, SourceEnded, SourceError, clip_arrays

__all__ = ["watch", "WatchSummary", "OverlayVideo", "scene_signature", "scene_changed"]

_THUMB = 32  # side of the grayscale thumbnail that change detection compares


def scene_signature(rgb: np.ndarray) -> np.ndarray:
    """A 32x32 grayscale thumbnail in [0, 1]: averaging ~300 pixels each, it ignores sensor noise."""
    import cv2
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (_THUMB, _THUMB), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0


def scene_changed(a: np.ndarray | None, b: np.ndarray, threshold: float) -> bool:
    """Mean absolute difference of two signatures above `threshold` (0..1); no reference means changed."""
    return a is None or float(np.abs(a - b).mean()) > threshold


class OverlayVideo:
    """Answered frames with their points drawn, written as a video (.mp4: mp4v, .avi: MJPG)."""

    def __init__(self, path: str, fps: float = 10.0) -> None:
        self.path, self.fps, self.frames = path, fps, 0
        self._writer = None
        self._size: tuple[int, int] | None = None

    def write(self, rgb: np.ndarray, points: Sequence[Any], caption: str) -> None:
        import cv2
        from molmo_edge.runtime.overlay import draw_points
        bgr = draw_points(rgb, points, caption)
        if self._writer is None:
            self._size = (bgr.shape[1], bgr.shape[0])
            fourcc = cv2.VideoWriter_fourcc(*("MJPG" if self.path.lower().endswith(".avi") else "mp4v"))
            self._writer = cv2.VideoWriter(self.path, fourcc, self.fps, self._size)
            if not self._writer.isOpened():
                raise MolmoEdgeError(f"cannot write the overlay video {self.path}; use a .mp4 or .avi path in a writable folder")
        if (bgr.shape[1], bgr.shape[0]) != self._size:  # a camera that changed mode mid-run
            bgr = cv2.resize(bgr, self._size)
        self._writer.write(bgr)
        self.frames += 1

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()


@dataclass
class WatchSummary:
    frames_read: int = 0
    frames_answered: int = 0
    answers: int = 0
    skipped: int = 0
    dropped: int = 0
    reconnects: int = 0
    elapsed_s: float = 0.0
    latency_ms_p50: float | None = None
    latency_ms_p95: float | None = None
    stopped_by: str = ""                 # end | interrupt | max-frames | stop | source-failed
    error: str | None = None
    _latencies: list[float] = field(default_factory=list, repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not k.startswith("_")}


def _show(rgb: np.ndarray, points: Sequence[Any], caption: str) -> bool:
    """Draw in a window; False when the user closed it or pressed q/Esc."""
    import cv2
    from molmo_edge.runtime.overlay import draw_points
    cv2.imshow("molmo-edge watch", draw_points(rgb, points, caption))
    return cv2.waitKey(1) & 0xFF not in (ord("q"), 27)


def _iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def clip_media(model: Any, source: Source, seconds: float, min_frames: int = 2
               ) -> tuple[Any, Frame, dict[str, Any]] | None:
    """The last `seconds` of the source, preprocessed once for every prompt (a Molmo2 video), its newest frame,
    and its description (frames kept, seconds covered, start, end); None when fewer than `min_frames` were kept."""
    from molmo_edge.runtime import molmo2_session
    frames = source.clip(seconds)
    if len(frames) < max(1, min_frames):
        return None
    video = molmo2_session.processor(model).video(clip_arrays(frames))
    info = {"frames": len(frames), "seconds": round(frames[-1].timestamp - frames[0].timestamp, 3),
            "start": _iso(frames[0].timestamp), "end": _iso(frames[-1].timestamp)}
    return video, frames[-1], info


def watch(model: Any, source: Source, prompts: Sequence[str], *, every: float | None = None, on_change: bool = False,
          change_threshold: float = 0.02, max_new_tokens: int = 64, max_crops: int | None = None,
          max_frames: int | None = None, emit: Callable[[dict[str, Any]], None] = print,
          overlay: OverlayVideo | None = None, show: bool = False, stop: threading.Event | None = None,
          clip: float | None = None) -> WatchSummary:
    """Answer `prompts` about frames of `source` until it ends, `max_frames` frames were answered,
    `stop` is set, or Ctrl-C. every: answer at most one frame per this many seconds (capture time).
    on_change: answer only when the scene differs from the last answered frame by `change_threshold`.
    clip: ask about the last `clip` seconds as a video (Molmo2; the source needs history >= clip)."""
    if not prompts:
        raise MolmoEdgeError("no prompt given: pass at least one --prompt TEXT")
    if clip is not None:
        if clip <= 0:
            raise MolmoEdgeError(f"--clip must be a positive number of seconds (got {clip:g})")
        if not getattr(getattr(model, "cfg", None), "is_molmo2", False):
            raise MolmoEdgeError("--clip asks about a video, which needs a Molmo2 bundle; this bundle is "
                                 f"{getattr(getattr(model, 'cfg', None), 'family', 'a Molmo v1 model')} (ask about frames instead)")
        if source.history < clip:
            raise MolmoEdgeError(f"the source keeps {source.history:g} s of history but --clip is {clip:g} s: open it with "
                                 f"open_source(uri, history={clip:g})")
        every = clip if every is None else every
    s = WatchSummary()
    t0 = time.monotonic()
    last_sig: np.ndarray | None = None
    last_ts: float | None = None
    dropped_at_line, skipped_since = source.dropped, 0
    first_ts: float | None = None
    pending: Frame | None = None  # clip mode: the newest frame not yet covered by an answered clip
    try:
        while not (stop and stop.is_set()):
            try:
                frame: Frame = source.read(timeout=0.5)
            except TimeoutError:  # re-check `stop` now and then
                continue
            except SourceEnded:
                s.stopped_by = "end"
                if clip and pending is not None:  # a file shorter than the clip, or its tail: answer what was seen
                    frame, pending = pending, None
                    clip_wait = False
                else:
                    break
            else:
                s.frames_read += 1
                first_ts = frame.timestamp if first_ts is None else first_ts
                clip_wait = bool(clip and frame.timestamp - first_ts < clip)  # not yet `clip` seconds of history
                if clip:
                    pending = frame
            if clip_wait or (every and last_ts is not None and frame.timestamp < last_ts + every and s.stopped_by != "end"):
                skipped_since += 1
                continue
            sig = scene_signature(frame.rgb) if on_change else None
            if on_change and not scene_changed(last_sig, sig, change_threshold):
                skipped_since += 1
                continue
            last_sig, last_ts = sig, frame.timestamp
            media, clip_info = None, None
            if clip:
                got = clip_media(model, source, clip)
                if got is None:
                    skipped_since += 1
                    continue
                (media, _, clip_info), pending = got, None
            answers = []
            for prompt in prompts:
                t = time.perf_counter()
                if media is not None:
                    ans = model.ask(prompt, video=media, max_new_tokens=max_new_tokens)
                else:
                    ans = model.ask(prompt, frame.rgb, max_new_tokens=max_new_tokens, max_crops=max_crops)
                total = (time.perf_counter() - t) * 1e3
                answers.append(ans)
                lat = {k: round(v, 2) for k, v in ans.timings.items() if k != "decode_tokens_per_s"}
                lat.update(total=round(total, 2), age=round((time.time() - frame.timestamp) * 1e3, 2))
                s.answers += 1
                s.frames_answered += len(answers) == 1  # counted before its first line is out: an interrupt never undercounts
                line = {"time": _iso(frame.timestamp), "timestamp": round(frame.timestamp, 3), "frame": frame.id,
                        "prompt": prompt, "answer": ans.text, "points": [p.to_dict() for p in ans.points],
                        "count": ans.count, "latency_ms": lat, "dropped": source.dropped - dropped_at_line,
                        "skipped": skipped_since}
                if clip_info:
                    line["clip"] = clip_info
                emit(line)
                dropped_at_line, skipped_since = source.dropped, 0
            s._latencies.append((time.time() - frame.timestamp) * 1e3)
            if overlay is not None or show:
                points = [p for a in answers for p in a.points]
                caption = " | ".join(a.text for a in answers)
                if overlay is not None:
                    overlay.write(frame.rgb, points, caption)
                if show and not _show(frame.rgb, points, caption):
                    s.stopped_by = "stop"
                    break
            if max_frames and s.frames_answered >= max_frames:
                s.stopped_by = "max-frames"
                break
            if s.stopped_by == "end":
                break
        else:
            s.stopped_by = "stop"
    except KeyboardInterrupt:
        s.stopped_by = "interrupt"
    except SourceError as e:
        s.stopped_by, s.error = "source-failed", str(e)
    finally:
        if overlay is not None:
            overlay.close()
    s.elapsed_s = round(time.monotonic() - t0, 3)
    s.skipped = s.frames_read - s.frames_answered
    s.dropped, s.reconnects = source.dropped, source.reconnects
    if s._latencies:
        s.latency_ms_p50, s.latency_ms_p95 = (round(float(np.percentile(s._latencies, q)), 1) for q in (50, 95))
    return s
