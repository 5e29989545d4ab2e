"""Molmo2 bundles: export (vision graph with the pooling index, decoder with token_types), the
onnxruntime runtime against the golden outputs, cached generation and prefix reuse, check-trt."""
import json

import numpy as np
import pytest

pytest.importorskip("torch")

from molmo_edge.export.bundle import export_bundle  # noqa: E402
from molmo_edge.runtime.generate import GenerationOptions  # noqa: E402
from molmo_edge.runtime.molmo2_session import generate_tokens  # noqa: E402
from molmo_edge.runtime.session import Molmo  # noqa: E402

CASES = ("chelsea_point", "video_pan", "text_only")
quiet = dict(progress=lambda *_: None)


@pytest.fixture(scope="module")
def m2golden(golden):
    root = golden / "molmo2"
    if not (root / "ckpt-qwen3-tiny" / "model.safetensors").exists():
        pytest.skip(f"Molmo2 golden data not found under {root}")
    return root


@pytest.fixture(scope="module")
def golden_bundle(m2golden, tmp_path_factory):
    out = tmp_path_factory.mktemp("m2b") / "bundle"
    from molmo_edge.runtime.tensorrt.check import check_for_export
    manifest = export_bundle(str(m2golden / "ckpt-qwen3-tiny"), str(out), trt_check=check_for_export, **quiet)
    return str(out), manifest


def test_manifest_graphs_and_tensorrt_check(golden_bundle):
    _, manifest = golden_bundle
    g = manifest["graphs"]
    assert set(g) == {"vision", "decoder"}  # no decoder.fused: GroupQueryAttention takes no custom mask
    assert [i["name"] for i in g["vision"]["inputs"]] == ["pixel_values", "pooling"]
    assert g["vision"]["dynamic_axes"]["pooling"] == {0: "tokens", 1: "window"}
    assert "token_types" in [i["name"] for i in g["decoder"]["inputs"]]
    assert manifest["parity"]["max_abs_logit_diff"] < 1e-3
    for version in ("10.3", "10.13"):
        assert manifest["tensorrt_check"][version]["ok"], manifest["tensorrt_check"][version]["problems"]
    assert manifest["tokens"]["eos"] == 151645 and manifest["tokens"]["image"]["<im_patch>"] == 151938


@pytest.mark.parametrize("case", CASES)
def test_cli_forward_onnxruntime_matches_golden(m2golden, golden_bundle, tmp_path, case):
    from molmo_edge.runtime.cli.main import main

    out = tmp_path / "out.npz"
    assert main(["forward", golden_bundle[0], "--inputs", str(m2golden / "cases" / f"{case}.preprocess.npz"),
                 "-o", str(out), "--backend", "onnxruntime"]) == 0
    got, ref = np.load(out), np.load(m2golden / "cases" / "q3" / f"{case}.forward.npz")
    assert got["logits"].dtype == np.float32 and got["logits"].shape == ref["logits"].shape
    assert np.abs(got["logits"] - ref["logits"]).max() < 1e-3
    assert ("image_features" in got.files) == ("image_features" in ref.files)
    if "image_features" in ref.files:
        np.testing.assert_allclose(got["image_features"], ref["image_features"], rtol=1e-4, atol=1e-3)


def test_cached_generation_matches_golden_and_reuses_the_prefix(m2golden, golden_bundle):
    m = Molmo.load(golden_bundle[0])
    opts = GenerationOptions(max_new_tokens=8)
    for case in CASES:
        pre = np.load(m2golden / "cases" / f"{case}.preprocess.npz")
        arrays = {k: pre[k] for k in pre.files if pre[k].dtype != object and pre[k].dtype.kind != "U"}
        want = json.loads((m2golden / "cases" / "q3" / f"{case}.generate.json").read_text())["token_ids"]
        tokens, reason, first = generate_tokens(m, arrays, opts)
        assert (tokens, reason) == (want, "length"), case
        assert 0 < first["prefix_prefill"] <= first["prefill"]  # prefill counts the whole prompt, image prefix included
        runs, prefills = m.stats["vision_runs"], m.stats["prefix_prefills"]
        again, _, timings = generate_tokens(m, arrays, opts)  # same pixels and prefix: no vision, no image prefill
        assert again == want and (m.stats["vision_runs"], m.stats["prefix_prefills"]) == (runs, prefills)
        assert timings["vision"] == 0.0 and timings["prefix_prefill"] == 0.0


