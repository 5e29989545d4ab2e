"""Weight-only INT4/INT8 decoder flavours (MatMulNBits): the quantizer, onnxruntime's reading of
it, the graph rewrite, the manifest, the runtime, atomicity."""
import hashlib
import os
import shutil

import numpy as np
import pytest
from conftest import export_tiny_bundles

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")
import onnxruntime as ort  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from molmo_edge.calibration import CalibrationError  # noqa: E402
from molmo_edge.calibration.weight_quant import (  # noqa: E402
    dequantize_blockwise, quantize_blockwise, quantize_decoder_weights, weight_kind)
from molmo_edge.export.bundle import export_bundle  # noqa: E402
from molmo_edge.runtime.bundle import load_bundle  # noqa: E402
from molmo_edge.runtime.session import Molmo  # noqa: E402

QUIET = dict(progress=lambda *_: None)


@pytest.fixture(scope="module")
def bundles(tiny_checkpoints, tmp_path_factory):
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("qbundles"), ("molmoe-1b", "molmo-7b-d"), fused=False)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 64, 128])
def test_blockwise_quantizer(bits, block):
    rng = np.random.default_rng(bits * block)
    k, n = 96, 40  # K not a multiple of 64/128: the last block is zero-padded
    w = rng.standard_normal((k, n)).astype(np.float32)
    w[:, 3] = 0.0  # an all-zero column
    b, s = quantize_blockwise(w, bits, block)
    nb = -(-k // block)
    assert b.shape == (n, nb, block * bits // 8) and b.dtype == np.uint8 and s.shape == (n * nb,)
    deq = dequantize_blockwise(b, s, bits, block, k)
    qmax = 7 if bits == 4 else 127
    scale = np.repeat(s.reshape(n, nb), block, axis=1)[:, :k].T
    assert (np.abs(w - deq) <= scale / 2 + 1e-6).all()
    assert np.all(np.abs(np.rint(deq / np.where(scale > 0, scale, 1))) <= qmax)
    assert (deq[:, 3] == 0).all()
    b2, s2 = quantize_blockwise(-w, bits, block)
    assert np.array_equal(dequantize_blockwise(b2, s2, bits, block, k), -deq)  # symmetric: no zero-point offset
    blocks = np.zeros((n, nb * block), np.float32)
    blocks[:, :k] = w.T
    np.testing.assert_allclose(s.reshape(n, nb), np.where((a := np.abs(blocks.reshape(n, nb, block)).max(-1)) > 0, a / qmax, 1),
                               rtol=1e-6)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("block", [32, 128])
def test_onnxruntime_reads_our_layout(bits, block):
    """MatMulNBits on our packed weights computes A @ dequantized(W) (no zero points = symmetric)."""
    rng = np.random.default_rng(7)
    k, n = 96, 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    b, s = quantize_blockwise(w, bits, block)
    node = helper.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=0)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(b, "B"), numpy_helper.from_array(s, "S")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)])
    m.ir_version = 10
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    a = rng.standard_normal((5, k)).astype(np.float32)
    np.testing.assert_allclose(sess.run(None, {"A": a})[0], a @ dequantize_blockwise(b, s, bits, block, k), rtol=1e-4, atol=1e-4)
    assert sess.run(None, {"A": np.zeros((0, k), np.float32)})[0].shape == (0, n)  # experts no token was routed to


def _decoder_feeds(bundle, t=6):
    cfg = bundle.config
    rng = np.random.default_rng(3)
    feeds = {"inputs_embeds": np.asarray(bundle.embeddings()[rng.integers(0, cfg.vocab_size, t)], np.float32)[None],
             "position_ids": np.arange(t, dtype=np.int64)[None], "logit_positions": np.arange(t, dtype=np.int64)}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros((1, 0, cfg.n_kv_heads, cfg.head_dim), np.float32)
    return feeds


