"""INT8 calibration of a bundle's vision graph: frames, statistics, TensorRT cache, Q/DQ graph,
the accuracy report (recomputed here independently), atomic bundle updates, bad input."""
import hashlib
import json
import os
import shutil
import struct

import cv2
import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from molmo_edge.calibration import CalibrationError  # noqa: E402
from molmo_edge.calibration.calibrate import calibrate_bundle  # noqa: E402
from molmo_edge.calibration.frames import select_frames  # noqa: E402
from molmo_edge.calibration.report import load_prompts  # noqa: E402
from molmo_edge.calibration.scenes import scene, write_images, write_video  # noqa: E402
from molmo_edge.calibration.trt_cache import read_cache  # noqa: E402
from molmo_edge.calibration.weight_quant import quantize_decoder_weights  # noqa: E402
from molmo_edge.export.bundle import export_bundle  # noqa: E402
from molmo_edge.runtime.bundle import load_bundle  # noqa: E402
from molmo_edge.runtime.errors import MolmoEdgeError  # noqa: E402
from molmo_edge.runtime.session import Molmo  # noqa: E402

QUIET = dict(progress=lambda *_: None)
FAST = dict(max_crops=1, e2e_frames=2, max_new_tokens=6, **QUIET)


def _snapshot(folder):
    """Every file's path and bytes: 'the bundle as it was'."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def _hash(rgb):  # the documented frame hash, written out again here
    return hashlib.sha256(f"{rgb.shape[0]}x{rgb.shape[1]}:".encode() + np.ascontiguousarray(rgb).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def base_bundle(tiny_checkpoints, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("cal") / "molmoe")
    export_bundle(tiny_checkpoints["molmoe-1b"], out, fused=True, **QUIET)
    return out


@pytest.fixture(scope="module")
def frames_dir(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("frames"))
    write_images(d, 12, seed=100, height=240, width=320)
    return d


@pytest.fixture(scope="module")
def calibrated(base_bundle, frames_dir, tmp_path_factory):
    """A bundle with an INT4 decoder and an INT8 (entropy) vision graph; the report it wrote."""
    b = str(tmp_path_factory.mktemp("calibrated") / "b")
    shutil.copytree(base_bundle, b)
    quantize_decoder_weights(b, 4, 32, **QUIET)
    report = calibrate_bundle(b, frames_dir, samples=8, holdout=3, **FAST)
    return b, report


def test_calibrate_writes_registered_flavour(calibrated, base_bundle):
    b, report = calibrated
    bundle = load_bundle(b)  # checks every listed graph's sizes
    man = bundle.manifest
    g, base = man["graphs"]["vision.int8"], man["graphs"]["vision"]
    for k in ("file", "data", "opset", "file_bytes", "data_bytes", "precision", "inputs", "outputs"):
        assert k in g
    assert g["file"] == "vision.int8.onnx" and g["inputs"] == base["inputs"] and g["outputs"] == base["outputs"]
    cal = man["calibration"]
    frames = json.load(open(os.path.join(b, "calibration", "frames.json")))
    assert cal["method"] == "entropy" and cal["samples"] == 8 == len(cal["frames_sha256"])
    assert cal["frames_sha256"] == [f["sha256"] for f in frames["calibration"]]
    assert cal["holdout_sha256"] == [f["sha256"] for f in frames["holdout"]] == report["frames"]["holdout_sha256"]
    assert not set(cal["frames_sha256"]) & set(cal["holdout_sha256"])
    assert {"onnx", "onnxruntime", "numpy"} <= set(cal["tools"])
    assert not [n for n in os.listdir(b) if n.startswith(".molmo-edge-staging")]
    # the frames really are the files' pixels, by the documented hash
    by_hash = {_hash(cv2.imread(os.path.join(p))[:, :, ::-1]): p for p in
               (os.path.join(frames["source"], n) for n in os.listdir(frames["source"]))}
    assert all(h in by_hash for h in cal["frames_sha256"] + cal["holdout_sha256"])
    # the runtime runs the flavours, as `ask --precision int4` does (INT8 vision + the INT4 decoder)
    m = Molmo.load(b, precision="int4")
    assert m.backend.graphs == {"vision": "vision.int8", "decoder": "decoder.int4"}
    with pytest.raises(MolmoEdgeError, match="no INT8 decoder"):  # never INT4 in place of INT8
        Molmo.load(b, precision="int8")


def test_cache_lists_every_activation_with_the_graph_scales(calibrated):
    b, _ = calibrated
    model = onnx.load(os.path.join(b, "vision.onnx"), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    cache = read_cache(os.path.join(b, "calibration", "vision.cache"))
    assert cache.header == "TRT-100300-EntropyCalibration2"
    other = read_cache(os.path.join(b, "calibration", "vision.trt-10.13.3.cache"))
    assert other.header == "TRT-101303-EntropyCalibration2" and other.scales == cache.scales
    names = set(cache.scales)
    assert {"images", "image_masks", "image_features"} <= names and not names & inits
    produced = {o for n in model.graph.node for o in n.output}
    assert names - {"images", "image_masks"} <= produced
    matmul_inputs = {n.input[0] for n in model.graph.node if n.op_type == "MatMul"}
    assert matmul_inputs <= names  # everything an INT8 layer could read has a scale
    assert all(np.isfinite(s) and s > 0 for s in cache.scales.values())
    # the Q/DQ graph quantizes each activation with exactly the cache's scale
    q = onnx.load(os.path.join(b, "vision.int8.onnx"))
    init = {i.name: onnx.numpy_helper.to_array(i, base_dir=b) for i in q.graph.initializer}
    quant_nodes = [n for n in q.graph.node if n.op_type == "QuantizeLinear"]
    assert quant_nodes
    for n in quant_nodes:
        scale = init[n.input[1]]
        assert scale.shape == () and scale.dtype == np.float32 and init[n.input[2]] == 0
        assert struct.pack(">f", scale) == struct.pack(">f", cache.scales[n.input[0]])


def test_qdq_graph_structure(calibrated):
    b, _ = calibrated
    q = onnx.load(os.path.join(b, "vision.int8.onnx"))
    onnx.checker.check_model(os.path.join(b, "vision.int8.onnx"))
    init = {i.name: onnx.numpy_helper.to_array(i, base_dir=b) for i in q.graph.initializer}
    prod = {o: n for n in q.graph.node for o in n.output}
    assert [i.name for i in q.graph.input] == ["images", "image_masks"] and [o.name for o in q.graph.output] == ["image_features"]
    quantized = 0
    for n in q.graph.node:
        ins = [prod.get(x) for x in n.input]
        dq_in = [p for p in ins if p is not None and p.op_type == "DequantizeLinear"]
        if n.op_type in ("LayerNormalization", "Softmax", "Sigmoid", "Add", "Mul"):
            assert not dq_in, f"{n.op_type} {n.name} must stay float"
        if n.op_type != "MatMul":
            continue
        if "patch_embedding" in n.input[1]:
            assert not dq_in  # the pixel projection stays float by default
            continue
        if ins[1] is None or ins[1].op_type != "DequantizeLinear":
            assert not dq_in and n.input[1] not in init  # attention matmuls (activation x activation): float
            continue
        quantized += 1
        w = ins[1]
        wq, ws, wz = init[w.input[0]], init[w.input[1]], init[w.input[2]]
        axis = {a.name: a.i for a in w.attribute}["axis"]
        assert wq.dtype == np.int8 and wq.ndim == 2 and axis == 1 and ws.shape == (wq.shape[1],)
        assert (wz == 0).all() and np.abs(wq).max() == 127  # symmetric, per output channel, full range used
        assert ins[0].op_type == "DequantizeLinear" and prod[ins[0].input[0]].op_type == "QuantizeLinear"
    assert quantized == load_bundle(b).manifest["graphs"]["vision.int8"]["quantization"]["layers"] > 0


def test_report_numbers_recomputed_independently(calibrated):
    b, report = calibrated
    frames = json.load(open(os.path.join(b, "calibration", "frames.json")))
    assert json.load(open(os.path.join(b, "calibration", "report.json")))["features"] == report["features"]
    fp32, int8 = Molmo.load(b, precision="fp32"), Molmo.load(b, precision="int4")
    crops_all = []
    for rec, meta in zip(report["features"]["per_frame"], frames["holdout"]):
        assert rec["sha256"] == meta["sha256"]
        rgb = cv2.imread(meta["origin"])[:, :, ::-1]
        assert _hash(rgb) == meta["sha256"]
        crops = fp32.processor.image(rgb, max_crops=1)
        a = fp32.backend.vision(crops.images, crops.image_masks).reshape(crops.n_crops, -1).astype(np.float64)
        q = int8.backend.vision(crops.images, crops.image_masks).reshape(crops.n_crops, -1).astype(np.float64)
        for x, y, got in zip(a, q, rec["crops"]):
            cos = x @ y / np.sqrt((x @ x) * (y @ y))
            rel = np.sqrt(((x - y) @ (x - y)) / (x @ x))
            assert abs(cos - got["cosine"]) < 1e-5 and abs(rel - got["rel_error"]) < 1e-4
            assert cos < 1 - 1e-6  # INT8 really differs from fp32: quantization happened
            crops_all.append((cos, rel))
    cos, rel = np.array(crops_all).T
    f = report["features"]
    assert f["crops"] == len(cos)
    assert abs(f["cosine"]["worst"] - cos.min()) < 1e-5 and abs(f["cosine"]["mean"] - cos.mean()) < 1e-5
    assert abs(f["rel_error"]["worst"] - rel.max()) < 1e-4 and abs(f["rel_error"]["mean"] - rel.mean()) < 1e-4
    assert report["threshold"] == {"min_cosine": 0.99, "worst_cosine": f["cosine"]["worst"], "passed": True}
    # end to end: the same greedy answers, agreement, counts and point distances
    e = report["end_to_end"]
    assert e["graphs"] == {"fp32": ["vision", "decoder.fused"], "int8": ["vision.int8", "decoder.int4"]}
    rgb_of = {m["sha256"]: cv2.imread(m["origin"])[:, :, ::-1] for m in frames["holdout"]}
    agree, counted, dists = [], [], []
    for case in e["cases"]:
        r = fp32.ask(case["prompt"], rgb_of[case["frame"]], max_new_tokens=6, max_crops=1)
        g = int8.ask(case["prompt"], rgb_of[case["frame"]], max_new_tokens=6, max_crops=1)
        assert r.token_ids == case["fp32"]["token_ids"] and g.token_ids == case["int8"]["token_ids"]
        agree.append(r.token_ids == g.token_ids)
        if r.count is not None or g.count is not None:
            counted.append(r.count == g.count)
        if r.points and g.points:
            pa = np.array([[p.x, p.y] for p in r.points])
            pb = np.array([[p.x, p.y] for p in g.points])
            d = np.linalg.norm(pa[:, None] - pb[None], axis=-1)
            dists.append((d.min(1).mean() + d.min(0).mean()) / 2)
    s = e["summary"]
    assert s["cases"] == len(e["cases"]) == 2 * 6
    assert s["answer_agreement"] == pytest.approx(np.mean(agree))
    assert s["count_agreement"] == (pytest.approx(np.mean(counted)) if counted else None)
    assert s["point_distance_px"] == ({"mean": pytest.approx(np.mean(dists)), "max": pytest.approx(np.max(dists))}
                                      if dists else None)


def test_failed_threshold_names_worst_layers_and_changes_nothing(calibrated, frames_dir, tmp_path):
    b = str(tmp_path / "b")
    shutil.copytree(calibrated[0], b)
    before = _snapshot(b)
    report_file = str(tmp_path / "rejected.json")
    with pytest.raises(CalibrationError, match=r"not good enough.*most sensitive: model\.vision_backbone.*--exclude") as e:
        calibrate_bundle(b, frames_dir, samples=4, holdout=2, method="minmax", min_cosine=0.999999,
                         report_path=report_file, **dict(FAST, e2e_frames=0))
    assert _snapshot(b) == before
    rejected = json.load(open(report_file))
    worst = rejected["layers"][0]
    assert worst["layer"] in str(e.value) and rejected["threshold"]["passed"] is False
    assert worst["output_cosine"] == min(l["output_cosine"] for l in rejected["layers"])
    # keep the worst layer in float and run again: its MatMul reads float weights now
    report = calibrate_bundle(b, frames_dir, samples=4, holdout=2, method="minmax", min_cosine=0.0,
                              exclude=[worst["layer"]], **dict(FAST, e2e_frames=0))
    man = load_bundle(b).manifest
    assert man["graphs"]["vision.int8"]["quantization"]["kept_float"] == ["model.vision_backbone.image_vit.patch_embedding",
                                                                          worst["layer"]]
    assert worst["layer"] not in [l["layer"] for l in report["layers"]]
    q = onnx.load(os.path.join(b, "vision.int8.onnx"), load_external_data=False)
    mm = [n for n in q.graph.node if n.op_type == "MatMul" and n.input[1] == worst["layer"] + ".weight"]
    assert len(mm) == 1
    assert read_cache(os.path.join(b, "calibration", "vision.cache")).header == "TRT-100300-MinMaxCalibration"
    assert man["calibration"]["method"] == "minmax" and man["calibration"]["excluded"] == [worst["layer"]]


def test_minmax_scales_match_an_independent_computation(calibrated, frames_dir, tmp_path):
    """images' and image_masks' scales are max |x| / 127 over the calibration crops, bit for bit."""
    b = str(tmp_path / "b")
    shutil.copytree(calibrated[0], b)
    calibrate_bundle(b, frames_dir, samples=5, holdout=2, method="minmax", min_cosine=0.0, **dict(FAST, e2e_frames=0))
    cal = load_bundle(b).manifest["calibration"]
    frames = json.load(open(os.path.join(b, "calibration", "frames.json")))
    m = Molmo.load(b)
    amax = {"images": 0.0, "image_masks": 0.0}
    for f in frames["calibration"]:
        crops = m.processor.image(cv2.imread(f["origin"])[:, :, ::-1], max_crops=1)
        amax["images"] = max(amax["images"], float(np.abs(crops.images).max()))
        amax["image_masks"] = max(amax["image_masks"], float(np.abs(crops.image_masks).max()))
    cache = read_cache(os.path.join(b, cal["caches"][0]["file"]))
    for name, a in amax.items():
        assert cache.scales[name] == np.float32(a / 127.0)


def test_interrupted_calibration_leaves_bundle_as_it_was(calibrated, frames_dir, tmp_path, monkeypatch):
    import molmo_edge.calibration.calibrate as cal
    b = str(tmp_path / "b")
    shutil.copytree(calibrated[0], b)
    before = _snapshot(b)

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cal, "build_qdq_model", boom)
    with pytest.raises(KeyboardInterrupt):
        calibrate_bundle(b, frames_dir, samples=3, holdout=1, **dict(FAST, e2e_frames=0))
    assert _snapshot(b) == before


def test_crash_inside_commit_still_leaves_a_loadable_bundle(calibrated, frames_dir, tmp_path, monkeypatch):
    import molmo_edge.calibration.staging as staging
    b = str(tmp_path / "b")
    shutil.copytree(calibrated[0], b)
    real, calls = os.replace, []

    def flaky(src, dst):
        if ".molmo-edge-staging" not in str(dst):  # the commit's renames into the bundle
            calls.append(dst)
            if len(calls) == 3:  # after the unlisting manifest and the first file
                raise OSError("disk full")
        return real(src, dst)

    monkeypatch.setattr(staging.os, "replace", flaky)
    with pytest.raises(OSError):
        calibrate_bundle(b, frames_dir, samples=3, holdout=1, min_cosine=0.0, **dict(FAST, e2e_frames=0))
    monkeypatch.setattr(staging.os, "replace", real)
    man = load_bundle(b).manifest  # sizes of every listed graph verified
    assert "vision.int8" not in man["graphs"] and "calibration" not in man and "decoder.int4" in man["graphs"]
    Molmo.load(b).ask("Hi", scene(3, 120, 160), max_new_tokens=2)
    quantize_decoder_weights(b, 8, 32, **QUIET)  # the next update of the bundle works
    assert {"decoder.int4", "decoder.int8"} <= set(load_bundle(b).manifest["graphs"])


def test_frame_selection_is_seeded_spread_and_drops_near_duplicates(tmp_path):
    d = tmp_path / "f"
    write_images(str(d), 10, seed=0, height=200, width=260)
    rng = np.random.default_rng(5)
    for i in range(10):  # a noisy second shot of every scene: a near-duplicate
        img = scene(i, 200, 260).astype(np.float32) + rng.normal(0, 2, (200, 260, 3))
        cv2.imwrite(str(d / f"frame_{i:04d}_b.png"), np.clip(img, 0, 255).astype(np.uint8)[:, :, ::-1])
    a = select_frames(str(d), samples=6, holdout=2, seed=1)
    again = select_frames(str(d), samples=6, holdout=2, seed=1)
    other = select_frames(str(d), samples=6, holdout=2, seed=2)
    key = lambda fs: ([f.sha256 for f in fs.calibration], [f.sha256 for f in fs.holdout])  # noqa: E731
    assert key(a) == key(again) and key(a) != key(other)
    frames = a.calibration + a.holdout
    assert len(a.calibration) == 6 and len(a.holdout) == 2 and a.duplicates >= 1
    scenes = {os.path.basename(f.origin)[:10] for f in frames}
    assert len(scenes) == 8  # never two shots of one scene
    for f in frames:
        assert f.sha256 == _hash(f.rgb)


def test_video_frames_spread_and_static_camera_refused(tmp_path):
    four = write_video(str(tmp_path / "four.avi"), 80, scenes=4, seed=3)
    fs = select_frames(four, samples=6, holdout=2)
    idx = sorted(int(f.origin.split("=")[1]) for f in fs.calibration + fs.holdout)
    assert len(idx) == 4 and {i * 4 // 80 for i in idx} == {0, 1, 2, 3}  # one frame per scene, all of the video
    assert any("only 4 distinct frames" in w for w in fs.warnings)
    static = write_video(str(tmp_path / "static.avi"), 60, scenes=1, seed=4)
    with pytest.raises(CalibrationError, match="1 distinct frame.*near-duplicates"):
        select_frames(static, samples=200, holdout=8)


def test_bad_calibration_input_is_a_clear_error(base_bundle, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CalibrationError, match="has no images"):
        calibrate_bundle(base_bundle, str(empty), **QUIET)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00not a video" * 200)
    with pytest.raises(CalibrationError, match="cannot read video"):
        calibrate_bundle(base_bundle, str(bad), **QUIET)
    one = tmp_path / "one"
    write_images(str(one), 1, seed=9)
    with pytest.raises(CalibrationError, match="1 distinct frame"):
        calibrate_bundle(base_bundle, str(one), **QUIET)
    tiny = tmp_path / "tiny"
    write_images(str(tiny), 6, seed=20, height=16, width=16)
    with pytest.raises(CalibrationError, match=r"tiny \(16x16 px"):
        calibrate_bundle(base_bundle, str(tiny), dedup=0, **QUIET)
    with pytest.raises(CalibrationError, match="does not exist"):
        calibrate_bundle(base_bundle, str(tmp_path / "nowhere"), **QUIET)
    with pytest.raises(CalibrationError, match="matches no quantizable layer"):
        calibrate_bundle(base_bundle, str(one), exclude=["resblocks.99"], **QUIET)
    # a few unreadable files among good ones: skipped with a warning, not fatal
    mixed = tmp_path / "mixed"
    write_images(str(mixed), 4, seed=30, height=200, width=260)
    (mixed / "zz_corrupt.jpg").write_bytes(b"\xff\xd8 garbage")
    fs = select_frames(str(mixed), samples=2, holdout=1)
    assert fs.unreadable and any("unreadable" in w for w in fs.warnings)
    assert not [n for n in os.listdir(base_bundle) if n.startswith(".molmo-edge-staging")]


def test_prompts_file(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("# my prompts\nPoint to the forklift.\n\nHow many pallets are there?\nIs the door open?\n")
    got = [(x.text, x.kind) for x in load_prompts(str(p))]
    assert got == [("Point to the forklift.", "point"), ("How many pallets are there?", "count"), ("Is the door open?", "short")]
    j = tmp_path / "p.json"
    j.write_text(json.dumps(["Count the boxes.", {"prompt": "What color is it?", "kind": "short"}]))
    assert [x.kind for x in load_prompts(str(j))] == ["count", "short"]
    (tmp_path / "e.txt").write_text("# nothing\n")
    with pytest.raises(CalibrationError, match="no prompts"):
        load_prompts(str(tmp_path / "e.txt"))


def test_cli_calibrate_and_quantize(base_bundle, frames_dir, tmp_path, capsys):
    from molmo_edge.runtime.cli.main import main
    b = str(tmp_path / "b")
    shutil.copytree(base_bundle, b)
    prompts = tmp_path / "p.txt"
    prompts.write_text("Point to the box.\nHow many boxes are there?\n")
    assert main(["quantize", b, "--weights", "int8", "--block-size", "64"]) == 0
    assert main(["calibrate", b, "--source", frames_dir, "--samples", "4", "--holdout", "1", "--max-crops", "1",
                 "--prompts", str(prompts), "--e2e-frames", "1", "--max-new-tokens", "4", "--method", "percentile",
                 "--trt-version", "10.13.3"]) == 0
    out = capsys.readouterr()
    assert out.out.strip().endswith(os.path.join("calibration", "report.json"))
    assert "projected features cosine" in out.err and "greedy answer agreement" in out.err
    man = load_bundle(b).manifest
    assert man["calibration"]["caches"] == [{"file": "calibration/vision.cache", "trt_version": "10.13.3",
                                             "header": "TRT-101303-EntropyCalibration2",
                                             "tensors": man["calibration"]["tensors"], "network": "vision.onnx"}]
    assert man["graphs"]["decoder.int8"]["precision"]["block_size"] == 64
    report = json.load(open(os.path.join(b, "calibration", "report.json")))
    assert [c["prompt"] for c in report["end_to_end"]["cases"]] == ["Point to the box.", "How many boxes are there?"]
    assert report["end_to_end"]["graphs"]["int8"] == ["vision.int8", "decoder.int8"]
    assert main(["calibrate", b, "--source", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_calibrate_end_to_end_reference_falls_back_when_the_float_decoder_does_not_fit(base_bundle, frames_dir, tmp_path,
                                                                                      monkeypatch, capsys):
    """A full-size bundle on CPU: the float decoder's reference would be OOM-killed, so both runs use the quantized one."""
    import molmo_edge.runtime.memory as memory
    from molmo_edge.runtime.cli.main import main
    b = str(tmp_path / "b")
    shutil.copytree(base_bundle, b)
    assert main(["quantize", b, "--weights", "int4"]) == 0
    real = memory.check_fits

    def float_is_too_big(manifest, cfg, graphs, name, *a, **kw):
        if not graphs["decoder"].startswith("decoder.int"):
            raise memory.InsufficientMemory(f"{name} needs about 28 GiB")
        return real(manifest, cfg, graphs, name, *a, **kw)
    monkeypatch.setattr(memory, "check_fits", float_is_too_big)
    assert main(["calibrate", b, "--source", frames_dir, "--samples", "4", "--holdout", "1", "--max-crops", "1",
                 "--e2e-frames", "1", "--max-new-tokens", "4"]) == 0
    assert "does not fit this machine's memory" in capsys.readouterr().err
    e = json.load(open(os.path.join(b, "calibration", "report.json")))["end_to_end"]
    assert e["graphs"] == {"fp32": ["vision", "decoder.int4"], "int8": ["vision.int8", "decoder.int4"]}
    assert "decoder.int4" in e["reference_note"] and e["summary"]["cases"] == len(e["cases"]) > 0


