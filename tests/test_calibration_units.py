"""TensorRT calibration cache format (our writer and reader), activation statistics and scale methods."""
import struct

import numpy as np
import pytest

from molmo_edge.calibration import CalibrationError
from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.calibration.stats import (BINS, TensorStats, _kl_at, amax_of, entropy_amax, kl_divergences,
                                          scales_from)
from molmo_edge.calibration.trt_cache import (format_cache, hex_to_scale, parse_cache, read_cache, scale_to_hex,
                                              version_int, version_str, write_cache)


def test_cache_round_trips_bit_exactly(tmp_path):
    rng = np.random.default_rng(0)
    scales = {f"/blocks.{i}/mlp/fc1/MatMul_output_{i}": float(np.float32(v))
              for i, v in enumerate(np.exp(rng.uniform(-30, 20, 500)))}
    scales.update({"images": 1 / 127, "weird: name: with colons": 3.5e-38, "max": float(np.finfo(np.float32).max)})
    path = str(tmp_path / "vision.cache")
    header = write_cache(path, scales, "10.3.0", "EntropyCalibration2")
    assert header == "TRT-100300-EntropyCalibration2"
    cache = read_cache(path)
    assert cache.version == 100300 and cache.algorithm == "EntropyCalibration2" and list(cache.scales) == list(scales)
    for name, s in scales.items():
        got = cache.scales[name]
        assert got.dtype == np.float32 and struct.pack(">f", got) == struct.pack(">f", s)
    text = open(path, "rb").read()
    assert format_cache(cache.scales, cache.version, cache.algorithm).encode() == text  # read -> write: same bytes
    lines = text.decode().split("\n")
    assert lines[-1] == "" and all(len(l.rsplit(": ", 1)[1]) == 8 for l in lines[1:-1])


def test_cache_hex_is_big_endian_scale():
    assert scale_to_hex(1.0) == "3f800000"
    assert hex_to_scale("3c010a14") == pytest.approx(1 / 127, rel=1e-3)  # a [0, 1] input's scale
    assert struct.unpack("<f", bytes.fromhex(scale_to_hex(0.25)))[0] != 0.25  # not little-endian


def test_cache_versions():
    assert version_int("10.3.0") == 100300 and version_int("10.13.3") == 101303 and version_int("8.6.1") == 8601
    assert version_int("10.3") == 100300 and version_str(101303) == "10.13.3" and version_str(8601) == "8.6.1"
    with pytest.raises(MolmoEdgeError, match="not like 10.3.0"):
        version_int("ten")


@pytest.mark.parametrize("bad", [0.0, -1e-3, float("nan"), float("inf")])
def test_cache_writer_refuses_bad_scales(bad):
    with pytest.raises(CalibrationError, match="finite scales > 0"):
        format_cache({"x": 0.1, "y": bad})


def test_cache_writer_refuses_weights_and_bad_names():
    with pytest.raises(CalibrationError, match="is a weight"):
        format_cache({"x": 0.1, "fc.weight": 0.2}, weights={"fc.weight"})
    for name in ("", "a\nb", " padded"):
        with pytest.raises(CalibrationError, match="cannot be written"):
            format_cache({name: 0.1})
    with pytest.raises(CalibrationError, match="unknown TensorRT calibration algorithm"):
        format_cache({"x": 0.1}, algorithm="Percentile")
    with pytest.raises(CalibrationError, match="no tensor scales"):
        format_cache({})


@pytest.mark.parametrize("text,err", [
    ("", "is empty"),
    ("TRT-100300\nx: 3c010a14\n", "not a TRT-<version>-<algorithm> header"),
    ("TRT-100300-EntropyCalibration2\nx: 3c010a1\n", "line 2"),
    ("TRT-100300-EntropyCalibration2\nx: 3c010a14\n\ny: 3c010a14\n", "line 3"),
    ("TRT-100300-EntropyCalibration2\nx 3c010a14\n", "line 2"),
    ("TRT-100300-EntropyCalibration2\nx: 3c010a14\nx: 3c010a14\n", "appears twice"),
])
def test_cache_reader_is_strict(text, err):
    with pytest.raises(CalibrationError, match=err):
        parse_cache(text)


def test_reader_rejects_binary(tmp_path):
    p = tmp_path / "calibration.flatbuffers"
    p.write_bytes(b"\x00\xff\x10binary")
    with pytest.raises(CalibrationError, match="not ASCII"):
        read_cache(str(p))


def test_histogram_grows_exactly_and_amax_is_exact():
    rng = np.random.default_rng(1)
    parts = [rng.standard_normal(5000) * s for s in (0.1, 1.0, 10.0, 0.5)]
    st = TensorStats()
    for p in parts:
        st.update(p.astype(np.float32))
    every = np.abs(np.concatenate(parts).astype(np.float32))
    assert st.amax == float(every.max()) and st.count == every.size == st.hist.sum()
    # the histogram equals one made directly with the final bin width
    idx = np.minimum((every / st.width).astype(np.int64), BINS - 1)
    assert (np.bincount(idx, minlength=BINS) == st.hist).all()
    assert st.width * BINS > st.amax


