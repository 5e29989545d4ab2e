"""Uploaded images -> RGB arrays, with their size checked from the header before any pixel is decoded."""
from __future__ import annotations

import base64
import binascii
import io
import os
import re
import threading

import numpy as np

from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.limits import Limits

# decoding runs in a thread pool; this bounds how many full-size images are in memory at once
_decode_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))


def decode_image(data: bytes, lim: Limits, what: str = "image", param: str | None = None) -> np.ndarray:
    from PIL import Image

    from molmo_edge.runtime.preprocess import ImageError, load_image
    if not data:
        raise APIError(400, f"{what} is empty; send the bytes of a PNG/JPEG/WebP image", param, "invalid_image")
    with _decode_slots:
        try:
            with Image.open(io.BytesIO(data)) as im:   # reads the header only: size before pixels
                w, h = im.size
        except Image.DecompressionBombError:
            raise APIError(413, f"{what} has too many pixels (the limit is {lim.max_image_pixels / 1e6:g} MP); downscale it",
                           param, "image_too_large") from None
        except Exception:
            raise APIError(400, f"{what} is not a readable image; send PNG, JPEG, WebP, BMP or TIFF bytes",
                           param, "invalid_image") from None
        if w * h > lim.max_image_pixels:
            raise APIError(413, f"{what} is {w}x{h} ({w * h / 1e6:.1f} MP); the limit is {lim.max_image_pixels / 1e6:g} MP: "
                                "downscale it", param, "image_too_large")
        if min(w, h) < lim.min_image_side:
            raise APIError(400, f"{what} is {w}x{h}; it must be at least {lim.min_image_side} pixels on each side",
                           param, "invalid_image")
        try:
            return load_image(data)
        except ImageError as e:
            raise APIError(400, f"{what}: {e}", param, "invalid_image") from None


def b64_image_bytes(s: str, what: str, param: str | None = None) -> bytes:
    """Bytes of a base64 string or a data: URI (data:image/png;base64,...)."""
    if s.startswith("data:"):
        head, sep, s = s.partition(",")
        if not sep or not head.endswith(";base64"):
            raise APIError(400, f"{what} is a data: URI without ';base64,'; send data:image/png;base64,...", param,
                           "invalid_image")
    elif re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", s):
        raise APIError(400, f"{what} must be a data: URI (data:image/jpeg;base64,...); this server does not fetch URLs",
                       param, "invalid_image_url")
    try:
        return base64.b64decode(re.sub(r"\s+", "", s), validate=True)
    except (binascii.Error, ValueError):
        raise APIError(400, f"{what} is not valid base64; send the image file's bytes base64-encoded", param,
                       "invalid_image") from None
