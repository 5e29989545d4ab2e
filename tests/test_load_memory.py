"""What loading and answering hold on onnxruntime CPU: the load-only byte ranges read from the graph file, paging
them out while a graph loads (no data lost), vision run a few crops at a time (same features), glibc returning
freed activations."""
import mmap
import os
import shutil
import time

import numpy as np
import pytest

pytest.importorskip("torch")
onnx = pytest.importorskip("onnx")

from molmo_edge.runtime.bundle import load_bundle  # noqa: E402
from molmo_edge.runtime.machine import paging_out  # noqa: E402
from molmo_edge.runtime.onnx_index import LOAD_ONLY_INPUTS, load_only_ranges  # noqa: E402

QUIET = dict(progress=lambda *_: None)


@pytest.fixture(scope="module")
def int4_bundle(tiny_checkpoints, tmp_path_factory):
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights
    from molmo_edge.export.bundle import export_bundle
    out = str(tmp_path_factory.mktemp("loadmem") / "moe")
    export_bundle(tiny_checkpoints["molmoe-1b"], out, dtype="fp16", **QUIET)
    quantize_decoder_weights(out, 4, 32)
    return out


def test_load_only_ranges_are_the_scales_onnx_sees(int4_bundle):
    b = load_bundle(int4_bundle)
    path = b.graph_path("decoder.int4")
    m = onnx.load(path, load_external_data=False)
    ext = {t.name: {e.key: e.value for e in t.external_data} for t in m.graph.initializer
           if t.data_location == onnx.TensorProto.EXTERNAL}
    want = sorted((os.path.join(os.path.dirname(path), ext[x]["location"]), int(ext[x].get("offset", 0)),
                   int(ext[x]["length"]))
                  for n in m.graph.node for i, x in enumerate(n.input) if i in LOAD_ONLY_INPUTS.get(n.op_type, ()) and x in ext)
    assert want and load_only_ranges(path) == want
    assert {n.op_type for n in m.graph.node} & {"QMoE", "MatMulNBits"}
    assert load_only_ranges(b.graph_path("vision")) == []  # a float graph: nothing only read at load
    bad = os.path.join(os.path.dirname(path), "not-onnx.onnx")
    with open(bad, "wb") as f:
        f.write(b"\xff" * 64)
    assert load_only_ranges(bad) == [] and load_only_ranges(bad + ".missing") == []


def _rss_kib(lo: int) -> int:
    mine = False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if "-" in parts[0] and not parts[0].endswith(":"):
            mine = int(parts[0].split("-")[0], 16) == lo
        elif mine and parts[0] == "Rss:":
            return int(parts[1])
    return 0


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_paging_out_drops_the_pages_and_loses_nothing(tmp_path):
    path = str(tmp_path / "w.data")
    data = np.random.default_rng(0).integers(0, 255, 8 << 20, dtype=np.uint8)
    data.tofile(path)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
    view = np.frombuffer(mm, np.uint8)
    lo = view.__array_interface__["data"][0]
    assert int(view.sum()) == int(data.sum()) and _rss_kib(lo) >= 8 << 10  # all resident
    with paging_out([(path, 2 << 20, 4 << 20)]) as p:  # the middle 4 MiB only (2 MiB-aligned: large folios)
        deadline = time.time() + 5
        while p.rounds < 2 and time.time() < deadline and p._thread.is_alive():
            time.sleep(0.01)
    if p.rounds == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT (Linux 5.4+)")
    assert _rss_kib(lo) == 4 << 10  # the 4 MiB outside the range stay
    np.testing.assert_array_equal(view, data)  # paged back in from the file, unchanged
    del view
    mm.close()


