"""Calibration frame sets: read a folder / glob of images, a video file or a camera, pick frames
deterministically (seeded, spread over the whole source), drop near-duplicates, split off held-out
frames, and record every frame by hash.

Near-duplicates: each candidate becomes a 32x32 grayscale thumbnail (area averaging, which also
averages sensor noise away); a candidate whose mean absolute difference to any frame already kept
is below `dedup` (0-255 scale, default 3) is dropped. A static camera therefore yields one frame,
not 200 copies of one scene, and the command says so.

Frame hash: sha256 over b"<height>x<width>:" followed by the frame's uint8 RGB bytes (row-major).
"""
from __future__ import annotations

import glob as _glob
import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from molmo_edge.calibration import CalibrationError

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ts", ".mts",
              ".mjpeg", ".mjpg", ".3gp", ".ogv", ".gif", ".y4m")
CAMERA = re.compile(r"^(/dev/video\d+|\d+|gst:.*|(csi|v4l2|rtsp|rtsps|rtmp|http|https|udp|tcp|srt|rtp)://.*)$", re.I)
MIN_SIDE = 64        # below this a frame is refused: it would be upscaled >5x into 336 px crops
WARN_SIDE = 224      # below this a warning: upscaled frames do not look like the camera's
THUMB = 32
Progress = Callable[[str], None]