def test_scale_methods():
    rng = np.random.default_rng(2)
    x = rng.laplace(size=400_000).astype(np.float32)
    st = TensorStats()
    st.update(x)
    assert amax_of(st, "minmax") == float(np.abs(x).max())
    p = amax_of(st, "percentile", 99.9)
    assert abs(p - np.percentile(np.abs(x), 99.9)) <= st.width
    e = amax_of(st, "entropy")
    assert p / 2 < e < st.amax  # a heavy tail is clipped, not the bulk
    u = TensorStats()
    u.update(rng.uniform(-3, 3, 200_000).astype(np.float32))
    assert amax_of(u, "entropy") > 0.97 * u.amax  # nothing to gain from clipping a uniform distribution
    with pytest.raises(CalibrationError, match="unknown --method"):
        amax_of(st, "mse")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_kl_matches_the_per_bin_reference(seed):
    rng = np.random.default_rng(seed)
    data = [rng.standard_normal(100_000), rng.laplace(size=100_000),
            np.abs(rng.standard_cauchy(50_000))][seed]
    st = TensorStats()
    st.update(data.astype(np.float32))
    h = st.hist.astype(np.float64)
    tail = np.concatenate([np.cumsum(h[::-1])[::-1], [0.0]])
    cands = np.arange(128, BINS + 1)
    ref = np.array([_kl_at(h, tail, int(i), 128) for i in cands])
    got = kl_divergences(h, cands, 128)
    ok = np.isfinite(got)
    assert ok.sum() > 100 and np.allclose(got[ok], ref[ok], rtol=1e-3, atol=1e-9)
    best = int(cands[np.argmin(ref)])
    assert entropy_amax(st.hist, st.width, coarse=1) == pytest.approx((best + 0.5) * st.width)
    assert abs(entropy_amax(st.hist, st.width) - (best + 0.5) * st.width) <= 8 * st.width


def test_scales_refuse_degenerate_statistics():
    live, zero = TensorStats(), TensorStats()
    live.update(np.linspace(-2, 2, 100, dtype=np.float32))
    zero.update(np.zeros(100, np.float32))
    scales, zeros = scales_from({"a": live, "mask": zero, **{f"b{i}": live for i in range(5)}}, "minmax")
    assert zeros == ["mask"] and scales["mask"] == np.float32(1 / 127) and scales["a"] == np.float32(2 / 127)
    with pytest.raises(CalibrationError, match="degenerate"):
        scales_from({"a": live, "mask": zero}, "minmax", needed={"mask"})
    with pytest.raises(CalibrationError, match="degenerate"):
        scales_from({"a": live, "m1": zero, "m2": zero}, "minmax")
    nan = TensorStats()
    nan.update(np.array([np.nan, 1.0, -3.0, np.inf], np.float32))
    assert nan.amax == 3.0 and nan.nonfinite == 2


def test_fp16_bundle_calibrates_through_the_weight_casts(tiny_checkpoints, tmp_path):
    """fp16-weight bundles feed MatMuls through Cast nodes: those weights are quantized too."""
    pytest.importorskip("torch")
    import onnx

    from molmo_edge.calibration.calibrate import calibrate_bundle
    from molmo_edge.calibration.scenes import write_images
    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.runtime.session import Molmo

    b = str(tmp_path / "b16")
    export_bundle(tiny_checkpoints["molmo-7b-d"], b, dtype="fp16", fused=False, progress=lambda *_: None)
    write_images(str(tmp_path / "f"), 4, seed=50, height=200, width=260)
    report = calibrate_bundle(b, str(tmp_path / "f"), samples=3, holdout=1, max_crops=1, e2e_frames=0, min_cosine=0.9,
                              progress=lambda *_: None)
    q = onnx.load(f"{b}/vision.int8.onnx", load_external_data=False)
    weights = {t.name for t in q.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    assert not any(n.endswith((".wq.weight", ".w1.weight", ".w2.weight")) for n in weights)  # float copies gone
    assert sum(n.op_type == "DequantizeLinear" for n in q.graph.node) > 0
    assert report["features"]["cosine"]["worst"] >= 0.9
    from molmo_edge.runtime.backends.ort import OrtBackend
    from molmo_edge.runtime.bundle import GraphChoice, load_bundle
    bundle = load_bundle(b)  # the INT8 vision graph with the float decoder (no quantized decoder in this bundle)
    crops = Molmo(bundle, OrtBackend(bundle, choice=GraphChoice("vision.int8", "decoder", "fp32", "test")))
    assert crops.backend.graphs["vision"] == "vision.int8"