def test_camera_is_recorded_until_enough_distinct_frames(monkeypatch):
    import molmo_edge.runtime.cameras as sources

    class FakeCamera:  # the runtime's Source interface: read(timeout) -> Frame(id, rgb, timestamp), close()
        def __init__(self, scenes, per_scene):
            self.rng, self.i, self.closed = np.random.default_rng(0), 0, False
            self.bases = [scene(40 + s, 120, 160).astype(np.float32) for s in range(scenes)]
            self.per_scene = per_scene

        def read(self, timeout=None):
            base = self.bases[min(self.i // self.per_scene, len(self.bases) - 1)]
            self.i += 1
            rgb = np.clip(base + self.rng.normal(0, 2, base.shape), 0, 255).astype(np.uint8)
            return sources.Frame(self.i, rgb, 0.0)

        def close(self):
            self.closed = True

    cams = []

    def fake_open(uri, **kw):
        cams.append(FakeCamera(*((4, 20) if uri == "/dev/video9" else (1, 10))))
        return cams[-1]

    monkeypatch.setattr(sources, "open_source", fake_open)
    fs = select_frames("/dev/video9", samples=2, holdout=1)
    assert fs.kind == "camera" and len(fs.calibration) + len(fs.holdout) == 3 and cams[0].closed
    assert cams[0].i == 41  # stopped at the first frame of the third scene: 3 distinct frames recorded
    assert fs.duplicates == 38 and all(f.origin.startswith("camera:/dev/video9#read=") for f in fs.calibration)
    with pytest.raises(CalibrationError, match="1 distinct frame"):
        select_frames("/dev/video8", samples=2, holdout=1, camera_reads=40)  # a static camera


def test_calibrate_a_bundle_exported_straight_to_int4(tiny_checkpoints, frames_dir, tmp_path, capsys):
    """`export --weights int4` writes no float decoder: the end-to-end reference runs the INT4 one."""
    from molmo_edge.runtime.cli.main import main
    b = str(tmp_path / "b")
    assert main(["export", tiny_checkpoints["molmoe-1b"], "-o", b, "--weights", "int4", "--no-check"]) == 0
    assert main(["calibrate", b, "--source", frames_dir, "--samples", "4", "--holdout", "1", "--max-crops", "1",
                 "--e2e-frames", "1", "--max-new-tokens", "4", "--min-cosine", "0.5"]) == 0
    assert "is not in this bundle" in capsys.readouterr().err
    e = json.load(open(os.path.join(b, "calibration", "report.json")))["end_to_end"]
    assert e["graphs"] == {"fp32": ["vision", "decoder.int4"], "int8": ["vision.int8", "decoder.int4"]}


def test_tap_bytes_from_shapes_equal_what_a_tapped_run_returns(base_bundle, frames_dir):
    from molmo_edge.calibration.stats import graph_info, run_tapped, tap_bytes, tapped_session
    from molmo_edge.calibration.vision_feeds import VisionFeeds
    b = load_bundle(base_bundle)
    path = b.graph_path("vision")
    info = graph_info(onnx.load(path, load_external_data=False))
    proc = VisionFeeds(base_bundle, b.config)
    pixels, masks = proc.crops(scene(3, 240, 320), None)
    sess = tapped_session(path, info.activations)
    for n in (1, 2):
        feeds = next(proc.batches(pixels, masks, n))
        got = run_tapped(sess, feeds, info.activations)
        assert tap_bytes(info.model, info.activations, feeds) == sum(v.nbytes for v in got.values()) > 0


def test_calibrate_that_would_not_fit_refuses_before_the_statistics(base_bundle, frames_dir, tmp_path, monkeypatch):
    """Memory short for the tapped run, or for the end-to-end answers: one line, before any graph runs, bundle unchanged."""
    import molmo_edge.calibration.stats as stats
    import molmo_edge.runtime.machine as machine
    b = str(tmp_path / "b")
    shutil.copytree(base_bundle, b)
    before = _snapshot(b)

    def no_run(*a, **kw):
        raise AssertionError("the statistics pass started")
    monkeypatch.setattr(stats, "tapped_session", no_run)
    monkeypatch.setattr("molmo_edge.calibration.calibrate.tapped_session", no_run)
    monkeypatch.setattr(machine, "mem_available", lambda *a: 1 << 20)
    with pytest.raises(CalibrationError, match=r"calibrate needs about .* GiB .* activations .* but 0\.0 GiB are available"):
        calibrate_bundle(b, frames_dir, samples=4, holdout=1, e2e_frames=0, **QUIET)
    with pytest.raises(CalibrationError, match=r"end-to-end answers would not fit: run with --e2e-frames 0"):
        calibrate_bundle(b, frames_dir, samples=4, holdout=1, e2e_frames=1, **QUIET)
    assert _snapshot(b) == before
