"""Accuracy of the INT8 bundle against the fp32 bundle on held-out frames (calibration/report.json).

Definitions (a test recomputes them independently):
- per crop: cosine = <a, b> / (|a| |b|) and rel_error = |a - b| / |a| of the flattened projected
  features image_features[crop] (fp32 graph = a, INT8 graph = b), in float64;
  summarised as worst (min cosine, max rel_error) and mean over all held-out crops.
- per quantized layer (local sensitivity, fp32 inputs): activation cosine cos(x, fq(x)) over all
  elements, and output cosine / rel_error of x @ W vs fq(x) @ dq(q(W)) on a deterministic subset of
  rows (LAYER_ROWS per batch). Sorted worst first: these name the tensors to --exclude.
- end to end, per (held-out frame, prompt): greedy answers of both bundles; answer agreement =
  identical token ids; count agreement = equal parsed counts, over cases where either side gives a
  count; point distance = symmetric mean nearest-neighbour distance in pixels of the original
  frame, over cases where both sides point; point_presence_mismatch = cases where only one points.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from molmo_edge.calibration import CalibrationError
from molmo_edge.runtime.files import write_json_atomic

LAYER_ROWS = 256


@dataclass
class Prompt:
    text: str
    kind: str = "short"     # point | count | short

    def to_dict(self) -> dict[str, str]:
        return {"prompt": self.text, "kind": self.kind}


DEFAULT_PROMPTS = (
    Prompt("Point to the person.", "point"),
    Prompt("Point to the cup.", "point"),
    Prompt("How many people are there?", "count"),
    Prompt("Count the cups in the image.", "count"),
    Prompt("What is the main object in this image? Answer in a few words.", "short"),
    Prompt("Is there a door in this image? Answer yes or no.", "short"),
)


def _kind_of(text: str) -> str:
    t = text.lower()
    if t.startswith("point") or "point to" in t or "point at" in t:
        return "point"
    if "how many" in t or t.startswith("count"):
        return "count"
    return "short"


def load_prompts(path: str) -> list[Prompt]:
    """A .json list (strings or {"prompt", "kind"}) or a text file, one prompt per line (# comments)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise CalibrationError(f"cannot read --prompts {path} ({e.strerror}); pass a text file with one prompt per line") from None
    out: list[Prompt] = []
    if path.lower().endswith(".json"):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise CalibrationError(f"--prompts {path} is not valid JSON ({e.msg}, line {e.lineno}); "
                                   "use a list of strings or of {\"prompt\": ..., \"kind\": ...}") from None
        if not isinstance(items, list):
            raise CalibrationError(f"--prompts {path} must hold a JSON list of prompts")
        for it in items:
            if isinstance(it, str):
                out.append(Prompt(it, _kind_of(it)))
            elif isinstance(it, dict) and isinstance(it.get("prompt"), str):
                kind = it.get("kind") or _kind_of(it["prompt"])
                if kind not in ("point", "count", "short"):
                    raise CalibrationError(f"--prompts {path}: kind {kind!r} is not point, count or short")
                out.append(Prompt(it["prompt"], kind))
            else:
                raise CalibrationError(f"--prompts {path}: {str(it)[:60]!r} is neither a string nor {{\"prompt\": ...}}")
    else:
        for line in text.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                out.append(Prompt(line, _kind_of(line)))
    out = [p for p in out if p.text.strip()]
    if not out:
        raise CalibrationError(f"--prompts {path} has no prompts; write one prompt per line")
    return out


# --- numbers ------------------------------------------------------------------------------------

def crop_metrics(ref: np.ndarray, got: np.ndarray) -> list[dict[str, float]]:
    """Per crop cosine and relative error of flattened features [crops, ...]."""
    a = np.asarray(ref, np.float64).reshape(ref.shape[0], -1)
    b = np.asarray(got, np.float64).reshape(got.shape[0], -1)
    out = []
    for x, y in zip(a, b):
        nx, ny = float(np.linalg.norm(x)), float(np.linalg.norm(y))
        cos = float(x @ y / (nx * ny)) if nx > 0 and ny > 0 else (1.0 if nx == ny == 0 else 0.0)
        rel = float(np.linalg.norm(x - y) / nx) if nx > 0 else (0.0 if ny == 0 else math.inf)
        out.append({"cosine": cos, "rel_error": rel})
    return out


def summarise(crops: Sequence[dict[str, float]]) -> dict[str, Any]:
    cos = [c["cosine"] for c in crops]
    rel = [c["rel_error"] for c in crops]
    return {"crops": len(crops), "cosine": {"worst": min(cos), "mean": float(np.mean(cos))},
            "rel_error": {"worst": max(rel), "mean": float(np.mean(rel))}}


class LayerError:
    """Accumulates the local quantization error of one layer over batches.

    Holds the INT8 weight (int8 + per-channel scale) and the float weight as stored (a memory-mapped view
    of the bundle's file): two float32 copies of every quantized layer were 2.6 GB at MolmoE-1B's size."""

    def __init__(self, layer: str, input_name: str, w: np.ndarray, q: np.ndarray, q_scale: np.ndarray, scale: float):
        self.layer, self.input, self.w, self.q, self.q_scale, self.scale = layer, input_name, w, q, q_scale, scale
        self.a = np.zeros(3)   # activation: <x, fq x>, |x|^2, |fq x|^2
        self.o = np.zeros(4)   # output: <y, yq>, |y|^2, |yq|^2, |y - yq|^2

    def update(self, x: np.ndarray) -> None:
        from molmo_edge.calibration.qdq import fake_quant
        flat = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
        fq = fake_quant(flat, self.scale)
        xd, fd = flat.astype(np.float64).ravel(), fq.astype(np.float64).ravel()
        self.a += [xd @ fd, xd @ xd, fd @ fd]
        step = max(1, len(flat) // LAYER_ROWS)
        rows = flat[::step][:LAYER_ROWS]
        y = (rows.astype(np.float64) @ np.asarray(self.w, np.float64)).ravel()
        # the dequantized weight q * s: one scale per output column, applied after the product
        yq = ((fake_quant(rows, self.scale).astype(np.float64) @ self.q.astype(np.float64)) * self.q_scale).ravel()
        self.o += [y @ yq, y @ y, yq @ yq, (y - yq) @ (y - yq)]

    def to_dict(self) -> dict[str, Any]:
        def cos(d: float, n1: float, n2: float) -> float:
            return float(d / math.sqrt(n1 * n2)) if n1 > 0 and n2 > 0 else 1.0
        return {"layer": self.layer, "input": self.input, "input_scale": float(self.scale),
                "activation_cosine": cos(*self.a), "output_cosine": cos(self.o[0], self.o[1], self.o[2]),
                "output_rel_error": float(math.sqrt(self.o[3] / self.o[1])) if self.o[1] > 0 else 0.0}


def point_distance(ref: Sequence[Sequence[float]], got: Sequence[Sequence[float]]) -> float | None:
    """Symmetric mean nearest-neighbour distance between two point sets (pixels); None if either is empty."""
    if not len(ref) or not len(got):
        return None
    a, b = np.asarray(ref, np.float64).reshape(-1, 2), np.asarray(got, np.float64).reshape(-1, 2)
    d = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return float(0.5 * (d.min(axis=1).mean() + d.min(axis=0).mean()))


def answer_summary(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate end-to-end cases (each with fp32/int8 {token_ids, count, points})."""
    agree = [c["fp32"]["token_ids"] == c["int8"]["token_ids"] for c in cases]
    counted = [c for c in cases if c["fp32"]["count"] is not None or c["int8"]["count"] is not None]
    dists = [c["point_distance_px"] for c in cases if c["point_distance_px"] is not None]
    presence = sum(1 for c in cases if bool(c["fp32"]["points"]) != bool(c["int8"]["points"]))
    return {
        "cases": len(cases),
        "answer_agreement": float(np.mean(agree)) if cases else None,
        "count_cases": len(counted),
        "count_agreement": float(np.mean([c["fp32"]["count"] == c["int8"]["count"] for c in counted])) if counted else None,
        "point_cases": len(dists),
        "point_distance_px": {"mean": float(np.mean(dists)), "max": float(np.max(dists))} if dists else None,
        "point_presence_mismatch": presence,
    }


def answer_record(ans: Any) -> dict[str, Any]:
    return {"text": ans.text, "token_ids": list(ans.token_ids), "count": ans.count,
            "points": [[float(p.x), float(p.y)] for p in ans.points]}


# --- table ----------------------------------------------------------------------------------------

def format_table(report: dict[str, Any]) -> str:
    f = report["features"]
    th = report["threshold"]
    lines = [f"INT8 vs fp32 on {report['frames']['holdout']} held-out frames ({f['crops']} crops), "
             f"method {report['method']}, {report['frames']['calibration']} calibration frames",
             f"{'metric':<34}{'worst':>12}{'mean':>12}",
             f"{'projected features cosine':<34}{f['cosine']['worst']:>12.5f}{f['cosine']['mean']:>12.5f}",
             f"{'projected features rel. error':<34}{f['rel_error']['worst']:>12.5f}{f['rel_error']['mean']:>12.5f}"]
    e = report.get("end_to_end")
    if e:
        s = e["summary"]
        lines.append(f"end to end ({s['cases']} answers; vision {e['graphs']['int8'][0]}, decoder {e['graphs']['int8'][1]}):")
        lines.append(f"  {'greedy answer agreement':<32}{s['answer_agreement']:>12.1%}")
        ca = s["count_agreement"]
        lines.append(f"  {'count agreement':<32}{(f'{ca:.1%}' if ca is not None else 'n/a'):>12}  ({s['count_cases']} counted)")
        pd = s["point_distance_px"]
        lines.append(f"  {'point distance (px) mean / max':<32}" +
                     (f"{pd['mean']:>12.1f}{pd['max']:>12.1f}" if pd else f"{'n/a':>12}") +
                     f"  ({s['point_cases']} pointed, {s['point_presence_mismatch']} only one side)")
    worst = report.get("layers", [])[:5]
    if worst:
        lines.append("most sensitive layers (local output cosine, fp32 inputs):")
        for l in worst:
            lines.append(f"  {l['output_cosine']:.5f}  {l['layer']}  (input {l['input']})")
    verdict = "PASS" if th["passed"] else "FAIL"
    lines.append(f"{verdict}: worst crop cosine {f['cosine']['worst']:.5f} vs --min-cosine {th['min_cosine']}")
    return "\n".join(lines)


def write_json(path: str, obj: Any) -> None:
    write_json_atomic(path, obj)
