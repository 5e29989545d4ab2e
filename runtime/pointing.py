"""Parse pointing and counting answers of both Molmo families into points in pixels, percentages and counts.

Molmo (v1, molmo-spec.md §6): `<point x="12.3" y="45.6" alt="cup">cup</point>`,
`<points x1=".." y1=".." x2=".." ... alt="cups">cups</points>`, "(x, y)" / "Click(x, y)", and
"... a total of N"; coordinates are percent (0-100) of the one image.

Molmo2 (molmo2-spec.md, the Molmo2 report): `<points coords="G;G;...">label</points>` and
`<tracks coords="G;G;...">label</tracks>`, each group G = `HEAD ID X Y ID X Y ...` where HEAD is the
1-based image index (images) or the timestamp in seconds (video), ID the object id (sequential from 1; the
same id across frames is the same object) and X Y integers scaled 0-1000 of that image or frame.

Both give `Point`s with one JSON shape (README "Points"). Malformed output is tolerated: whatever complete
entries can be read are kept, coordinates out of range or pointing at an image that was not given are dropped.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

_TAG = re.compile(r"<(points?)\b([^>]*)>(.*?)(?:</\1>|$)", re.S | re.I)
_PAIR = re.compile(r'\bx(\d*)\s*=\s*"?\s*(-?[\d.]+)\s*"?\s+y\1\s*=\s*"?\s*(-?[\d.]+)', re.I)
_ALT = re.compile(r'\balt\s*=\s*"([^"]*)"', re.I)
_PAREN = re.compile(r"(?:Click)?\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
_TOTAL = re.compile(r"a total of\s+(\d+)", re.I)
_NONE = re.compile(r"\bthere are none\b", re.I)
# Molmo2: the coords attribute may be cut off (no closing quote / `>`) when generation stopped early.
_COORDS_TAG = re.compile(r'<(points|tracks)\b[^>]*?\bcoords\s*=\s*"([^"<>]*)'
                         r'("[^>]*>(.*?)(?:</\1>|(?=<(?:points|tracks)\b)|$))?', re.S | re.I)
MOLMO2_SCALE = 1000.0


@dataclass
class Point:
    x: float                    # pixels in the original image / video frame
    y: float
    x_pct: float                # percent of width / height (Molmo2's 0-1000 coordinates divided by 10)
    y_pct: float
    label: str = ""
    image: int | None = None    # 0-based index of the image it is on (None for video points)
    time: float | None = None   # seconds into the video, as the model wrote it (None for images)
    object: int | None = None   # Molmo2's object id (same id = same object across frames); None for Molmo v1
    frame: int | None = None    # index (in the original video) of the sampled frame nearest to `time`

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class VideoTimeline:
    """What the parser needs to place video points: frame size and the sampled frames' times and indices."""
    width: int
    height: int
    timestamps: Sequence[float]
    frame_indices: Sequence[int] = ()

    def nearest(self, t: float) -> int | None:
        """Original index of the sampled frame whose timestamp is nearest to `t`."""
        if not self.timestamps:
            return None
        i = min(range(len(self.timestamps)), key=lambda k: abs(self.timestamps[k] - t))
        return int(self.frame_indices[i]) if len(self.frame_indices) == len(self.timestamps) else i


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def _clean_label(s: str | None) -> str:
    return re.sub(r"<[^>]*>", "", s or "").strip()


def parse_points(text: str, width: int | None = None, height: int | None = None, *,
                 images: Sequence[tuple[int, int]] | None = None, video: VideoTimeline | None = None) -> list[Point]:
    """Points of either grammar in pixels. `width`/`height` (or `images`, a (width, height) per image in prompt
    order) size the images; `video` places Molmo2 video points. Without sizes, pixels are percent."""
    if images is None:
        images = [(width, height)] if width and height else []
    found = _parse_molmo2(text, images, video)
    w, h = (images[0] if images else (None, None))
    found += _parse_v1(text, w or 100, h or 100)
    return found


def _parse_v1(text: str, w: int, h: int) -> list[Point]:
    found: list[Point] = []

    def add(xs: str, ys: str, label: str) -> None:
        x, y = _num(xs), _num(ys)
        if x is None or y is None or not (0 <= x <= 100 and 0 <= y <= 100):
            return
        found.append(Point(x * w / 100.0, y * h / 100.0, x, y, label.strip(), image=0))

    tags = list(_TAG.finditer(text))
    for m in tags:
        attrs, inner = m.group(2), m.group(3)
        alt = _ALT.search(attrs)
        label = alt.group(1) if alt else _clean_label(inner)
        for p in _PAIR.finditer(attrs):
            add(p.group(2), p.group(3), label)
    if not tags and not _COORDS_TAG.search(text):
        for p in _PAREN.finditer(text):
            add(p.group(1), p.group(2), "")
    return found


def _parse_molmo2(text: str, images: Sequence[tuple[int, int]], video: VideoTimeline | None) -> list[Point]:
    found: list[Point] = []
    for m in _COORDS_TAG.finditer(text):
        label = _clean_label(m.group(4))
        for group in m.group(2).split(";"):
            toks = group.split()
            head = _num(toks[0]) if toks else None
            if head is None:
                continue
            for k in range(1, len(toks) - 2, 3):  # complete (id, x, y) triples only
                oid, xv, yv = _num(toks[k]), _num(toks[k + 1]), _num(toks[k + 2])
                if oid is None or xv is None or yv is None or oid != int(oid):
                    continue
                if not (0 <= xv <= MOLMO2_SCALE and 0 <= yv <= MOLMO2_SCALE):
                    continue
                p = _place(head, toks[0], int(oid), xv, yv, label, images, video)
                if p is not None:
                    found.append(p)
    return found


def _place(head: float, head_text: str, oid: int, xv: float, yv: float, label: str,
           images: Sequence[tuple[int, int]], video: VideoTimeline | None) -> Point | None:
    xp, yp = xv / 10.0, yv / 10.0
    if video is not None and (not images or "." in head_text):
        return Point(xv / MOLMO2_SCALE * video.width, yv / MOLMO2_SCALE * video.height, xp, yp, label,
                     time=head, object=oid, frame=video.nearest(head))
    if "." in head_text and head != int(head):  # a timestamp without a video to place it in: keep percent
        return Point(xp, yp, xp, yp, label, time=head, object=oid)
    idx = int(head) - 1
    if images:
        if not 0 <= idx < len(images):
            return None
        w, h = images[idx]
        return Point(xv / MOLMO2_SCALE * w, yv / MOLMO2_SCALE * h, xp, yp, label, image=idx, object=oid)
    return Point(xp, yp, xp, yp, label, image=max(idx, 0), object=oid)


def parse_count(text: str, points: list[Point]) -> int | None:
    """"a total of N" wins; "There are none." is 0; Molmo2 points count their distinct objects (per label);
    otherwise the number of points (None when there is no pointing at all)."""
    m = _TOTAL.search(text)
    if m:
        return int(m.group(1))
    if _NONE.search(text):
        return 0
    if any(p.object is not None for p in points):
        return len({(p.label, p.object) for p in points if p.object is not None})
    return len(points) if points else None
