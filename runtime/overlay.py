"""Draw answers' points over the image (OpenCV), for `ask --overlay` and the kiosk's frames."""
from __future__ import annotations

from typing import Sequence

import cv2
import numpy as np

from molmo_edge.runtime.pointing import Point


def draw_points(rgb: np.ndarray, points: Sequence[Point], caption: str = "") -> np.ndarray:
    """A BGR copy of the RGB image with numbered markers (and an optional caption bar)."""
    img = cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2BGR)
    h, w = img.shape[:2]
    r = max(4, round(min(h, w) / 60))
    for i, p in enumerate(points, 1):
        c = (int(round(p.x)), int(round(p.y)))
        cv2.circle(img, c, r + 2, (255, 255, 255), -1, cv2.LINE_AA)
        cv2.circle(img, c, r, (40, 40, 230), -1, cv2.LINE_AA)
        cv2.putText(img, str(i), (c[0] + r + 3, c[1] - r), cv2.FONT_HERSHEY_SIMPLEX, max(0.4, r / 12), (40, 40, 230),
                    max(1, r // 5), cv2.LINE_AA)
    if caption:
        cv2.rectangle(img, (0, h - 28), (w, h), (0, 0, 0), -1)
        cv2.putText(img, caption[:120], (6, h - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return img


def save_overlay(path: str, rgb: np.ndarray, points: Sequence[Point], caption: str = "") -> None:
    from molmo_edge.runtime.errors import MolmoEdgeError
    ok = cv2.imwrite(path, draw_points(rgb, points, caption))
    if not ok:
        raise MolmoEdgeError(f"cannot write the overlay {path}; use a .jpg or .png path in a writable folder")