def test_device_io_path_passes_token_types(m2golden, golden_bundle):
    """The CUDA/TensorRT-provider path of the onnxruntime backend (KV cache and step inputs as device OrtValues;
    forced here on CPU OrtValues) uploads token_types too: the golden tokens."""
    from molmo_edge.runtime.backends.ort import OrtBackend
    from molmo_edge.runtime.bundle import load_bundle

    bundle = load_bundle(golden_bundle[0])
    m = Molmo(bundle, OrtBackend(bundle, device_io=True))
    assert m.backend.device_io is not None
    pre = np.load(m2golden / "cases" / "chelsea_point.preprocess.npz")
    arrays = {k: pre[k] for k in pre.files if pre[k].dtype.kind != "U"}
    want = json.loads((m2golden / "cases" / "q3" / "chelsea_point.generate.json").read_text())["token_ids"]
    assert generate_tokens(m, arrays, GenerationOptions(max_new_tokens=8))[0] == want
    assert ("h2d", "token_types", 8) in m.backend.device_io.copies  # the last decode step's single type


def test_olmo_backbone_bundle_matches_torch(tmp_path):
    """YaRN on layer 3 only, post-norm and full-width q/k norm through the decoder graph (the export self-check
    compares it with the torch model, which the numpy reference checks in test_molmo2_model.py)."""
    import torch

    from molmo_edge.export.checkpoint import load_reference_model
    from molmo_edge.export.molmo2_export import check_request
    from molmo_edge.export.synthetic import make_random_checkpoint

    ckpt = make_random_checkpoint(str(tmp_path / "ckpt"), "molmo2-o-7b", seed=5)
    manifest = export_bundle(ckpt, str(tmp_path / "b"), **quiet)
    assert manifest["parity"]["max_abs_logit_diff"] < 1e-3 and list(manifest["config"]["rope_scaling_layers"]) == [3]
    model, cfg, _ = load_reference_model(ckpt)
    inputs = check_request(cfg, seed=3)
    inputs["input_ids"] = np.concatenate([inputs["input_ids"], np.arange(50, 90)[None]], 1)  # longer: YaRN bites
    inputs["mm_token_type_ids"] = np.pad(inputs["mm_token_type_ids"], ((0, 0), (0, 40)))
    got = Molmo.load(str(tmp_path / "b")).forward(inputs)
    with torch.no_grad():
        want = model(**inputs).logits[0].numpy()
    assert np.abs(got["logits"] - want).max() < 1e-3
    # weight-only INT4 decoder: same inputs (token_types included), the runtime picks it by precision
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights
    quantize_decoder_weights(str(tmp_path / "b"), 4, block_size=32, progress=lambda *_: None)
    q = Molmo.load(str(tmp_path / "b"), precision="int4")
    assert q.backend.graphs["decoder"] == "decoder.int4"
    assert np.isfinite(q.forward(inputs)["logits"]).all()
    # larger than memory: the self-check runs on the first decoder layers only (here 2 of 4)
    short = export_bundle(ckpt, str(tmp_path / "b2"), check_layers=2, **quiet)["parity"]
    assert (short["decoder_layers_checked"], short["decoder_layers"]) == (2, 4) and short["max_abs_logit_diff"] < 1e-3