def test_vision_runs_a_few_crops_at_a_time_with_the_same_features(int4_bundle, monkeypatch):
    from molmo_edge.runtime.backends import ort as ob
    be = ob.OrtBackend(load_bundle(int4_bundle), precision="int4")
    v = be.cfg.vision
    n = 2 * ob.VISION_CROPS_PER_RUN + 1
    rng = np.random.default_rng(0)
    images = rng.standard_normal((n, v.num_patches, v.patch_dim)).astype(np.float32)
    masks = np.ones((n, v.num_patches), np.float32)
    masks[-1, v.num_patches // 2:] = 0
    calls = []
    run = be.sessions["vision"].run

    class Spy:
        def run(self, out, feeds):
            calls.append(len(feeds["images"]))
            return run(out, feeds)
    whole = run(["image_features"], {"images": images, "image_masks": masks})[0]
    monkeypatch.setitem(be.sessions, "vision", Spy())
    got = be.vision(images, masks)
    assert calls == [ob.VISION_CROPS_PER_RUN, ob.VISION_CROPS_PER_RUN, 1]
    np.testing.assert_allclose(got, whole, rtol=1e-5, atol=1e-5)


def test_quantized_decoder_loads_with_its_scales_paged_out_and_the_same_logits(int4_bundle, tmp_path):
    from molmo_edge.runtime.backends import ort as ob
    q = str(tmp_path / "q")
    shutil.copytree(int4_bundle, q)
    b = load_bundle(q)
    seen = []
    real = ob.paging_out

    def spy(ranges):
        seen.append(ranges)
        return real(ranges)
    x = np.random.default_rng(1).standard_normal((1, 5, b.config.d_model)).astype(np.float32)

    def logits(be):
        return be.run_decoder(x, np.arange(5)[None], be.new_cache(8), np.array([4])).copy()
    ob.paging_out = spy
    try:
        be = ob.OrtBackend(b, precision="int4")
    finally:
        ob.paging_out = real
    assert seen[0] == [] and seen[1] == load_only_ranges(b.graph_path("decoder.int4")) != []  # vision, decoder
    ref = ob.OrtBackend.__new__(ob.OrtBackend)  # the same graph loaded without paging out
    ob.paging_out = lambda ranges: real([])
    try:
        ref.__init__(b, precision="int4")
    finally:
        ob.paging_out = real
    np.testing.assert_array_equal(logits(be), logits(ref))


def test_weight_casts_first_moves_only_the_fp16_casts(int4_bundle, tmp_path):
    from molmo_edge.runtime.onnx_index import weight_casts_first
    path = load_bundle(int4_bundle).graph_path("vision")
    before = onnx.load(path, load_external_data=False)
    after = onnx.load_from_string(weight_casts_first(path))
    fp16 = {t.name for t in before.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16}
    casts = [n for n in after.graph.node if n.op_type == "Cast" and n.input[0] in fp16]
    assert casts and list(after.graph.node)[:len(casts)] == casts  # every weight Cast first
    assert sorted(n.SerializeToString() for n in after.graph.node) == sorted(n.SerializeToString() for n in before.graph.node)
    del after.graph.node[:], before.graph.node[:]
    assert after == before  # nothing else changed
    assert weight_casts_first(_fp16_matmul(str(tmp_path), 8, np.float32)) is None  # no fp16 weight Casts
    assert weight_casts_first(path + ".missing") is None


def _fp16_matmul(folder: str, n: int, dtype=np.float16) -> str:
    """x [1, n] @ Cast(W fp16 [n, n]), W in external data: n = 4096 holds 64 MiB as float32."""
    from onnx import TensorProto, helper, numpy_helper
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((n, n)).astype(dtype), "w")
    g = helper.make_graph([helper.make_node("Cast", ["w"], ["w32"], to=TensorProto.FLOAT),
                           helper.make_node("MatMul", ["x", "w32"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, n])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])], [w])
    path = os.path.join(folder, "m.onnx")
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), path, save_as_external_data=True,
              location="m.onnx.data", size_threshold=0)
    return path


MEASURE = """
import json, sys
import numpy as np
from molmo_edge.runtime.backends.ort import open_session
def anon():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon"))
x = np.random.default_rng(1).standard_normal((1, 4096)).astype(np.float32)
a0 = anon()
s = open_session(sys.argv[1], cast_weights_per_run=sys.argv[2] == "1")
kib = anon() - a0
np.save(sys.argv[3], s.run(["y"], {"x": x})[0])
print(json.dumps(kib))
"""


def test_cast_per_run_keeps_fp16_weights_off_the_heap(tmp_path, monkeypatch):
    """In fresh processes (a test process's heap may already hold freed, resident memory that a load reuses)."""
    import json
    import subprocess
    import sys

    from molmo_edge.runtime.backends import ort as backend
    path = _fp16_matmul(str(tmp_path), 4096)
    kib, y = {}, {}
    for per_run in ("1", "0"):
        out = str(tmp_path / f"y{per_run}.npy")
        kib[per_run] = json.loads(subprocess.run([sys.executable, "-c", MEASURE, path, per_run, out], check=True,
                                                 capture_output=True, text=True).stdout)
        y[per_run] = np.load(out)
    np.testing.assert_allclose(y["1"], y["0"], rtol=1e-5, atol=1e-3)
    assert kib["0"] > 48 << 10 and kib["1"] < 16 << 10, kib  # 64 MiB as float32 against none
    # an onnxruntime that cannot take the reordered bytes: the graph file, as before
    x = np.random.default_rng(1).standard_normal((1, 4096)).astype(np.float32)
    monkeypatch.setattr(backend, "weight_casts_first", lambda p: b"\xff" * 16)
    np.testing.assert_allclose(backend.open_session(path, cast_weights_per_run=True).run(["y"], {"x": x})[0], y["1"],
                               rtol=1e-5, atol=1e-3)


def test_estimate_counts_cast_per_run_vision_pages_only_during_a_pass(int4_bundle):
    from molmo_edge.runtime.memory import activation_bytes, estimate_load, resident_weight_bytes
    b = load_bundle(int4_bundle)
    graphs = {"vision": "vision", "decoder": "decoder.int4"}
    cpu, cuda = (estimate_load(b.manifest, b.config, graphs, device) for device in ("cpu", "cuda"))
    vision = b.manifest["graphs"]["vision"]
    assert cpu.while_running == ("vision",) and cuda.while_running == ()
    assert cpu.graphs["vision"] == resident_weight_bytes(vision, "cpu", True) == vision["weight_bytes_by_dtype"]["float16"] + \
        sum(n for d, n in vision["weight_bytes_by_dtype"].items() if d != "float16")
    assert cuda.graphs["vision"] > cpu.graphs["vision"]  # folded to float32 there
    assert cpu.weights == cpu.graphs["decoder.int4"] and not cpu.notes  # no "held as float32" note
    a = cpu.activations
    assert a["vision"] > activation_bytes(b.config, fused=True)["vision"]  # the Casts' float32 copies
    assert cpu.working == cpu.weights + max(a["vision"] + cpu.graphs["vision"], a["prefill"]) + a["kv_cache"]
