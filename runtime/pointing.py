"""Parse Molmo's pointing and counting answers (molmo-spec.md §6) into pixels, percentages and counts.

`<point x="12.3" y="45.6" alt="cup">cup</point>`, `<points x1=".." y1=".." x2=".." ... alt="cups">cups</points>`,
"(x, y)" / "Click(x, y)" forms, and "... a total of N." Malformed output is tolerated: whatever
pairs can be read are kept, coordinates outside 0-100 are dropped (as AI2's evaluator does).
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass

_TAG = re.compile(r"<(points?)\b([^>]*)>(.*?)(?:</\1>|$)", re.S | re.I)
_PAIR = re.compile(r'\bx(\d*)\s*=\s*"?\s*(-?[\d.]+)\s*"?\s+y\1\s*=\s*"?\s*(-?[\d.]+)', re.I)
_ALT = re.compile(r'\balt\s*=\s*"([^"]*)"', re.I)
_PAREN = re.compile(r"(?:Click)?\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")
_TOTAL = re.compile(r"a total of\s+(\d+)", re.I)
_NONE = re.compile(r"\bthere are none\b", re.I)


@dataclass
class Point:
    x: float            # pixels in the original image
    y: float
    x_pct: float        # percent of width / height, as the model wrote them
    y_pct: float
    label: str = ""

    def to_dict(self) -> dict:
        return {k: (round(v, 2) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _num(s: str) -> float | None:
    try:
        return float(s)
    except ValueError:
        return None


def parse_points(text: str, width: int | None = None, height: int | None = None) -> list[Point]:
    """Points in pixel coordinates of a width x height image (percent coordinates kept too)."""
    w, h = (width or 100), (height or 100)
    found: list[Point] = []

    def add(xs: str, ys: str, label: str) -> None:
        x, y = _num(xs), _num(ys)
        if x is None or y is None or not (0 <= x <= 100 and 0 <= y <= 100):
            return
        found.append(Point(x * w / 100.0, y * h / 100.0, x, y, label.strip()))

    tags = list(_TAG.finditer(text))
    for m in tags:
        attrs, inner = m.group(2), m.group(3)
        alt = _ALT.search(attrs)
        label = alt.group(1) if alt else re.sub(r"<[^>]*>", "", inner)
        for p in _PAIR.finditer(attrs):
            add(p.group(2), p.group(3), label)
    if not tags:
        for p in _PAREN.finditer(text):
            add(p.group(1), p.group(2), "")
    return found


def parse_count(text: str, points: list[Point]) -> int | None:
    """"a total of N" wins; "There are none." is 0; otherwise the number of points (None when no pointing at all)."""
    m = _TOTAL.search(text)
    if m:
        return int(m.group(1))
    if _NONE.search(text):
        return 0
    return len(points) if points else None
