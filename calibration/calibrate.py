"""`molmo-edge calibrate BUNDLE --source SRC`: frames -> activation statistics of the fp32 vision
graph -> TensorRT calibration caches, the Q/DQ vision graph and an accuracy report, all added to the
bundle atomically (staging folder, then renames, manifest.json last).

Bundle additions:
  vision.int8.onnx (+ .data)            explicit Q/DQ graph, manifest graphs["vision.int8"]
  calibration/vision.cache              TensorRT cache for the first --trt-version (10.3.0: JetPack 6)
  calibration/vision.trt-<ver>.cache    one more per further --trt-version (10.13.3: JetPack 7.0)
  calibration/frames.json               every frame used (hash, origin, size), calibration and held out
  calibration/report.json               accuracy on the held-out frames (report.py)
  manifest["calibration"]               method, counts, frame hashes, caches, tool versions, summary
"""
from __future__ import annotations

import datetime as _dt
import os
import time
from typing import Any, Callable, Sequence

import numpy as np

from molmo_edge.runtime.machine import package_versions, return_large_frees

from molmo_edge.calibration import CalibrationError
from molmo_edge.calibration.frames import FrameSet, select_frames
from molmo_edge.calibration.qdq import build_qdq_model, find_layers, quantize_weight, select_layers
from molmo_edge.calibration.report import (DEFAULT_PROMPTS, LayerError, Prompt, answer_record, answer_summary, crop_metrics, format_table,
                     point_distance, summarise, write_json)
from molmo_edge.calibration.stats import METHODS, TensorStats, graph_info, run_tapped, scales_from, tap_bytes, tapped_session
from molmo_edge.calibration.vision_feeds import VisionFeeds
from molmo_edge.calibration.staging import commit, staging
from molmo_edge.calibration.trt_cache import METHOD_ALGORITHM, version_int, version_str, write_cache
from molmo_edge.calibration.weight_quant import mapped_weight
from molmo_edge.runtime.files import say

DEFAULT_TRT_VERSIONS = ("10.3.0", "10.13.3")
BATCH_BYTES = 1.5e9          # tapped outputs held at once during statistics


def _graph_entry(base: dict[str, Any], folder: str, file: str, extra: dict[str, Any]) -> dict[str, Any]:
    data = file + ".data"
    has_data = os.path.exists(os.path.join(folder, data))
    entry = {k: base[k] for k in ("opset", "inputs", "outputs") if k in base}
    if "dynamic_axes" in base:
        entry["dynamic_axes"] = base["dynamic_axes"]
    entry.update({"file": file, "data": data if has_data else None,
                  "file_bytes": os.path.getsize(os.path.join(folder, file)),
                  "data_bytes": os.path.getsize(os.path.join(folder, data)) if has_data else 0})
    entry.update(extra)
    return entry


def _vision_session(path: str, threads: int | None = None):
    from molmo_edge.runtime.backends.ort import open_session
    try:
        return open_session(path, threads=threads)
    except Exception as e:  # onnxruntime's own exception types
        raise CalibrationError(f"onnxruntime cannot load the Q/DQ graph {os.path.basename(path)} "
                               f"({str(e).strip().splitlines()[0][:200]}); please report this with the bundle's manifest.json") from None