def frame_hash(rgb: np.ndarray) -> str:
    """sha256 of b"HxW:" + the uint8 RGB bytes: how frames are recorded in the manifest and report."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h = hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}:".encode())
    h.update(rgb.tobytes())
    return h.hexdigest()


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    """32x32 grayscale float32 (0-255), area-averaged: the near-duplicate descriptor."""
    import cv2
    gray = cv2.cvtColor(np.ascontiguousarray(rgb, dtype=np.uint8), cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1)


@dataclass
class Frame:
    rgb: np.ndarray
    origin: str          # file path, "video.mp4#frame=120" or "camera:URI#read=7"
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.sha256:
            self.sha256 = frame_hash(self.rgb)

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "origin": self.origin, "size": [int(self.rgb.shape[1]), int(self.rgb.shape[0])]}


@dataclass
class FrameSet:
    calibration: list[Frame]
    holdout: list[Frame]
    source: str
    kind: str                                   # folder | glob | image | video | camera
    candidates: int = 0                         # frames read and considered
    duplicates: int = 0                         # near-duplicates dropped
    unreadable: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seed: int = 0
    dedup: float = 3.0

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "kind": self.kind, "seed": self.seed, "dedup_threshold": self.dedup,
                "candidates": self.candidates, "near_duplicates_dropped": self.duplicates,
                "unreadable": self.unreadable[:50], "warnings": self.warnings,
                "calibration": [f.to_dict() for f in self.calibration], "holdout": [f.to_dict() for f in self.holdout]}


def _natural_key(s: str) -> list:
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", s)]


def _spread(n: int, k: int, rng: np.random.Generator) -> list[int]:
    """k of range(n), one seeded pick in each of k equal strata: spread over the whole range."""
    if k >= n:
        return list(range(n))
    edges = np.linspace(0, n, k + 1)
    out = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        lo_i, hi_i = int(np.ceil(lo)), max(int(np.ceil(hi)), int(np.ceil(lo)) + 1)
        out.append(int(rng.integers(lo_i, min(hi_i, n))))
    return sorted(set(out))


def classify_source(source: str) -> str:
    """folder | image | video | glob | camera, or a clear error."""
    if os.path.isdir(source):
        return "folder"
    if os.path.isfile(source):
        return "image" if source.lower().endswith(IMAGE_EXTS) else "video"
    if any(c in source for c in "*?["):
        return "glob"
    if CAMERA.match(source):
        return "camera"
    raise CalibrationError(f"--source {source} does not exist; pass a folder of images, a glob like 'frames/*.jpg', "
                           "a video file, or a camera URI (/dev/video0, csi://0, rtsp://...)")


class _Reader:
    """Yields candidate frames of a source, in source order."""

    def __init__(self, source: str, kind: str, budget: int, rng: np.random.Generator, progress: Progress,
                 camera_reads: int, camera_timeout: float):
        self.source, self.kind, self.budget, self.rng, self.progress = source, kind, budget, rng, progress
        self.unreadable: list[str] = []
        self.warnings: list[str] = []
        self.camera_reads, self.camera_timeout = camera_reads, camera_timeout

    def __iter__(self) -> Iterator[Frame]:
        if self.kind in ("folder", "glob", "image"):
            return self._images()
        if self.kind == "video":
            return self._video()
        return self._camera()

    # --- images ----------------------------------------------------------------------------------
    def _files(self) -> list[str]:
        if self.kind == "image":
            return [self.source]
        if self.kind == "folder":
            names = [os.path.join(self.source, n) for n in os.listdir(self.source)]
        else:
            names = _glob.glob(self.source, recursive=True)
        files = sorted((n for n in names if os.path.isfile(n) and n.lower().endswith(IMAGE_EXTS)), key=_natural_key)
        if not files:
            videos = sorted(n for n in names if os.path.isfile(n) and n.lower().endswith(VIDEO_EXTS))
            hint = f" (it has video {videos[0]}: pass that file as --source)" if videos else ""
            where = f"folder {self.source}" if self.kind == "folder" else f"glob {self.source!r}"
            raise CalibrationError(f"{where} has no images ({', '.join(e[1:] for e in IMAGE_EXTS[:5])}, ...){hint}; "
                                   "point --source at the robot's own camera frames")
        return files

    def _images(self) -> Iterator[Frame]:
        from molmo_edge.runtime.preprocess import load_image
        files = self._files()
        picks = _spread(len(files), self.budget, self.rng)
        for n, i in enumerate(picks):
            try:
                rgb = load_image(files[i])
            except Exception as e:  # noqa: BLE001 - any undecodable file is reported and skipped
                self.unreadable.append(f"{files[i]}: {str(e).splitlines()[0][:120]}")
                continue
            if n % 16 == 0:
                self.progress(f"[calibrate] reading images {n + 1}/{len(picks)}")
            yield Frame(rgb, files[i])

    # --- video -----------------------------------------------------------------------------------
    def _video(self) -> Iterator[Frame]:
        import cv2
        cap = cv2.VideoCapture(self.source)
        bad = (f"cannot read video {self.source}: OpenCV could not decode it (unsupported codec, not a video, or "
               "damaged); convert it to H.264 MP4 (ffmpeg -i IN -c:v libx264 OUT.mp4) or extract frames to a folder")
        if not cap.isOpened():
            raise CalibrationError(bad)
        try:
            total = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
            if total <= 0:  # container without a frame count: count by decoding once
                while cap.grab():
                    total += 1
                cap.release()
                cap = cv2.VideoCapture(self.source)
            if total <= 0:
                raise CalibrationError(bad)
            wanted = set(_spread(total, self.budget, self.rng))
            last = max(wanted)
            got = 0
            for i in range(last + 1):
                if not cap.grab():
                    if got == 0:
                        raise CalibrationError(bad)
                    self.warnings.append(f"{self.source} ended at frame {i} of the {total} its header announces "
                                         "(truncated file?); frames after it were not used")
                    break
                if i in wanted:
                    ok, bgr = cap.retrieve()
                    if not ok or bgr is None:
                        self.unreadable.append(f"{self.source}#frame={i}")
                        continue
                    got += 1
                    if got % 16 == 1:
                        self.progress(f"[calibrate] reading video frame {i + 1}/{total} ({got}/{len(wanted)} picked)")
                    yield Frame(np.ascontiguousarray(bgr[:, :, ::-1]), f"{self.source}#frame={i}")
        finally:
            cap.release()

    # --- camera ----------------------------------------------------------------------------------
    def _camera(self) -> Iterator[Frame]:
        from molmo_edge.runtime.cameras import SourceEnded, SourceError, open_source
        src = open_source(self.source, retry_for=self.camera_timeout)
        t0 = time.monotonic()
        try:
            for i in range(self.camera_reads):
                left = self.camera_timeout - (time.monotonic() - t0)
                if left <= 0:
                    self.warnings.append(f"stopped recording {self.source} after {self.camera_timeout:g} s ({i} frames read)")
                    break
                try:
                    rgb = src.read(timeout=left).rgb
                except (TimeoutError, SourceEnded):
                    break
                except SourceError as e:
                    raise CalibrationError(f"camera {self.source} failed: {str(e).splitlines()[0]}") from None
                if i % 30 == 0:
                    self.progress(f"[calibrate] recording camera frame {i + 1} (up to {self.camera_reads})")
                yield Frame(np.ascontiguousarray(rgb, dtype=np.uint8), f"camera:{self.source}#read={i}")
        finally:
            src.close()


def _check_size(frames: list[Frame], warnings: list[str]) -> None:
    small = [f for f in frames if min(f.rgb.shape[:2]) < MIN_SIDE]
    if small:
        f = small[0]
        raise CalibrationError(f"{len(small)} of {len(frames)} frames are tiny ({f.rgb.shape[1]}x{f.rgb.shape[0]} px, "
                               f"e.g. {f.origin}); frames under {MIN_SIDE} px would be upscaled into 336 px crops and "
                               "give scales that do not fit real camera frames: use frames at the camera's resolution")
    low = [f for f in frames if min(f.rgb.shape[:2]) < WARN_SIDE]
    if low:
        f = low[0]
        warnings.append(f"{len(low)} of {len(frames)} frames are small ({f.rgb.shape[1]}x{f.rgb.shape[0]} px); they are "
                        "upscaled into 336 px crops, so their statistics may not match the camera's real frames")


def select_frames(source: str, samples: int = 64, holdout: int = 8, seed: int = 0, dedup: float = 3.0,
                  progress: Progress = lambda *_: None, camera_reads: int | None = None,
                  camera_timeout: float = 120.0) -> FrameSet:
    """Read `source`, drop near-duplicates, and split `samples` calibration + `holdout` held-out frames.

    Deterministic for files (seeded strata over the whole folder or video); a camera is recorded
    until enough distinct frames were seen, `camera_reads` frames were read, or `camera_timeout` s.
    Raises CalibrationError when fewer than 2 distinct usable frames exist (one to calibrate on,
    one to check on); warns when fewer than asked, or frames are small.
    """
    if samples < 1:
        raise CalibrationError(f"--samples {samples}: calibration needs at least 1 frame (32-256 is typical)")
    if holdout < 1:
        raise CalibrationError(f"--holdout {holdout}: the accuracy report needs at least 1 held-out frame")
    if dedup < 0:
        raise CalibrationError(f"--dedup {dedup} must be >= 0 (0 keeps every frame that is not bit-identical)")
    kind = classify_source(source)
    need = samples + holdout
    rng = np.random.default_rng(seed)
    budget = max(4 * need, need + 16)  # candidates considered: room for near-duplicates
    reader = _Reader(source, kind, budget, rng, progress, camera_reads or 10 * budget, camera_timeout)
    kept: list[Frame] = []
    thumbs = np.zeros((0, THUMB * THUMB), np.float32)
    hashes: set[str] = set()
    seen = dups = 0
    for frame in reader:
        seen += 1
        if frame.rgb.ndim != 3 or frame.rgb.shape[2] != 3 or frame.rgb.size == 0:
            reader.unreadable.append(f"{frame.origin}: not an RGB frame (shape {frame.rgb.shape})")
            continue
        t = thumbnail(frame.rgb)
        if frame.sha256 in hashes or (len(thumbs) and float(np.abs(thumbs - t).mean(axis=1).min()) < max(dedup, 1e-6)):
            dups += 1
            continue
        hashes.add(frame.sha256)
        kept.append(frame)
        thumbs = np.vstack([thumbs, t[None]])
        if kind == "camera" and len(kept) >= need:
            break
    warnings = list(reader.warnings)
    if reader.unreadable:
        warnings.append(f"{len(reader.unreadable)} unreadable frames/files skipped (e.g. {reader.unreadable[0]})")
    if not kept:
        what = f"{seen} frames read" if seen else "nothing readable"
        raise CalibrationError(f"--source {source} gave no usable frames ({what}; "
                               f"{reader.unreadable[0] if reader.unreadable else 'no images decoded'}); "
                               "pass readable images or a video")
    if len(kept) < 2:
        raise CalibrationError(f"--source {source} gave 1 distinct frame ({seen} read, {dups} near-duplicates dropped); "
                               "calibration needs at least 2 (one to calibrate on, one held out to check): add more "
                               "varied images, a longer video, or move the camera")
    _check_size(kept, warnings)
    if len(kept) > need:  # evenly spread over what survived, which is spread over the source
        pick = np.unique(np.round(np.linspace(0, len(kept) - 1, need)).astype(int))
        kept = [kept[i] for i in pick]
    n = len(kept)
    n_hold = holdout
    if n < need:
        n_hold = max(1, min(holdout, int(round(n * holdout / need))))
        n_hold = min(n_hold, n - 1)
        warnings.append(f"only {n} distinct frames in {source} ({dups} near-duplicates dropped), {need} asked for: "
                        f"calibrating on {n - n_hold}, checking on {n_hold}")
    hold_idx = set(int(i) for i in rng.choice(n, size=n_hold, replace=False))
    calib = [f for i, f in enumerate(kept) if i not in hold_idx]
    hold = [f for i, f in enumerate(kept) if i in hold_idx]
    if len(calib) < 8:
        warnings.append(f"only {len(calib)} calibration frames: scales from so few frames are noisy; 32 or more "
                        "varied frames from the deployment camera are recommended")
    return FrameSet(calib, hold, source, kind, seen, dups, reader.unreadable, warnings, seed, dedup)
