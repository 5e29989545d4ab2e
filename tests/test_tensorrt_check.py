"""check-trt: the ONNX reader against the onnx package, our bundles against TensorRT 10.3/10.13's ONNX
parser tables, and one hand-built graph per rule that must be caught (with its node name)."""
import json
import os

import numpy as np
import pytest
from conftest import export_tiny_bundles

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from molmo_edge.runtime.tensorrt.check import (ONNX_TYPES, TRT_VERSIONS, TrtCheckError, check_bundle, check_for_export,  # noqa: E402
                                            check_graph, load_table, normalize_trt_version, read_onnx)

QUIET = dict(progress=lambda *_: None)


@pytest.fixture(scope="module")
def bundles(tiny_checkpoints, tmp_path_factory):
    # fused=True: the MoE bundle carries decoder.fused too (export writes it for dense models only by default),
    # so check-trt's "onnxruntime-only graph is skipped" path is exercised on both kinds
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("trt-bundles"),
                               ("molmoe-1b", "molmo-7b-d", "molmo-7b-o"), check=False, fused=True)


def _save(tmp_path, nodes, inputs, outputs, inits=(), opset=18, ir=8, name="g.onnx", domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)] +
                              [helper.make_opsetid(d, 1) for d in domains])
    model.ir_version = ir
    path = str(tmp_path / name)
    onnx.save_model(model, path)
    return path


def _check(path, v="10.3"):
    return check_graph(read_onnx(path), load_table(v), "g")


def _errors(probs):
    return [p for p in probs if p.severity == "error"]


F = TensorProto.FLOAT


def _vi(name, t=F, shape=(2, 3)):
    return helper.make_tensor_value_info(name, t, list(shape))