def calibrate_bundle(bundle_dir: str, source: str, *, samples: int = 64, holdout: int = 8, method: str = "entropy",
                     percentile: float = 99.99, seed: int = 0, max_crops: int | None = None, exclude: Sequence[str] = (),
                     quantize_attention: bool = False, min_cosine: float = 0.99, prompts: Sequence[Prompt] | None = None,
                     e2e_frames: int = 4, max_new_tokens: int = 24, trt_versions: Sequence[str] = DEFAULT_TRT_VERSIONS,
                     dedup: float = 3.0, threads: int | None = None, report_path: str | None = None,
                     progress: Callable[[str], None] = say, frames: FrameSet | None = None) -> dict[str, Any]:
    """Calibrate the bundle's vision graph on frames from `source`; returns the report (see report.py).

    Raises CalibrationError, leaving the bundle untouched, on bad input or when the worst held-out
    crop's feature cosine is below `min_cosine` (the error names the most sensitive layers).
    """
    import onnx

    from molmo_edge.runtime.bundle import Bundle, load_bundle

    t_start = time.perf_counter()
    if method not in METHODS:
        raise CalibrationError(f"unknown --method {method!r}; choose one of {', '.join(METHODS)}")
    if not 50.0 < percentile <= 100.0:
        raise CalibrationError(f"--percentile {percentile} must be in (50, 100], e.g. 99.99")
    if not -1.0 <= min_cosine <= 1.0:
        raise CalibrationError(f"--min-cosine {min_cosine} must be between -1 and 1 (0.99 is the default)")
    if not trt_versions:
        raise CalibrationError("at least one --trt-version is needed for the calibration cache (10.3.0 for JetPack 6)")
    codes = [version_int(v) for v in trt_versions]
    bundle = load_bundle(bundle_dir)
    cfg = bundle.config
    if max_crops is not None and max_crops < 1:
        raise CalibrationError(f"--max-crops {max_crops} must be >= 1")
    return_large_frees()  # every batch's taps are freed: hand them back, not keep them in the heap

    # 1. what will be quantized (checked first: a typo in --exclude should not cost a statistics pass)
    vision_path = bundle.graph_path("vision")
    info = graph_info(onnx.load(vision_path, load_external_data=False))
    layers, attention = find_layers(info)
    quant, kept = select_layers(layers, exclude)
    if not quant:
        raise CalibrationError("--exclude keeps every layer in float: nothing would be quantized; exclude fewer layers")

    # 2. frames
    if frames is None:
        frames = select_frames(source, samples, holdout, seed=seed, dedup=dedup, progress=progress)
    for w in frames.warnings:
        progress(f"[calibrate] warning: {w}")
    progress(f"[calibrate] {len(frames.calibration)} calibration + {len(frames.holdout)} held-out frames from {source} "
             f"({frames.candidates} read, {frames.duplicates} near-duplicates dropped)")

    # 3. what it will hold, checked before the long statistics pass (one crop's taps are exact from shapes)
    names = info.activations
    proc = VisionFeeds(bundle_dir, cfg)
    pixels, masks = proc.crops(frames.calibration[0].rgb, max_crops)
    per_crop = tap_bytes(info.model, names, next(proc.batches(pixels, masks, 1)))
    batch = int(max(1, min(16, BATCH_BYTES // max(per_crop, 1))))
    e2e = _end_to_end_plan(bundle, progress) if e2e_frames > 0 else None
    _check_memory(bundle, quant, info, per_crop * batch, e2e)

    # 4. statistics of every activation of the fp32 vision graph
    sess = tapped_session(vision_path, names, threads)
    stats = {n: TensorStats() for n in names}
    t0 = time.perf_counter()
    for k, frame in enumerate(frames.calibration):
        pixels, masks = proc.crops(frame.rgb, max_crops)
        for feeds in proc.batches(pixels, masks, batch):
            vals = run_tapped(sess, feeds, names)
            for n in names:
                stats[n].update(vals[n])
            del vals
        el = time.perf_counter() - t0
        progress(f"[calibrate] statistics {k + 1}/{len(frames.calibration)} frames ({len(pixels)} crops), "
                 f"{el:.0f} s, ~{el / (k + 1) * (len(frames.calibration) - k - 1):.0f} s left")
    nonfinite = [n for n, s in stats.items() if s.nonfinite]
    if nonfinite:
        progress(f"[calibrate] warning: {len(nonfinite)} activations had NaN/inf values (e.g. {nonfinite[0]}); they were ignored")
    progress(f"[calibrate] scales of {len(names)} activations ({method}) ...")
    scales, zero = scales_from(stats, method, percentile, needed={l.input for l in quant})
    if zero:
        progress(f"[calibrate] {len(zero)} activations are always zero on these frames (e.g. {zero[0]}); "
                 "they get scale 1/127 (any scale represents 0 exactly)")

    with staging(bundle_dir, "calibrate") as stage:
        rel_stage = os.path.relpath(stage, bundle_dir)
        os.makedirs(os.path.join(stage, "calibration"))
        # 5. TensorRT caches (every activation of the fp32 graph, for implicit INT8 builds)
        algorithm = METHOD_ALGORITHM[method]
        caches = []
        for i, code in enumerate(codes):
            fname = "calibration/vision.cache" if i == 0 else f"calibration/vision.trt-{version_str(code)}.cache"
            header = write_cache(os.path.join(stage, fname), scales, code, algorithm, info.initializers)
            caches.append({"file": fname, "trt_version": version_str(code), "header": header, "tensors": len(scales),
                           "network": bundle.manifest["graphs"]["vision"]["file"]})
        # 6. the Q/DQ graph
        progress(f"[calibrate] writing vision.int8.onnx: Q/DQ on {len(quant)} MatMuls "
                 f"({len(kept)} kept in float, attention matmuls {'INT8' if quantize_attention else 'float'}) ...")
        qdq_file = "vision.int8.onnx"
        summary = build_qdq_model(vision_path, os.path.join(stage, qdq_file), scales, quant,
                                  attention if quantize_attention else (),
                                  doc=f"molmo-edge INT8 Q/DQ vision graph ({method} calibration, {len(frames.calibration)} frames)")
        base = bundle.manifest["graphs"]["vision"]
        entry = _graph_entry(base, stage, qdq_file, {
            "precision": {"weights": "int8", "activations": "int8", "compute": "int8 Q/DQ (explicit)",
                          "scheme": "symmetric; weights per output channel (MatMul axis 1), activations per tensor"},
            "nodes": summary["nodes"],
            "quantization": {"method": method, "layers": len(quant), "kept_float": [l.name for l in kept],
                             "attention_matmuls": "int8" if quantize_attention else "float",
                             "float_ops": ["LayerNormalization", "Softmax", "QuickGELU/SiLU", "residual and bias Add"]},
        })
        # 7. accuracy on held-out frames
        staged_manifest = dict(bundle.manifest)
        staged_manifest["graphs"] = dict(bundle.manifest["graphs"])
        staged_manifest["graphs"]["vision.int8"] = dict(entry, file=f"{rel_stage}/{qdq_file}")
        staged = Bundle(bundle.folder, staged_manifest, cfg)
        report = _evaluate(staged, proc, sess, frames, quant, scales, os.path.join(stage, qdq_file), max_crops, batch,
                           threads, progress)
        del sess  # the tapped session (its float32 weights and every tapped buffer) before the answers load a model
        if e2e is not None:
            report["end_to_end"] = _end_to_end(staged, e2e, frames.holdout[:e2e_frames], list(prompts or DEFAULT_PROMPTS),
                                               max_crops, max_new_tokens, threads, progress)
        report.update({"method": method, "percentile": percentile if method == "percentile" else None,
                       "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                       "tools": package_versions()})
        report["frames"] = {"calibration": len(frames.calibration), "holdout": len(frames.holdout),
                            "holdout_sha256": [f.sha256 for f in frames.holdout]}
        worst = report["features"]["cosine"]["worst"]
        report["threshold"] = {"min_cosine": min_cosine, "worst_cosine": worst, "passed": bool(worst >= min_cosine)}
        table = format_table(report)
        progress(table)
        if report_path:
            write_json(report_path, report)
        if not report["threshold"]["passed"]:
            names_ = ", ".join(f"{l['layer']} (input {l['input']}, cosine {l['output_cosine']:.4f})" for l in report["layers"][:3])
            raise CalibrationError(
                f"INT8 is not good enough: worst held-out crop cosine {worst:.4f} < --min-cosine {min_cosine} "
                f"(mean {report['features']['cosine']['mean']:.4f}); most sensitive: {names_}; keep them in float with "
                f"--exclude {report['layers'][0]['layer']} (repeatable), or try --method percentile; the bundle was not changed")
        write_json(os.path.join(stage, "calibration", "report.json"), report)
        write_json(os.path.join(stage, "calibration", "frames.json"), frames.to_dict())

        # 8. commit: files into place, manifest last
        cal_files = [c["file"] for c in caches] + ["calibration/report.json", "calibration/frames.json"]
        calibration = {
            "method": method, "percentile": percentile if method == "percentile" else None, "seed": frames.seed,
            "source": source, "source_kind": frames.kind, "samples": len(frames.calibration),
            "holdout": len(frames.holdout), "max_crops": max_crops,
            "frames_sha256": [f.sha256 for f in frames.calibration],
            "holdout_sha256": [f.sha256 for f in frames.holdout],
            "near_duplicates_dropped": frames.duplicates, "dedup_threshold": frames.dedup,
            "tensors": len(scales), "always_zero": zero, "caches": caches, "report": "calibration/report.json", "frames": "calibration/frames.json",
            "files": cal_files, "excluded": list(exclude), "kept_float": [l.name for l in kept],
            "summary": {"worst_cosine": worst, "mean_cosine": report["features"]["cosine"]["mean"],
                        "min_cosine": min_cosine, **({"answer_agreement": report["end_to_end"]["summary"]["answer_agreement"]}
                                                   if report.get("end_to_end") else {})},
            "tools": package_versions(),
            "created": report["created"],
        }

        def update(m: dict[str, Any]) -> dict[str, Any]:
            m["graphs"]["vision.int8"] = entry
            m["calibration"] = calibration
            return m

        moves = {qdq_file: qdq_file, **({entry["data"]: entry["data"]} if entry["data"] else {}),
                 **{f: f for f in cal_files}}
        commit(bundle_dir, stage, moves, update, replaces={"graphs.vision.int8", "calibration"})
    progress(f"[calibrate] done in {time.perf_counter() - t_start:.0f} s: {bundle_dir}/{qdq_file}, "
             f"{', '.join(c['file'] for c in caches)}, calibration/report.json")
    return report


def _evaluate(bundle, proc, sess, frames: FrameSet, quant, scales: dict[str, float], qdq_path: str,
              max_crops: int | None, batch: int, threads: int | None, progress: Callable[[str], None]) -> dict[str, Any]:
    """Features and per-layer sensitivity on the held-out frames."""
    import onnx

    vision_path = bundle.graph_path("vision")
    model = onnx.load(vision_path, load_external_data=False)
    inits = {i.name: i for i in model.graph.initializer}
    base_dir = os.path.dirname(os.path.abspath(vision_path))
    layer_err = []
    for l in quant:
        w = mapped_weight(inits[l.weight], base_dir)
        layer_err.append(LayerError(l.name, l.input, w, *quantize_weight(w), scales[l.input]))
    del model, inits
    taps = sorted({l.input for l in quant}) + ["image_features"]
    int8 = _vision_session(qdq_path, threads)
    per_frame = []
    all_crops = []
    for k, frame in enumerate(frames.holdout):
        pixels, masks = proc.crops(frame.rgb, max_crops)
        ref, got = [], []
        for feeds in proc.batches(pixels, masks, batch):
            vals = run_tapped(sess, feeds, taps)
            for e in layer_err:
                e.update(vals[e.input])
            ref.append(proc.per_crop(vals["image_features"], feeds))
            got.append(proc.per_crop(int8.run(["image_features"], feeds)[0], feeds))
            del vals
        m = crop_metrics(np.concatenate(ref), np.concatenate(got))
        all_crops += m
        per_frame.append({"sha256": frame.sha256, "origin": frame.origin, "crops": m})
        progress(f"[calibrate] held-out frame {k + 1}/{len(frames.holdout)}: worst crop cosine "
                 f"{min(c['cosine'] for c in m):.5f}")
    del int8
    layers = sorted((e.to_dict() for e in layer_err), key=lambda d: (d["output_cosine"], d["layer"]))
    return {"features": {**summarise(all_crops), "graphs": ["vision", "vision.int8"], "per_frame": per_frame},
            "layers": layers}


def _end_to_end_plan(bundle, progress: Callable[[str], None]) -> tuple[dict[str, Any], str | None]:
    """Which graphs the end-to-end answers run ({"fp32": GraphChoice, "int8": GraphChoice}, note), checked to fit
    before the statistics pass. "int8" is the calibrated INT8 vision graph with the bundle's quantized decoder
    (INT8, else INT4), or with the float decoder when the bundle has no quantized one. A float reference that
    would not fit this machine's memory (a full-size bundle on CPU) is replaced by the quantized decoder, so
    the comparison isolates the vision. The two runs load one after the other."""
    from molmo_edge.runtime.bundle import BundleError, GraphChoice, choose_graphs
    from molmo_edge.runtime.memory import InsufficientMemory, check_fits

    graphs = bundle.manifest["graphs"]
    quantized = next((k for k in ("decoder.int8", "decoder.int4") if k in graphs), None)
    fp32 = note = None
    try:
        fp32 = choose_graphs(bundle.manifest, "fp32", fused=True)
        check_fits(bundle.manifest, bundle.config, {"vision": fp32.vision, "decoder": fp32.decoder}, bundle.folder)
    except (BundleError, InsufficientMemory) as e:  # no float decoder (export --weights), or it would not fit
        if quantized is None:
            _refuse_end_to_end(e)
        why = "does not fit this machine's memory" if isinstance(e, InsufficientMemory) else "is not in this bundle"
        fp32, note = GraphChoice("vision", quantized, "fp32", "calibration end-to-end reference"), (
            f"the float decoder {why}: the reference runs {quantized} with the float vision")
        progress(f"[calibrate] end to end: {note}")
    decoder = quantized or fp32.decoder
    # the INT8 vision graph does not exist yet: the float one (more memory) stands in for its check
    try:
        check_fits(bundle.manifest, bundle.config, {"vision": "vision", "decoder": decoder}, bundle.folder)
    except InsufficientMemory as e:
        _refuse_end_to_end(e)
    return {"fp32": fp32, "int8": GraphChoice("vision.int8", decoder, "int8", "calibration end-to-end check")}, note


def _refuse_end_to_end(e: Exception) -> None:
    from molmo_edge.runtime.memory import InsufficientMemory
    if not isinstance(e, InsufficientMemory):
        raise e
    raise CalibrationError(f"{str(e).split(';')[0]}; calibrate's end-to-end answers would not fit: run with --e2e-frames 0 "
                           "(the statistics and the held-out feature check need less)") from None


def _check_memory(bundle, quant, info, taps: int, e2e) -> None:
    """Refuse, before the statistics pass, when calibrate would not fit in the memory available: the tapped
    float vision session (its weights as float32) with one batch of every tapped activation, then the held-out
    check (both vision sessions, the quantized layers' int8 weights, the same batch of taps)."""
    from molmo_edge.runtime import machine
    from molmo_edge.runtime.memory import GiB, RUNTIME_BASE_BYTES, USABLE_SHARE, resident_weight_bytes

    vision = resident_weight_bytes(bundle.manifest["graphs"]["vision"])
    dims = {t.name: t.dims for t in info.model.graph.initializer}
    int8 = sum(int(np.prod(dims[l.weight])) for l in quant)   # int8 copies held by the held-out check
    need = RUNTIME_BASE_BYTES + vision + taps + int8 + (vision // 4 + int8)  # + the INT8 session, bounded
    avail = machine.mem_available()
    if need > avail * USABLE_SHARE:
        raise CalibrationError(
            f"calibrate needs about {need / GiB:.1f} GiB (vision weights held as float32 {vision / GiB:.1f} GiB, one batch "
            f"of activations {taps / GiB:.1f} GiB) but {avail / GiB:.1f} GiB are available; calibrate a copy of the bundle "
            "on a machine with more memory and copy it back (the scales and the INT8 graph do not depend on the machine)")


def _end_to_end(bundle, plan: tuple[dict[str, Any], str | None], holdout, prompts: list[Prompt], max_crops: int | None,
                max_new_tokens: int, threads: int | None, progress: Callable[[str], None]) -> dict[str, Any]:
    from molmo_edge.runtime.backends.ort import OrtBackend
    from molmo_edge.runtime.session import Molmo

    choices, note = plan
    answers: dict[str, list] = {}
    for label, c in choices.items():
        m = Molmo(bundle, OrtBackend(bundle, providers=["CPUExecutionProvider"], threads=threads, choice=c))
        answers[label] = [answer_record(m.ask(p.text, frame.rgb, max_new_tokens=max_new_tokens, max_crops=max_crops))
                          for frame in holdout for p in prompts]
        del m
        progress(f"[calibrate] end to end: {len(answers[label])} answers with {c.vision} + {c.decoder}")
    cases = []
    for i, (frame, p) in enumerate((f, p) for f in holdout for p in prompts):
        rec = {"frame": frame.sha256, "prompt": p.text, "kind": p.kind, "fp32": answers["fp32"][i], "int8": answers["int8"][i]}
        rec["agree"] = rec["fp32"]["token_ids"] == rec["int8"]["token_ids"]
        rec["point_distance_px"] = point_distance(rec["fp32"]["points"], rec["int8"]["points"])
        cases.append(rec)
    extra = {"reference_note": note} if note else {}
    return {"graphs": {label: [c.vision, c.decoder] for label, c in choices.items()},
            "prompts": [p.to_dict() for p in prompts], "max_new_tokens": max_new_tokens,
            "frames": [f.sha256 for f in holdout], "cases": cases, "summary": answer_summary(cases), **extra}
