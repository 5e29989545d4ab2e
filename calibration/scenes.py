"""Synthetic camera-like scenes and videos, for tests, benchmarks and demos of calibration when no
real frames are at hand (real deployments calibrate on their own camera's frames)."""
from __future__ import annotations

import os

import numpy as np


def scene(seed: int, height: int = 480, width: int = 640) -> np.ndarray:
    """A uint8 RGB scene: lit background gradient, a table, boxes, discs and lines, sensor noise."""
    import cv2
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    c0, c1 = rng.uniform(40, 230, 3), rng.uniform(40, 230, 3)
    t = (xx / width * rng.uniform(-1, 1) + yy / height * rng.uniform(-1, 1) + 1) / 2
    img = (c0[None, None] * (1 - t[..., None]) + c1[None, None] * t[..., None]).astype(np.float32)
    top = int(height * rng.uniform(0.55, 0.8))
    img[top:] = rng.uniform(60, 200, 3)
    def size(n: int, frac: int, floor: int) -> int:  # a random extent, also for tiny frames
        lo = max(1, min(floor, n // (2 * frac)))
        return int(rng.integers(lo, max(lo + 1, n // frac)))

    for _ in range(int(rng.integers(3, 9))):
        color = tuple(float(v) for v in rng.uniform(0, 255, 3))
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        kind = int(rng.integers(0, 3))
        if kind == 0:
            cv2.rectangle(img, (x, y), (x + size(width, 3, 20), y + size(height, 3, 20)), color, -1)
        elif kind == 1:
            cv2.circle(img, (x, y), size(min(height, width), 5, 10), color, -1)
        else:
            cv2.line(img, (x, y), (int(rng.integers(0, width)), int(rng.integers(0, height))), color, int(rng.integers(1, 8)))
    img += rng.normal(0, 3.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_images(folder: str, n: int, seed: int = 0, height: int = 480, width: int = 640, ext: str = ".png") -> list[str]:
    import cv2
    os.makedirs(folder, exist_ok=True)
    paths = []
    for i in range(n):
        p = os.path.join(folder, f"frame_{i:04d}{ext}")
        cv2.imwrite(p, scene(seed + i, height, width)[:, :, ::-1])
        paths.append(p)
    return paths


def write_video(path: str, n_frames: int, scenes: int, seed: int = 0, height: int = 240, width: int = 320,
                noise: float = 2.0, fps: float = 10.0) -> str:
    """A video of `scenes` distinct scenes, each held for n_frames/scenes frames with fresh sensor
    noise per frame (a camera looking at a few scenes; scenes=1 is a static camera). MJPG in .avi."""
    import cv2
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), fps, (width, height))
    if not writer.isOpened():
        raise RuntimeError(f"OpenCV cannot write {path}")
    rng = np.random.default_rng(seed + 1000)
    bases = [scene(seed + s, height, width).astype(np.float32) for s in range(scenes)]
    for i in range(n_frames):
        base = bases[min(scenes - 1, i * scenes // n_frames)]
        frame = np.clip(base + rng.normal(0, noise, base.shape), 0, 255).astype(np.uint8)
        writer.write(np.ascontiguousarray(frame[:, :, ::-1]))
    writer.release()
    return path