@pytest.mark.parametrize("family,experts", [("molmoe-1b", "qmoe"), ("molmoe-1b", "routed"), ("molmo-7b-d", "qmoe")])
def test_decoder_flavour_equals_float_decoder_with_dequantized_weights(bundles, family, experts, tmp_path):
    b = str(tmp_path / "b")
    shutil.copytree(bundles[family], b)
    entry = quantize_decoder_weights(b, 4, 32, accuracy_level=0, head="float", experts=experts,
                                     **QUIET)  # fp32 compute, float head: exact parity below
    bundle = load_bundle(b)
    cfg = bundle.config
    g = bundle.manifest["graphs"]["decoder.int4"]
    assert g == entry and g["file"] == "decoder.int4.onnx" and g["data"] == "decoder.int4.onnx.data"
    base = bundle.manifest["graphs"]["decoder"]
    assert g["inputs"] == base["inputs"] and g["outputs"] == base["outputs"] and g["opset"] == base["opset"]
    assert g["precision"] == {"weights": "int4", "compute": "fp32", "scheme": "symmetric, blockwise along the input dimension",
                              "block_size": 32, "accuracy_level": 0}
    per_layer = {"attention": 2, "ffn": 0 if cfg.is_moe else 2, "experts": 3 * cfg.moe_num_experts}
    assert g["quantization"]["quantized"] == {**{k: v * cfg.n_layers for k, v in per_layer.items()}, "head": 0}
    q = onnx.load(os.path.join(b, "decoder.int4.onnx"), load_external_data=False)
    ops = [n.op_type for n in q.graph.node]
    qmoe = cfg.is_moe and experts == "qmoe"  # a layer's experts in one QMoE node, the routed branches gone
    assert ops.count("QMoE") == (cfg.n_layers if qmoe else 0)
    assert ops.count("MatMulNBits") == sum(g["quantization"]["quantized"].values()) - (per_layer["experts"] * cfg.n_layers if qmoe else 0)
    assert g["quantization"]["experts_op"] == ("com.microsoft.QMoE" if qmoe else None)
    if qmoe:
        assert "NonZero" not in ops and g["nodes"] < 0.4 * load_bundle(bundles[family]).manifest["graphs"]["decoder"]["nodes"]
    float_mm = [n.input[1] for n in q.graph.node if n.op_type == "MatMul" and n.input[1].endswith(".weight")]
    assert sorted(float_mm) == sorted(["lm_head.weight"] +
                                      ([f"model.transformer.blocks.{i}.mlp.gate.weight" for i in range(cfg.n_layers)]
                                       if cfg.is_moe else []))
    assert g["quantization"]["weight_bytes_after"] < g["quantization"]["weight_bytes_before"] / 5
    # the float decoder with every quantized weight replaced by its dequantized value gives the same logits
    ref = onnx.load(bundle.graph_path("decoder"))
    for t in ref.graph.initializer:
        w = numpy_helper.to_array(t)
        if weight_kind(t.name, "lm_head.weight"):  # attention, FFN and expert weights
            bq, s = quantize_blockwise(w, 4, 32)
            t.CopyFrom(numpy_helper.from_array(dequantize_blockwise(bq, s, 4, 32, w.shape[0]), t.name))
    onnx.save_model(ref, str(tmp_path / "deq.onnx"), save_as_external_data=True, location="deq.onnx.data")
    feeds = _decoder_feeds(bundle)
    want = ort.InferenceSession(str(tmp_path / "deq.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    got = ort.InferenceSession(bundle.graph_path("decoder.int4"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    fp32 = ort.InferenceSession(bundle.graph_path("decoder"), providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]
    assert np.abs(fp32 - got).max() > 1e-3  # and they are not the fp32 logits: the weights really are 4-bit
    # the runtime runs it, KV cache and all
    m = Molmo.load(b, precision="int4")
    assert m.backend.graphs["decoder"] == "decoder.int4"
    ans = m.ask("Point to the cup.", np.full((200, 300, 3), 128, np.uint8), max_new_tokens=5)
    assert len(ans.token_ids) >= 1
    assert entry["check"]["positions"] == 8 and 0 < entry["check"]["logit_cosine"] <= 1


def test_int8_flavour_and_fp16_bundle(tiny_checkpoints, tmp_path):
    b = str(tmp_path / "b16")
    export_bundle(tiny_checkpoints["molmo-7b-o"], b, dtype="fp16", fused=False, **QUIET)
    entry = quantize_decoder_weights(b, 8, 64, **QUIET)
    assert entry["precision"]["weights"] == "int8" and entry["precision"]["accuracy_level"] == 4
    q = onnx.load(os.path.join(b, "decoder.int8.onnx"), load_external_data=False)
    nbits = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all({a.name: a.i for a in n.attribute}["bits"] == 8 for n in nbits)
    live = {x for n in q.graph.node for x in n.input}
    assert not [t.name for t in q.graph.initializer if t.data_type == TensorProto.FLOAT16 and t.name not in live]
    assert entry["check"]["logit_cosine"] > 0.99
    from molmo_edge.runtime.bundle import BundleError, select_graphs
    with pytest.raises(BundleError, match="no INT4 decoder.*quantize BUNDLE --weights int4"):
        select_graphs(load_bundle(b).manifest, "int4")  # no silent INT8-for-INT4 (or INT4-for-INT8) substitution
    assert select_graphs(load_bundle(b).manifest, "auto") == ("vision", "decoder")  # a tiny float decoder: kept
    with pytest.raises(BundleError, match="no INT8 vision graph"):  # --precision int8 also needs calibration
        Molmo.load(b, precision="int8")


def _snapshot(folder):
    return {n: hashlib.sha256(open(os.path.join(folder, n), "rb").read()).hexdigest() for n in sorted(os.listdir(folder))}


def test_interrupted_quantization_leaves_bundle_as_it_was(bundles, tmp_path, monkeypatch):
    import molmo_edge.calibration.weight_quant as wq
    b = str(tmp_path / "b")
    shutil.copytree(bundles["molmo-7b-d"], b)
    before = _snapshot(b)
    real = wq.quantize_graph

    def interrupted(*a, **k):
        real(*a, **k)  # the files are written into the staging folder, then Ctrl-C
        raise KeyboardInterrupt

    monkeypatch.setattr(wq, "quantize_graph", interrupted)
    with pytest.raises(KeyboardInterrupt):
        quantize_decoder_weights(b, 4, 32, **QUIET)
    assert _snapshot(b) == before


def test_quantize_errors(bundles):
    with pytest.raises(CalibrationError, match="int3 is not supported"):
        quantize_decoder_weights(bundles["molmo-7b-d"], 3, **QUIET)
    with pytest.raises(CalibrationError, match="--block-size 48"):
        quantize_decoder_weights(bundles["molmo-7b-d"], 4, 48, **QUIET)


def test_orin_size_int4_fp16_scales_and_quantized_head(bundles, tmp_path):
    b = str(tmp_path / "b")
    shutil.copytree(bundles["molmoe-1b"], b)
    plain = quantize_decoder_weights(b, 4, 32, **QUIET)
    small = quantize_decoder_weights(b, 4, 32, head="int8", scales="fp16", **QUIET)  # replaces decoder.int4
    assert small["quantization"]["quantized"]["head"] == 1 and small["quantization"]["scales"] == "fp16"
    assert small["data_bytes"] < plain["data_bytes"]
    q = onnx.load(os.path.join(b, "decoder.int4.onnx"), load_external_data=False)
    scales = [t for t in q.graph.initializer if t.name.endswith("_scales")]
    assert scales and all(t.data_type == TensorProto.FLOAT16 for t in scales)
    assert small["check"]["logit_cosine"] > 0.9
    m = Molmo.load(b, precision="int4")
    assert len(m.ask("Point to the cup.", np.full((200, 300, 3), 128, np.uint8), max_new_tokens=3).token_ids) >= 1


@pytest.mark.parametrize("bits,block", [(4, 32), (8, 64)])
def test_wide_weights_are_quantized_a_column_slice_at_a_time_with_the_same_result(bits, block, monkeypatch):
    """An LM head's 152k columns go through in slices (memory); the bytes and scales equal one whole pass."""
    import molmo_edge.calibration.weight_quant as wq
    w = np.random.default_rng(1).standard_normal((100, 1000)).astype(np.float32)
    whole = quantize_blockwise(w, bits, block)
    monkeypatch.setattr(wq, "QUANT_COLUMNS", 96)  # 11 slices, the last one short
    sliced = quantize_blockwise(w, bits, block)
    assert np.array_equal(whole[0], sliced[0]) and np.array_equal(whole[1], sliced[1])


def test_quantize_takes_the_fused_decoder_when_the_bundle_has_one(tiny_checkpoints, tmp_path):
    """A bundle with decoder.fused (dense models by default, MoE with --fused) gets its INT4 decoder from it: the
    GroupQueryAttention layout, the float MoE node rewritten as QMoE. Same weights, same logits as the INT4 decoder
    quantize makes from the portable graph (fp32 compute)."""
    b = str(tmp_path / "m")
    export_bundle(tiny_checkpoints["molmoe-1b"], b, fused=True, **QUIET)
    portable = str(tmp_path / "p")
    shutil.copytree(b, portable)
    fused_entry = quantize_decoder_weights(b, 4, 32, accuracy_level=0, **QUIET)
    assert fused_entry["kv_layout"] == "bnsh-shared" and fused_entry["quantization"]["source_graph"] == "decoder.fused"
    assert fused_entry["quantization"]["experts_op"] == "com.microsoft.QMoE"
    ops = [n.op_type for n in onnx.load(os.path.join(b, "decoder.int4.onnx"), load_external_data=False).graph.node]
    assert "MoE" not in ops and ops.count("QMoE") == load_bundle(b).config.n_layers
    assert fused_entry["check"]["logit_cosine"] > 0.95
    routed = quantize_decoder_weights(portable, 4, 32, accuracy_level=0, experts="routed", **QUIET)
    assert routed["quantization"]["source_graph"] == "decoder" and "kv_layout" not in routed
    img = np.full((200, 300, 3), 128, np.uint8)
    a, c = Molmo.load(b, precision="int4"), Molmo.load(portable, precision="int4")
    assert a.cache.layout == "bnsh" and c.cache.layout == "bsnh"
    inputs = a.processor.process("Count the boxes.", img)
    assert np.abs(a.forward(inputs)["logits"] - c.forward(inputs)["logits"]).max() < 1e-3


def test_fp16_checkpoint_exports_what_its_float32_copy_does(tmp_path, monkeypatch):
    """An fp16 checkpoint's LM head is handed to the writer as fp16 and converted a slice of columns at a time
    (a whole float32 copy was 2.2 GB for Molmo-7B-D); the bundle must be byte for byte the one its exact float32
    copy gives, checkpoint digest included. Small slices make the tiny head take the sliced path."""
    from safetensors.torch import load_file, save_file

    from molmo_edge.calibration import weight_quant
    from molmo_edge.calibration.weight_quant import make_quantizer
    from molmo_edge.export.synthetic import make_random_checkpoint
    monkeypatch.setattr(weight_quant, "QUANT_COLUMNS", 64)
    half = make_random_checkpoint(str(tmp_path / "half"), "molmo-7b-d", dtype="float16", seed=3)
    full = str(tmp_path / "full")
    shutil.copytree(half, full)
    for f in os.listdir(full):
        if f.endswith(".safetensors"):
            save_file({k: v.float() for k, v in load_file(os.path.join(full, f)).items()}, os.path.join(full, f))
    out = {}
    for name, ck in (("half", half), ("full", full)):
        out[name] = str(tmp_path / f"{name}.bundle")
        export_bundle(ck, out[name], dtype="fp16", quantizer=make_quantizer(4), check=False, **QUIET)
    digests = [load_bundle(b).manifest["model"]["weights_sha256"] for b in out.values()]
    assert digests[0] == digests[1]
    for f in ("decoder.int4.onnx.data", "embeddings.npy", "vision.onnx.data"):
        files = [open(os.path.join(b, f), "rb").read() for b in out.values()]
        assert files[0] == files[1], f
