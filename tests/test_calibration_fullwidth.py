"""Calibration on a full-width random vision tower: real ViT-L/14-336 shapes (1024 wide, 16 heads,
4096 MLP, 577 positions, 22 of 23 blocks for the [-2, -9] taps), pooling and projector; one crop
to calibrate, another to check. ~1.2 GB of weights, ~6 GB of peak memory."""
import os
import struct

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402

from molmo_edge.calibration.qdq import build_qdq_model, find_layers, select_layers  # noqa: E402
from molmo_edge.calibration.scenes import scene  # noqa: E402
from molmo_edge.calibration.stats import TensorStats, graph_info, run_tapped, scales_from, tapped_session  # noqa: E402
from molmo_edge.calibration.trt_cache import format_cache, read_cache, write_cache  # noqa: E402
from molmo_edge.export.graph import GraphBuilder  # noqa: E402
from molmo_edge.export.onnx_graphs import build_vision  # noqa: E402
from molmo_edge.export.synthetic import _random_tensor, family_config  # noqa: E402
from molmo_edge.runtime.config import config_from_hf  # noqa: E402
from molmo_edge.runtime.preprocess import preprocess_image  # noqa: E402
from molmo_edge.runtime.hf_names import vision_weight_shapes  # noqa: E402


@pytest.fixture(scope="module")
def full_vision(tmp_path_factory):
    cfg = config_from_hf(family_config("molmoe-1b", "full", n_layers=1))
    assert (cfg.vision.width, cfg.vision.heads, cfg.vision.mlp_dim, cfg.vision.num_pos) == (1024, 16, 4096, 577)
    folder = tmp_path_factory.mktemp("fullvit")
    shapes = vision_weight_shapes(cfg)
    rng = np.random.default_rng(0)
    g = GraphBuilder("vision", str(folder / "vision.onnx.data"), np.float32, 18)
    build_vision(g, cfg, lambda n: _random_tensor(n, shapes[n], rng))
    g.finish(str(folder / "vision.onnx"))
    return cfg, str(folder)


def test_full_width_cache_and_qdq_graph(full_vision):
    cfg, folder = full_vision
    src = os.path.join(folder, "vision.onnx")
    info = graph_info(onnx.load(src, load_external_data=False))
    layers, attention = find_layers(info)
    quant, kept = select_layers(layers)
    blocks = max(l % cfg.vision.layers for l in cfg.vit_layers) + 1
    # ViT blocks (fused wqkv, wo, w1, w2), pooling (wq, wk, wv, wo), projector (w1, w3, w2), patch embedding
    assert len(layers) == 4 * blocks + 4 + 3 + 1 and len(attention) == 2 * blocks + 2
    assert [l.name for l in kept] == ["model.vision_backbone.image_vit.patch_embedding"]

    crops = preprocess_image(scene(11), cfg, max_crops=1)        # global view + 1 crop
    check = preprocess_image(scene(12), cfg, max_crops=1)
    sess = tapped_session(src, info.activations)
    stats = {n: TensorStats() for n in info.activations}
    vals = run_tapped(sess, {"images": crops.images[1:2], "image_masks": crops.image_masks[1:2]}, info.activations)
    assert any(v.shape[-2:] == (577, 577) for v in vals.values())  # attention over all 577 positions
    for n in info.activations:
        stats[n].update(vals[n])
    del vals, sess
    scales, zero = scales_from(stats, "entropy", needed={l.input for l in quant})
    assert len(scales) == len(info.activations) > 700

    # the TensorRT cache round-trips bit for bit
    path = os.path.join(folder, "vision.cache")
    write_cache(path, scales, "10.3.0", "EntropyCalibration2", info.initializers)
    cache = read_cache(path)
    assert list(cache.scales) == list(scales)
    assert all(struct.pack(">f", cache.scales[n]) == struct.pack(">f", np.float32(s)) for n, s in scales.items())
    assert format_cache(cache.scales, cache.version, cache.algorithm) == open(path).read()

    # the Q/DQ graph: valid ONNX, per-channel int8 weights, runs in onnxruntime close to fp32
    dst = os.path.join(folder, "vision.int8.onnx")
    summary = build_qdq_model(src, dst, scales, quant)
    assert summary["layers"] == len(quant) and summary["int8_weight_bytes"] > 280e6
    onnx.checker.check_model(dst)
    q = onnx.load(dst, load_external_data=False)
    w1 = "model.vision_backbone.image_vit.transformer.resblocks.0.feed_forward.w1.weight"
    dims = {t.name: list(t.dims) for t in q.graph.initializer}
    assert dims[w1 + ".int8"] == [1024, 4096] and dims[w1 + ".qdq_scale"] == [4096] and w1 not in dims
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    feeds = {"images": check.images[:1], "image_masks": check.image_masks[:1]}
    ref = ort.InferenceSession(src, opts, providers=["CPUExecutionProvider"]).run(["image_features"], feeds)[0]
    got = ort.InferenceSession(dst, opts, providers=["CPUExecutionProvider"]).run(["image_features"], feeds)[0]
    assert got.shape == ref.shape == (1, 144, cfg.d_model)
    a, b = ref.ravel().astype(np.float64), got.ravel().astype(np.float64)
    cos = a @ b / np.sqrt((a @ a) * (b @ b))
    assert 0.95 < cos < 1 - 1e-6, cos