# --- the reader -------------------------------------------------------------------------------
def test_reader_matches_onnx_on_every_bundle_graph(bundles):
    for folder in bundles.values():
        man = json.load(open(os.path.join(folder, "manifest.json")))
        for key, info in man["graphs"].items():
            path = os.path.join(folder, info["file"])
            ours, ref = read_onnx(path), onnx.load(path, load_external_data=False)
            assert ours.ir_version == ref.ir_version
            assert ours.opsets == {o.domain: o.version for o in ref.opset_import}
            g, rg = ours.graph, ref.graph
            assert [n.op_type for n in g.nodes] == [n.op_type for n in rg.node]
            assert [n.name for n in g.nodes] == [n.name for n in rg.node]
            assert [n.domain for n in g.nodes] == [n.domain for n in rg.node]
            for n, rn in zip(g.nodes, rg.node):
                assert n.inputs == list(rn.input) and n.outputs == list(rn.output)
                for ra in rn.attribute:
                    val = helper.get_attribute_value(ra)
                    got = n.attrs[ra.name].value
                    if isinstance(val, bytes):
                        assert got == val.decode()
                    elif isinstance(val, float):
                        assert got == pytest.approx(val)
                    elif isinstance(val, list):
                        assert list(got) == pytest.approx(list(val))
                    elif isinstance(val, onnx.TensorProto):
                        assert got.dims == list(val.dims) and got.values() == pytest.approx(
                            numpy_helper.to_array(val).reshape(-1).tolist())
                    else:
                        assert got == val
            assert set(g.initializers) == {t.name for t in rg.initializer}
            for t in rg.initializer:
                mine = g.initializers[t.name]
                assert mine.dims == list(t.dims)
                assert mine.dtype == ONNX_TYPES[t.data_type]
                if t.data_location == TensorProto.EXTERNAL:
                    assert mine.external == {e.key: e.value for e in t.external_data}
                else:
                    assert mine.values() == pytest.approx(numpy_helper.to_array(t).reshape(-1).tolist())
            assert [(v.name, v.dtype) for v in g.inputs] == [(v.name, ONNX_TYPES[v.type.tensor_type.elem_type])
                                                            for v in rg.input]
            assert [v.shape for v in g.inputs] == [[d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                                                   for v in rg.input]


def test_reader_refuses_garbage(tmp_path):
    p = tmp_path / "bad.onnx"
    p.write_bytes(b"\xff" * 64)
    with pytest.raises(TrtCheckError, match="not a readable ONNX model"):
        read_onnx(str(p))
    with pytest.raises(TrtCheckError, match="cannot read"):
        read_onnx(str(tmp_path / "missing.onnx"))


def test_versions():
    assert normalize_trt_version("10.3.0.30") == "10.3" and normalize_trt_version("10.13") == "10.13"
    with pytest.raises(TrtCheckError, match="--trt 10.3 or --trt 10.13"):
        normalize_trt_version("8.6.2")
    t3, t13 = load_table("10.3"), load_table("10.13")
    assert (t3.opset_max, t13.opset_max) == (20, 22)
    assert not t3.ops["STFT"]["supported"] and t13.ops["STFT"]["supported"]
    assert not t13.ops["Attention"]["supported"]   # arrives in 10.14
    assert "0137504e" in t3.source and "10.15" in t13.source


# --- our bundles ------------------------------------------------------------------------------
@pytest.mark.parametrize("v", TRT_VERSIONS)
def test_bundles_pass(bundles, v):
    for fam in ("molmo-7b-d", "molmo-7b-o", "molmoe-1b"):
        rep = check_bundle(bundles[fam], v)
        assert rep.ok, [p.line() for p in rep.errors[:5]]
        assert set(rep.graphs) == {"vision", "decoder"}
        assert "decoder.fused" in rep.skipped and "onnxruntime" in rep.skipped["decoder.fused"]


@pytest.mark.parametrize("v", TRT_VERSIONS)
def test_moe_decoder_avoids_what_tensorrt_rejects(bundles, v):
    """The MoE decoder routes tokens with NonZero over a float mask and adds expert outputs back with a
    one-hot MatMul: no ScatterND reduction (rejected by 10.3, 'none' only from 10.9) and no BOOL NonZero."""
    model = onnx.load(os.path.join(bundles["molmoe-1b"], "decoder.onnx"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("NonZero") > 0 and "ScatterND" not in ops
    assert check_bundle(bundles["molmoe-1b"], v).ok


def test_check_for_export_summary(bundles):
    out = check_for_export(bundles["molmoe-1b"])
    assert set(out) == set(TRT_VERSIONS)
    assert out["10.3"]["ok"] is True and out["10.3"]["graphs"]["vision"]["ok"] is True and out["10.3"]["problems"] == []


def test_explicit_graph_and_unknown_graph(bundles):
    rep = check_bundle(bundles["molmo-7b-d"], "10.3", graphs=["decoder.fused"])
    assert not rep.ok and {p.rule for p in rep.errors} == {"custom_op"}
    with pytest.raises(TrtCheckError, match="no graph nope"):
        check_bundle(bundles["molmo-7b-d"], "10.3", graphs=["nope"])


def test_cli_check_trt(bundles, capsys):
    from molmo_edge.runtime.cli.main import main
    assert main(["check-trt", bundles["molmo-7b-d"]]) == 0
    assert "all graphs meant for TensorRT pass" in capsys.readouterr().out
    assert main(["check-trt", bundles["molmoe-1b"], "--trt", "10.13", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["10.13"]["ok"] is True and res["10.13"]["problems"] == []
    # a decoder.fused asked for explicitly is refused node by node (com.microsoft ops)
    assert main(["check-trt", bundles["molmoe-1b"], "--trt", "10.3", "--graph", "decoder.fused"]) == 1
    out = capsys.readouterr().out
    assert "GroupQueryAttention" in out and "node " in out
    assert main(["check-trt", os.path.join(bundles["molmo-7b-d"], "vision.onnx")]) == 0


# --- one crafted graph per rule ------------------------------------------------------------------
def test_unsupported_and_version_dependent_ops(tmp_path):
    p = _save(tmp_path, [helper.make_node("Unique", ["x"], ["y"], name="uniq")], [_vi("x")], [_vi("y")])
    (e,) = _errors(_check(p))
    assert (e.node, e.op, e.rule) == ("uniq", "Unique", "unsupported_op")
    stft = _save(tmp_path, [helper.make_node("STFT", ["x", "step"], ["y"], name="stft")], [_vi("x", shape=(1, 64, 1))],
                 [_vi("y", shape=(1, 4, 5, 2))], [numpy_helper.from_array(np.array(16, np.int64), "step")], opset=17,
                 name="stft.onnx")
    assert [p.rule for p in _errors(_check(stft, "10.3"))] == ["unsupported_op"]   # STFT arrived in 10.5
    assert not _errors(_check(stft, "10.13"))


def test_custom_domain_op(tmp_path):
    n = helper.make_node("MatMulNBits", ["x", "w"], ["y"], name="mm4", domain="com.microsoft", K=3, N=3, bits=4, block_size=32)
    p = _save(tmp_path, [n], [_vi("x"), _vi("w", TensorProto.UINT8, (3, 1, 16))], [_vi("y")], domains=("com.microsoft",))
    errs = _errors(_check(p))
    assert [(e.node, e.rule) for e in errs] == [("mm4", "custom_op")]


def test_opset_and_ir_version(tmp_path):
    node = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    p21 = _save(tmp_path, node, [_vi("x")], [_vi("y")], opset=21, ir=10, name="o21.onnx")
    assert [e.rule for e in _errors(_check(p21, "10.3"))] == ["opset"]
    assert not _errors(_check(p21, "10.13"))
    p23 = _save(tmp_path, node, [_vi("x")], [_vi("y")], opset=23, ir=11, name="o23.onnx")
    assert [e.rule for e in _errors(_check(p23, "10.3"))] == ["opset", "ir_version"]
    assert [e.rule for e in _errors(_check(p23, "10.13"))] == ["opset"]


def test_dtypes(tmp_path):
    nodes = [helper.make_node("Add", ["a", "b"], ["c"], name="add_i8"),
             helper.make_node("Cast", ["m"], ["mb"], name="tobool", to=TensorProto.BOOL),
             helper.make_node("NonZero", ["mb"], ["nz"], name="nz"),
             helper.make_node("Cast", ["x"], ["xd"], name="todouble", to=TensorProto.DOUBLE)]
    p = _save(tmp_path, nodes, [_vi("a", TensorProto.INT8), _vi("b", TensorProto.INT8), _vi("m"), _vi("x"),
                                _vi("u", TensorProto.UINT16)],
              [_vi("c", TensorProto.INT8), helper.make_tensor_value_info("nz", TensorProto.INT64, None),
               _vi("xd", TensorProto.DOUBLE)],
              [numpy_helper.from_array(np.ones(3, np.float64), "dbl")])
    probs = _check(p)
    errs = {(e.node or e.op, e.rule) for e in _errors(probs)}
    assert ("add_i8", "dtype") in errs and ("nz", "dtype") in errs and ("todouble", "dtype") in errs
    assert ("u", "dtype") in errs                                   # UINT16 graph input: no TensorRT type
    warns = {(w.op, w.rule) for w in probs if w.severity == "warning"}
    assert ("dbl", "dtype") in warns and ("xd", "dtype") in warns   # DOUBLE is cast down, with a warning


def test_attributes(tmp_path):
    idx = numpy_helper.from_array(np.array([[0]], np.int64), "idx")
    k = numpy_helper.from_array(np.array([2], np.int64), "k")
    nodes = [helper.make_node("ScatterND", ["d", "idx", "u"], ["s1"], name="sc_none", reduction="none"),
             helper.make_node("ScatterND", ["d", "idx", "u"], ["s2"], name="sc_add", reduction="add"),
             helper.make_node("ScatterND", ["d", "idx", "u"], ["s3"], name="sc_plain"),
             helper.make_node("TopK", ["d", "k"], ["tv", "ti"], name="topk_unsorted", sorted=0),
             helper.make_node("Resize", ["img", "", "scales"], ["rz"], name="cubic", mode="cubic"),
             helper.make_node("LayerNormalization", ["d", "gamma"], ["ln", "mean", "istd"], name="ln3"),
             helper.make_node("MaxPool", ["img"], ["mp"], name="dilated", kernel_shape=[2, 2], dilations=[2, 2])]
    inits = [idx, k, numpy_helper.from_array(np.ones(4, np.float32), "scales"),
             numpy_helper.from_array(np.ones(3, np.float32), "gamma")]
    p = _save(tmp_path, nodes, [_vi("d"), _vi("u", shape=(1, 3)), _vi("img", shape=(1, 1, 4, 4))],
              [_vi(n) for n in ("s1", "s2", "s3", "tv", "rz", "ln", "mean", "mp")], inits)
    e3 = {(e.node, e.rule) for e in _errors(_check(p, "10.3"))}
    assert {("sc_none", "attribute"), ("sc_add", "attribute"), ("topk_unsorted", "attribute"), ("cubic", "attribute"),
            ("ln3", "outputs"), ("dilated", "attribute")} == e3        # 10.3 rejects `reduction` whatever its value
    e13 = {(e.node, e.rule) for e in _errors(_check(p, "10.13"))}
    assert ("sc_none", "attribute") not in e13 and ("sc_add", "attribute") in e13 and ("sc_plain", "attribute") not in e13


def test_constant_inputs(tmp_path):
    c = [helper.make_node("Constant", [], ["one"], name="c1", value=numpy_helper.from_array(np.array([1], np.int64))),
         helper.make_node("Add", ["one", "one"], ["two"], name="fold")]
    nodes = c + [helper.make_node("Squeeze", ["x", "axes_in"], ["s1"], name="sq_dynamic"),
                 helper.make_node("Unsqueeze", ["x", "two"], ["s2"], name="usq_folded"),
                 helper.make_node("ReduceSum", ["x", "axes_in"], ["s3"], name="rsum_dynamic"),
                 helper.make_node("TopK", ["x", "bigk"], ["tv", "ti"], name="topk_big")]
    p = _save(tmp_path, nodes, [_vi("x", shape=(1, 5000)), _vi("axes_in", TensorProto.INT64, (1,))],
              [_vi("s1"), _vi("s2"), _vi("s3"), _vi("tv")], [numpy_helper.from_array(np.array([4000], np.int64), "bigk")])
    e3 = {(e.node, e.rule) for e in _errors(_check(p, "10.3"))}
    assert e3 == {("sq_dynamic", "const_input"), ("usq_folded", "const_input"), ("rsum_dynamic", "const_input"),
                  ("topk_big", "const_input")}
    e13 = {(e.node, e.rule) for e in _errors(_check(p, "10.13"))}
    assert ("usq_folded", "const_input") not in e13 and ("sq_dynamic", "const_input") in e13   # foldable is enough


def test_quantize_zero_point(tmp_path):
    s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp0 = numpy_helper.from_array(np.array(0, np.int8), "zp0")
    zp3 = numpy_helper.from_array(np.array(3, np.int8), "zp3")
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp0"], ["q0"], name="q_sym"),
             helper.make_node("QuantizeLinear", ["x", "s", "zp3"], ["q3"], name="q_asym"),
             helper.make_node("DequantizeLinear", ["q0", "s", "zp0"], ["y"], name="dq")]
    p = _save(tmp_path, nodes, [_vi("x")], [_vi("y"), _vi("q3", TensorProto.INT8)], [s, zp0, zp3])
    assert [(e.node, e.rule) for e in _errors(_check(p))] == [("q_asym", "zero_point")]


def test_subgraph_nodes_are_checked(tmp_path):
    then = helper.make_graph([helper.make_node("Unique", ["x"], ["t"], name="inner_unique")], "then", [], [_vi("t")])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"], name="inner_id")], "else", [], [_vi("e")])
    n = helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then, else_branch=other)
    p = _save(tmp_path, [n], [_vi("cond", TensorProto.BOOL, ()), _vi("x")], [_vi("y")])
    assert [(e.node, e.rule) for e in _errors(_check(p))] == [("inner_unique", "unsupported_op")]


def test_external_data_rules(tmp_path):
    w = np.arange(12, dtype=np.float32).reshape(3, 4)

    def ext(name, location, offset=0, length=48):
        t = onnx.TensorProto(name=name, data_type=F, dims=[3, 4])
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", location), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        return t

    (tmp_path / "w.bin").write_bytes(w.tobytes())
    inits = [ext("ok", "w.bin"), ext("missing", "nope.bin"), ext("outside", "w.bin", offset=16),
             ext("absolute", "/etc/passwd"), ext("escape", "../w.bin"), ext("badlen", "w.bin", length=40)]
    nodes = [helper.make_node("MatMul", ["x", t.name], [f"y_{t.name}"], name=f"mm_{t.name}") for t in inits]
    p = _save(tmp_path, nodes, [_vi("x", shape=(2, 3))], [_vi(f"y_{t.name}", shape=(2, 4)) for t in inits], inits)
    bad = {e.op: e.message for e in _errors(_check(p)) if e.rule == "external_data"}
    assert set(bad) == {"missing", "outside", "absolute", "escape", "badlen"}
    assert "missing" in bad["missing"] and "truncated" in bad["outside"] and "outside the model folder" in bad["escape"]
    assert "does not match its shape" in bad["badlen"]


def test_large_graph_reads_fast(tmp_path):
    """A MolmoE-sized decoder has ~25k nodes; reading and checking must stay interactive."""
    import time
    nodes, prev = [], "x"
    for i in range(20000):
        nodes.append(helper.make_node("Relu" if i % 2 else "Neg", [prev], [f"v{i}"], name=f"n{i}"))
        prev = f"v{i}"
    p = _save(tmp_path, nodes, [_vi("x")], [_vi(prev)], name="big.onnx")
    t = time.perf_counter()
    probs = _check(p)
    assert not probs and time.perf_counter() - t < 10