def test_ask_images_and_video_through_the_processor(m2golden, golden_bundle, capsys):
    """Raw image / video -> Molmo2 processor -> bundle: the golden greedy tokens, and a second question about the
    same picture costs no vision pass and no image prefill."""
    from molmo_edge.runtime.cli.main import main

    want = {c: json.loads((m2golden / "cases" / "q3" / f"{c}.generate.json").read_text())["token_ids"]
            for c in ("chelsea_point", "video_pan")}
    m = Molmo.load(golden_bundle[0])
    image = str(m2golden / "inputs" / "chelsea.png")
    a = m.ask("Point to the eyes.", images=[image], max_new_tokens=8)
    assert a.token_ids == want["chelsea_point"] and a.prompt_tokens == 564 and a.image_size == (451, 300)
    m.ask("How many eyes?", images=[image], max_new_tokens=2)
    assert (m.stats["vision_runs"], m.stats["prefix_prefills"]) == (1, 1)
    assert main(["ask", golden_bundle[0], "Describe this video.", "--video", str(m2golden / "inputs" / "video_astronaut_pan.npz"),
                 "--max-new-tokens", "8", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == want["video_pan"] and out["prompt_tokens"] == 716 and out["backend"] == "onnxruntime"


def test_tensorrt_backend_bookkeeping_with_stand_ins(m2golden, golden_bundle, tmp_path):
    """Engines built through the TensorRT layer against test_trt_backend's stand-ins (their engines run the ONNX
    graphs with onnxruntime and refuse shapes outside the active profile): profiles, buffers and the
    token_types / pooling bindings are right, and the golden tokens come out (not TensorRT itself)."""
    import shutil

    from test_trt_backend import FakeCuda, FakeTrt, _build

    from molmo_edge.runtime.backends.trt import TrtBackend
    from molmo_edge.runtime.bundle import load_bundle

    folder = str(tmp_path / "bundle")
    shutil.copytree(golden_bundle[0], folder)
    cuda = FakeCuda()
    _build(folder, cuda=cuda, max_crops=3, max_seq=1024)
    bundle = load_bundle(folder)
    m = Molmo(bundle, TrtBackend(bundle, _trt=FakeTrt(cuda), _cuda=cuda))
    assert m.backend.max_vision_crops == 4  # the 8-frame video runs in two calls inside the profile
    for case in ("chelsea_point", "video_pan", "text_only"):
        pre = np.load(m2golden / "cases" / f"{case}.preprocess.npz")
        arrays = {k: pre[k] for k in pre.files if pre[k].dtype.kind != "U"}
        want = json.loads((m2golden / "cases" / "q3" / f"{case}.generate.json").read_text())["token_ids"]
        assert generate_tokens(m, arrays, GenerationOptions(max_new_tokens=8))[0] == want
    m.backend.close()


def test_several_images_and_fewer_crops_torch_equals_bundle(m2golden, golden_bundle):
    """Inputs the golden does not have: two images of other sizes at max_crops 2 (offsets across images, other
    tilings) through the processor; the bundle equals the torch reference."""
    import torch

    from molmo_edge.export.checkpoint import load_reference_model
    from molmo_edge.runtime.molmo2_processor import Molmo2Processor

    rng = np.random.default_rng(4)
    images = [rng.integers(0, 256, (200, 340, 3), np.uint8), rng.integers(0, 256, (420, 260, 3), np.uint8)]
    arrays = Molmo2Processor(golden_bundle[0]).process("Which one is brighter?", images, max_crops=2)
    assert len(arrays["image_grids"]) == 2
    got = Molmo.load(golden_bundle[0]).forward(arrays)
    model, _, _ = load_reference_model(str(m2golden / "ckpt-qwen3-tiny"))
    with torch.no_grad():
        want = model(**{k: arrays[k] for k in ("input_ids", "pixel_values", "image_token_pooling", "mm_token_type_ids")})
    assert np.abs(got["logits"] - want.logits[0].numpy()).max() < 1e-3
    np.testing.assert_allclose(got["image_features"], want.image_features[0].numpy(), rtol=1e-4, atol=1e-3)


def test_int8_vision_calibration(golden_bundle, tmp_path):
    """calibrate on a Molmo2 bundle: per-crop feeds with a 2x2 pooling of each crop's own grid, the Q/DQ vision
    graph registered as vision.int8 and used by --precision int8 (features close to fp32 on held-out frames)."""
    import shutil

    from molmo_edge.calibration.calibrate import calibrate_bundle
    from molmo_edge.calibration.scenes import write_images

    folder = str(tmp_path / "bundle")
    shutil.copytree(golden_bundle[0], folder)
    frames = str(tmp_path / "frames")
    write_images(frames, 6, seed=7, height=200, width=260)
    report = calibrate_bundle(folder, frames, samples=3, holdout=2, max_crops=1, e2e_frames=1, max_new_tokens=4,
                              min_cosine=0.9, progress=lambda *_: None)
    assert report["threshold"]["passed"] and report["features"]["cosine"]["worst"] > 0.9
    from molmo_edge.runtime.backends.ort import OrtBackend
    from molmo_edge.runtime.bundle import GraphChoice, load_bundle
    b = load_bundle(folder)  # the INT8 vision graph with the float decoder (--precision int8 also needs decoder.int8)
    m = Molmo(b, OrtBackend(b, choice=GraphChoice("vision.int8", "decoder", "fp32", "test")))
    assert m.backend.graphs["vision"] == "vision.int8"
    arrays = _one_image_request(folder, frames)
    f32 = Molmo.load(folder).forward(arrays)["image_features"]
    i8 = m.forward(arrays)["image_features"]
    cos = (f32 * i8).sum() / np.sqrt((f32 * f32).sum() * (i8 * i8).sum())
    assert i8.shape == f32.shape and cos > 0.9


def _one_image_request(folder, frames):
    import os

    from molmo_edge.runtime.molmo2_processor import Molmo2Processor
    first = sorted(os.listdir(frames))[0]
    return Molmo2Processor(folder).process("Describe.", [os.path.join(frames, first)], max_crops=1)


def test_bench_runs_every_molmo2_stage(tmp_path):
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.device.bench import format_table, run_bench, sample_frame

    ckpt = make_random_checkpoint(str(tmp_path / "ckpt"), "molmo2-8b", seed=2)
    export_bundle(ckpt, str(tmp_path / "b"), **quiet)
    res = run_bench(Molmo.load(str(tmp_path / "b")), sample_frame(), runs=1, decode_tokens=2, reduced_crops=2)
    s = res["stages"]
    assert s["crops"] > s["crops_at_max_crops_2"] == 3 and s["vision_ms_clip_16_frames"]["median"] > 0
    assert s["prefill_tokens"] > 200 and s["decode_tokens_per_s"]["median"] > 0
    assert "16-frame clip" in format_table(res)


def test_vision_runs_in_chunks_of_whole_frames_and_images(m2golden, golden_bundle):
    """A video (or several images) is cut into vision calls of at most the backend's crop limit, only between
    frames / images; the features equal one call's."""
    from molmo_edge.runtime.molmo2_session import media_features, pooling_chunks

    pre = np.load(m2golden / "cases" / "video_pan.preprocess.npz")
    runs = pooling_chunks(pre["video_token_pooling"], 729, 3)
    assert [(c0, c1) for _, _, c0, c1 in runs] == [(0, 3), (3, 6), (6, 8)] and runs[-1][1] == 648
    chelsea = np.load(m2golden / "cases" / "chelsea_point.preprocess.npz")["image_token_pooling"]
    assert pooling_chunks(chelsea, 729, 2) == [(0, 518, 0, 3)]  # one image is never cut
    m = Molmo.load(golden_bundle[0])
    arrays = {k: pre[k] for k in ("pixel_values_videos", "video_token_pooling")}
    whole = m.backend.vision_pooled(arrays["pixel_values_videos"], arrays["video_token_pooling"])
    m.backend.max_vision_crops = 3
    np.testing.assert_allclose(media_features(m, arrays), whole, rtol=1e-5, atol=1e-4)


def test_watch_clip_asks_about_the_last_seconds_as_a_video(m2golden, golden_bundle, tmp_path):
    """watch --clip: the last second of a (real-time) video file as a Molmo2 video, one vision pass for both
    prompts, the clip described on each line; a v1 model or a source without history is refused in one line."""
    import cv2

    from molmo_edge.runtime.cameras import open_source
    from molmo_edge.runtime.cli.main import main
    from molmo_edge.runtime.errors import MolmoEdgeError
    from molmo_edge.runtime.serve.watch import watch

    frames = np.load(m2golden / "inputs" / "video_astronaut_pan.npz")["frames"]  # [16, 144, 192, 3] RGB
    path = str(tmp_path / "pan.avi")
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 8.0, (192, 144))
    for f in frames:
        w.write(np.ascontiguousarray(f[:, :, ::-1]))
    w.release()
    m = Molmo.load(golden_bundle[0])
    lines = []
    with open_source(path, history=1.0) as src:
        s = watch(m, src, ["Describe this video.", "How many people?"], clip=1.0, max_new_tokens=3, emit=lines.append)
    assert s.answers == len(lines) >= 2 and lines[0]["prompt"] == "Describe this video."
    c = lines[0]["clip"]
    assert 2 <= c["frames"] <= 5 and 0.2 <= c["seconds"] <= 1.05   # history_fps 4: at most ~4 frames a second
    assert lines[0]["latency_ms"]["vision"] > 0 and lines[1]["latency_ms"]["vision"] == 0.0  # the second reuses it
    assert lines[1]["clip"] == c

    out = tmp_path / "clip.jsonl"
    assert main(["watch", golden_bundle[0], "--source", path, "--clip", "1", "--prompt", "Describe this video.",
                 "--max-new-tokens", "2", "--max-frames", "1", "--jsonl", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["clip"]["frames"] >= 2

    class V1:
        class cfg:
            is_molmo2, family = False, "molmoe-1b"
    with open_source(path, history=1.0) as src:
        with pytest.raises(MolmoEdgeError, match="needs a Molmo2 bundle"):
            watch(V1(), src, ["?"], clip=1.0)
    with open_source(path) as src:
        with pytest.raises(MolmoEdgeError, match="history"):
            watch(m, src, ["?"], clip=1.0)
