"""Draw answers' points over the image (OpenCV), for `ask --overlay` and the kiosk's frames.

Molmo v1 points are numbered in order. Molmo2 points carry an image index, or a video time / frame, and an
object id: pass `image=` or `frame=` to draw only the points of that image or frame; markers are labelled
and coloured by object id, and with `frame=` each object's track over the whole clip is drawn as a line.
"""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from molmo_edge.runtime.pointing import Point

_PALETTE = [(40, 40, 230), (40, 180, 40), (230, 120, 30), (200, 40, 200), (30, 200, 220), (120, 60, 20),
            (90, 90, 90), (0, 140, 255)]  # BGR


def _select(points: Sequence[Point], image: int | None, frame: int | None) -> list[Point]:
    if image is not None:
        return [p for p in points if p.image == image]
    if frame is not None:
        return [p for p in points if p.frame == frame]
    return list(points)


def draw_points(rgb: np.ndarray, points: Sequence[Point], caption: str = "", *, image: int | None = None,
                frame: int | None = None) -> np.ndarray:
    """A BGR copy of the RGB image with markers (and an optional caption bar). `image` / `frame` keep only
    the points on that image (0-based) / video frame (original index)."""
    img = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    h, w = img.shape[:2]
    r = max(4, round(min(h, w) / 60))
    if frame is not None:  # each object's path over the clip, so a frame shows where it went
        tracks: dict[int, list[Point]] = {}
        for p in points:
            if p.object is not None and p.time is not None:
                tracks.setdefault(p.object, []).append(p)
        for oid, ps in tracks.items():
            pts = np.array([[round(p.x), round(p.y)] for p in sorted(ps, key=lambda p: p.time)], np.int32)
            if len(pts) > 1:
                cv2.polylines(img, [pts], False, _PALETTE[oid % len(_PALETTE)], max(1, r // 3), cv2.LINE_AA)
    for i, p in enumerate(_select(points, image, frame), 1):
        color = _PALETTE[p.object % len(_PALETTE)] if p.object is not None else _PALETTE[0]
        name = str(p.object) if p.object is not None else str(i)
        c = (int(round(p.x)), int(round(p.y)))
        cv2.circle(img, c, r + 2, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(img, c, r, color, -1, cv2.LINE_AA)
        cv2.putText(img, name, (c[0] + r + 3, c[1] - r), cv2.FONT_HERSHEY_SIMPLEX, max(0.4, r / 12), color,
                    max(1, r // 5), cv2.LINE_AA)
    if caption:
        cv2.rectangle(img, (0, h - 28), (w, h), (0, 0, 0), -1)
        cv2.putText(img, caption[:120], (6, h - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def save_overlay(path: str, rgb: np.ndarray, points: Sequence[Point], caption: str = "", *,
                 image: int | None = None, frame: int | None = None) -> None:
    from molmo_edge.runtime.errors import MolmoEdgeError
    ok = cv2.imwrite(path, draw_points(rgb, points, caption, image=image, frame=frame))
    if not ok:
        raise MolmoEdgeError(f"cannot write the overlay {path}; use a .jpg or .png path in a writable folder")
