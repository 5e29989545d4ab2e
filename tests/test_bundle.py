"""Export to a bundle and run it with onnxruntime: parity with the torch model for every family,
the KV/prefix caching, and clear errors for damaged or foreign bundles."""
import json
import os
import shutil

import numpy as np
import pytest
from conftest import export_tiny_bundles

torch = pytest.importorskip("torch")

from molmo_edge.export.bundle import export_bundle  # noqa: E402
from molmo_edge.export.checkpoint import load_reference_model  # noqa: E402
from molmo_edge.runtime.bundle import BundleError, load_bundle  # noqa: E402
from molmo_edge.runtime.errors import MolmoEdgeError  # noqa: E402
from molmo_edge.runtime.kv_cache import ContextOverflow  # noqa: E402
from molmo_edge.runtime.session import Molmo  # noqa: E402

QUIET = dict(progress=lambda *_: None)


@pytest.fixture(scope="module")
def bundles(tiny_checkpoints, tmp_path_factory):
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("bundles"), fused=True)  # MoE fused: asked for


def _frame(h=220, w=330, seed=0):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img[h // 3: h // 2, w // 4: w // 2] = (230, 20, 20)
    return img


@pytest.mark.parametrize("family", ["molmoe-1b", "molmo-7b-o", "molmo-7b-d", "molmo-72b"])
def test_bundle_matches_torch(bundles, tiny_checkpoints, family):
    m = Molmo.load(bundles[family])
    model, cfg, _ = load_reference_model(tiny_checkpoints[family])
    for image, max_crops in ((_frame(), None), (_frame(500, 120, 1), 3), (None, None)):
        inputs = m.processor.process("Point to the red box.", image, max_crops=max_crops)
        got = m.forward(inputs)
        kw = {k: torch.from_numpy(inputs[k]) for k in ("images", "image_masks", "image_input_idx") if k in inputs}
        with torch.no_grad():
            ref = model(torch.from_numpy(inputs["input_ids"].astype(np.int64)), **kw)
        assert np.abs(got["logits"] - ref.logits[0].numpy()).max() < 1e-3
        if image is not None:
            assert np.abs(got["image_features"] - ref.image_features[0].numpy()).max() < 1e-3
        # greedy tokens identical through the cached-prefix, KV-cache path
        ans = m.ask("Point to the red box.", image, max_new_tokens=6, max_crops=max_crops)
        want = model.generate(torch.from_numpy(inputs["input_ids"].astype(np.int64)), max_new_tokens=6,
                              eos_token_id=m.tokenizer.eos_id, **kw)
        assert ans.token_ids == want


def test_second_question_skips_vision_and_image_prefill(bundles, tiny_checkpoints):
    m = Molmo.load(bundles["molmoe-1b"])
    img = _frame()
    a1 = m.ask("What is this?", img, max_new_tokens=4)
    assert m.stats == {"vision_runs": 1, "prefix_prefills": 1, "questions": 1}
    a2 = m.ask("How many boxes?", img, max_new_tokens=4)
    assert m.stats["vision_runs"] == 1 and m.stats["prefix_prefills"] == 1
    assert a2.timings["vision"] == 0.0
    # the cached-prefix answer equals a fresh runtime's answer
    fresh = Molmo.load(bundles["molmoe-1b"]).ask("How many boxes?", img, max_new_tokens=4)
    assert fresh.token_ids == a2.token_ids
    m.ask("What is this?", _frame(seed=5), max_new_tokens=2)
    assert m.stats["vision_runs"] == 2
    assert m.ask("What is this?", img, max_new_tokens=4).token_ids == a1.token_ids  # features still cached
    assert m.stats["vision_runs"] == 2 and m.stats["prefix_prefills"] == 3


def test_fp16_rounding_passes_and_its_cost_is_reported_apart(tiny_checkpoints, tmp_path):
    manifest = export_bundle(tiny_checkpoints["molmo-7b-d"], str(tmp_path / "b16"), dtype="fp16", **QUIET)
    assert manifest["graphs"]["decoder"]["precision"]["weights"] == "fp16"
    par = manifest["parity"]
    for key in ("decoder", "decoder.fused"):
        f = par["flavours"][key]
        # like with like: torch holds the same fp16-rounded weights, so the graph matches to float32 noise (the
        # fused graph's attention runs in fp16 over its fp16 KV cache: still 10x under the float tolerance)
        bound = 1e-5 if key == "decoder" else 2e-4
        assert f["worst_layer_max_rel_diff"] < bound and f["head_max_rel_diff"] < bound
        assert len(f["per_layer_max_rel_diff"]) == 2
        cost = f["precision_cost"]  # the rounding itself, against the checkpoint's fp32 weights
        assert 0 < cost["max_abs_logit_diff"] and cost["logit_cosine"] >= cost["bound_logit_cosine"]
    assert par["max_abs_logit_diff"] == par["flavours"]["decoder"]["precision_cost"]["max_abs_logit_diff"]


def test_moe_bundle_has_no_fused_decoder_unless_asked(tiny_checkpoints, tmp_path):
    man = export_bundle(tiny_checkpoints["molmoe-1b"], str(tmp_path / "m"), dtype="fp16", check=False, trt_check=False, **QUIET)
    assert set(man["graphs"]) == {"vision", "decoder"}  # onnxruntime selects the portable decoder for MoE
    assert not os.path.exists(tmp_path / "m" / "decoder.fused.onnx")


def test_external_data_is_aligned_for_mmap(bundles):
    import onnx

    from molmo_edge.runtime.external_data import ALIGN, ALIGN_MIN_BYTES
    b = load_bundle(bundles["molmo-7b-d"])
    model = onnx.load(b.graph_path("decoder"), load_external_data=False)
    ext = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer if t.external_data]
    assert ext and all(int(e["offset"]) % 64 == 0 for e in ext)
    assert all(int(e["offset"]) % ALIGN == 0 for e in ext if int(e["length"]) >= ALIGN_MIN_BYTES)
    assert b.manifest["graphs"]["decoder"]["weight_bytes_by_dtype"]["float32"] > 0


def test_manifest_contents(bundles):
    b = load_bundle(bundles["molmoe-1b"])
    man = b.manifest
    assert man["format_version"] == 1 and len(man["model"]["weights_sha256"]) == 64
    assert man["tokens"]["image"]["<im_patch>"] == b.config.image_token_ids()["<im_patch>"]
    assert {i["name"] for i in man["graphs"]["vision"]["inputs"]} == {"images", "image_masks"}
    assert man["graphs"]["decoder"]["dynamic_axes"]["inputs_embeds"] == {"0": "batch", "1": "seq"} or \
        man["graphs"]["decoder"]["dynamic_axes"]["inputs_embeds"] == {0: "batch", 1: "seq"}
    assert man["graphs"]["decoder"]["opset"] <= 20 and man["moe"]["top_k"] == b.config.moe_top_k
    assert man["parity"]["max_abs_logit_diff"] < 1e-3
    import onnx
    for g in ("vision", "decoder"):
        model = onnx.load(b.graph_path(g), load_external_data=False)
        assert {o.domain for o in model.opset_import} == {""}  # standard ops only
        assert all(n.domain == "" for n in model.graph.node)


def test_decode_reads_only_routed_experts(bundles):
    """In a decode step, only the experts the router picked get rows (the others compute on zero rows)."""
    import onnx
    b = load_bundle(bundles["molmoe-1b"])
    model = onnx.load(b.graph_path("decoder"), load_external_data=False)
    ops = [n.op_type for n in model.graph.node]
    cfg = b.config
    assert ops.count("NonZero") == cfg.n_layers * cfg.moe_num_experts
    assert "ScatterND" not in ops  # TensorRT 10.3 rejects ScatterND reductions
    man = b.manifest["tensorrt_check"]
    assert man["10.3"]["ok"] and man["10.13"]["ok"], man


def test_bundle_errors(bundles, tmp_path):
    src = bundles["molmo-7b-o"]
    bad = str(tmp_path / "v2")
    shutil.copytree(src, bad)
    man = json.load(open(f"{bad}/manifest.json"))
    man["format_version"] = 99
    json.dump(man, open(f"{bad}/manifest.json", "w"))
    with pytest.raises(BundleError, match="format 99.*re-export"):
        load_bundle(bad)

    trunc = str(tmp_path / "trunc")
    shutil.copytree(src, trunc)
    with open(f"{trunc}/decoder.onnx.data", "r+b") as f:
        f.truncate(1000)
    with pytest.raises(BundleError, match="truncated or damaged"):
        load_bundle(trunc)

    notok = str(tmp_path / "notok")
    shutil.copytree(src, notok)
    os.remove(f"{notok}/tokenizer.json")
    with pytest.raises(BundleError, match="missing tokenizer.json"):
        load_bundle(notok)

    garbage = str(tmp_path / "garbage")
    shutil.copytree(src, garbage)
    size = os.path.getsize(f"{garbage}/vision.onnx")
    with open(f"{garbage}/vision.onnx", "wb") as f:
        f.write(b"\x00" * size)  # same size, destroyed content
    with pytest.raises(BundleError, match="cannot be loaded by onnxruntime"):
        Molmo.load(garbage)

    with pytest.raises(BundleError, match="not a molmo-edge bundle"):
        load_bundle(str(tmp_path))


def test_context_overflow_is_clear(bundles):
    m = Molmo.load(bundles["molmo-7b-d"])
    m.cache = m.backend.new_cache(64)
    with pytest.raises(ContextOverflow, match="exceed the model's context of 64"):
        m.ask("hello " * 80, max_new_tokens=4)
    assert m.ask("hi", max_new_tokens=3).token_ids  # still usable afterwards


def test_sampling_and_stop_strings(bundles):
    m = Molmo.load(bundles["molmo-7b-d"])
    g1 = m.ask("Tell me.", max_new_tokens=8)
    assert m.ask("Tell me.", max_new_tokens=8).token_ids == g1.token_ids
    s1 = m.ask("Tell me.", max_new_tokens=8, temperature=1.5, top_p=0.9, seed=1)
    s2 = m.ask("Tell me.", max_new_tokens=8, temperature=1.5, top_p=0.9, seed=1)
    assert s1.token_ids == s2.token_ids
    pieces = []
    streamed = m.ask("Tell me.", max_new_tokens=8, on_text=pieces.append)
    assert "".join(pieces).strip() == streamed.text
    if len(g1.text) > 2:
        stop = g1.text[1:3]
        cut = m.ask("Tell me.", max_new_tokens=8, stop=[stop])
        assert cut.stop_reason == "stop" and stop not in cut.text


def test_interrupted_export_leaves_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    import molmo_edge.export.bundle as eb

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(eb, "build_decoder", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_checkpoints["molmo-7b-d"], str(tmp_path / "out"), **QUIET)
    assert os.listdir(tmp_path) == []


def test_existing_output_needs_force(bundles, tiny_checkpoints):
    with pytest.raises(MolmoEdgeError, match="--force"):
        export_bundle(tiny_checkpoints["molmo-7b-d"], bundles["molmo-7b-d"], **QUIET)


def test_broken_graph_fails_the_self_check_and_writes_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    import molmo_edge.export.onnx_graphs as og
    real = og._rope

    def wrong_rope(g, x, cos, sin, hd):  # a plausible bug: rotation sign flipped
        return real(g, x, cos, g.op("Neg", [sin]), hd)

    monkeypatch.setattr(og, "_rope", wrong_rope)
    # fp16 storage, so the only thing that tells this graph from a correct fp16 export is the bug
    with pytest.raises(MolmoEdgeError, match=r"self-check failed: decoder layer \d+ differs"):
        export_bundle(tiny_checkpoints["molmo-7b-d"], str(tmp_path / "bad"), dtype="fp16", fused=False, **QUIET)
    assert os.listdir(tmp_path) == []


def test_every_layer_is_checked_alone_and_the_worst_reported(tiny_checkpoints, tmp_path):
    lines = []
    man = export_bundle(tiny_checkpoints["molmoe-1b"], str(tmp_path / "b"), whole_check=False, progress=lines.append)
    par = man["parity"]
    assert par["decoder_layers_checked"] == par["decoder_layers"] == 2
    f = par["flavours"]["decoder"]
    assert f["worst_layer"] in (0, 1) and f["worst_layer_max_rel_diff"] == max(f["per_layer_max_rel_diff"])
    assert f["whole_bundle"].startswith("skipped")
    assert any("worst layer" in line for line in lines)
    assert [n for n in os.listdir(tmp_path / "b") if n.startswith(".check")] == []


def test_export_refuses_when_the_disk_is_too_small(tiny_checkpoints, tmp_path, monkeypatch):
    import collections
    import shutil as sh
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(sh, "disk_usage", lambda p: usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(MolmoEdgeError, match=r"export needs .* GiB of disk .* are free"):
        export_bundle(tiny_checkpoints["molmoe-1b"], str(tmp_path / "b"), **QUIET)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("family", ["molmoe-1b", "molmo-7b-o", "molmo-7b-d"])
def test_fused_and_portable_decoders_agree(bundles, family):
    fused, portable = Molmo.load(bundles[family], fused=True), Molmo.load(bundles[family], fused=False)
    auto = Molmo.load(bundles[family]).backend.graphs["decoder"]
    assert auto == ("decoder" if family == "molmoe-1b" else "decoder.fused")  # measured choice per family
    assert fused.backend.graphs["decoder"] == "decoder.fused" and portable.backend.graphs["decoder"] == "decoder"
    assert fused.cache.layout == "bnsh" and portable.cache.layout == "bsnh"
    img = _frame(seed=3)
    inputs = fused.processor.process("Count the boxes.", img)
    assert np.abs(fused.forward(inputs)["logits"] - portable.forward(inputs)["logits"]).max() < 1e-3
    for prompt in ("Count the boxes.", "Point to the box."):  # second prompt: continuation over a cached prefix
        assert fused.ask(prompt, img, max_new_tokens=6).token_ids == portable.ask(prompt, img, max_new_tokens=6).token_ids


def test_bench_command_reports_every_stage(bundles):
    from molmo_edge.runtime.device.bench import format_table, run_bench
    res = run_bench(Molmo.load(bundles["molmo-7b-d"]), runs=1, decode_tokens=3)
    s = res["stages"]
    for k in ("preprocess_ms", "vision_ms_per_crop", "vision_ms_per_frame", "prefill_tokens_per_s", "decode_tokens_per_s",
              "end_to_end_ms", "vision_ms_per_frame_max_crops_2"):
        assert k in s
    assert s["crops"] == 7 and s["crops_at_max_crops_2"] == 3  # 640x480 frame: 2x3 tiling + global view
    assert res["machine"]["cores"] >= 1 and res["peak_rss_mib"] > 0
    assert "decode" in format_table(res)


@pytest.mark.parametrize("family,scales", [("molmoe-1b", "fp32"), ("molmoe-1b", "fp16"), ("molmo-7b-d", "fp32")])
def test_export_with_int4_weights_writes_no_float_decoder(tiny_checkpoints, tmp_path, family, scales):
    """The quantized decoder is onnxruntime's: written in the fused layout (GroupQueryAttention, shared KV buffer),
    MoE experts as one QMoE node per layer (fp16 scales: fp16 activations into it), checked layer by layer."""
    import onnx

    from molmo_edge.calibration.weight_quant import make_quantizer
    man = export_bundle(tiny_checkpoints[family], str(tmp_path / "q"), dtype="fp16", quantizer=make_quantizer(4, scales=scales),
                        **QUIET)
    assert set(man["graphs"]) == {"vision", "decoder.int4"}
    g = man["graphs"]["decoder.int4"]
    assert g["kv_layout"] == "bnsh-shared"
    ops = {n.op_type for n in onnx.load(str(tmp_path / "q" / "decoder.int4.onnx"), load_external_data=False).graph.node}
    assert "GroupQueryAttention" in ops and ("QMoE" in ops) == (family == "molmoe-1b") and "NonZero" not in ops
    assert g["quantization"]["experts_op"] == ("com.microsoft.QMoE" if family == "molmoe-1b" else None)
    assert not os.path.exists(tmp_path / "q" / "decoder.onnx.data")
    f = man["parity"]["flavours"]["decoder.int4"]
    assert f["compute"] == "int8-activations" and f["worst_layer_max_rel_diff"] < f["tolerance"]
    assert f["precision_cost"]["logit_cosine"] > 0.95
    m = Molmo.load(str(tmp_path / "q"))  # auto: the only decoder
    assert m.backend.graphs["decoder"] == "decoder.int4" and m.describe()["precision"] == "int4"
    with pytest.raises(BundleError, match="no float decoder.*--precision int4"):
        Molmo.load(str(tmp_path / "q"), precision="fp32")
    assert len(m.ask("Count the boxes.", _frame(), max_new_tokens=3).token_ids) >= 1


def test_fused_quantized_decoder_keeps_an_fp16_kv_cache_that_decodes_like_one_pass(tiny_checkpoints, tmp_path):
    """The fused layout of an fp16/quantized export declares fp16 K/V (GroupQueryAttention in fp16): the runtime's
    cache is fp16, the memory estimate counts 2 bytes a value, and decoding token by token through the cache gives
    the logits of one pass over the whole sequence."""
    from molmo_edge.calibration.weight_quant import make_quantizer
    from molmo_edge.runtime.memory import activation_bytes
    b = str(tmp_path / "q")
    man = export_bundle(tiny_checkpoints["molmo-7b-d"], b, dtype="fp16", quantizer=make_quantizer(4), check=False, **QUIET)
    kv_inputs = [v for v in man["graphs"]["decoder.int4"]["inputs"] if v["name"].startswith("past_")]
    assert kv_inputs and {v["dtype"] for v in kv_inputs} == {"float16"}
    m = Molmo.load(b)
    be, cfg = m.backend, m.backend.cfg
    assert be.new_cache(32).keys[0].dtype == np.float16
    fp32_kv = activation_bytes(cfg, fused=True)["kv_cache"]
    assert m.estimate.activations["kv_cache"] == activation_bytes(cfg, fused=True, kv_item=2)["kv_cache"] == fp32_kv // 2
    t, p = 12, 8
    x = np.random.default_rng(0).standard_normal((1, t, cfg.d_model)).astype(np.float32)
    pos = np.arange(t, dtype=np.int64)[None]
    whole = be.run_decoder(x, pos, be.new_cache(32), np.arange(t, dtype=np.int64))[0]
    cache = be.new_cache(32)
    steps = [be.run_decoder(x[:, :p], pos[:, :p], cache, np.array([p - 1], np.int64))[0, 0]]
    for j in range(p, t):
        steps.append(be.run_decoder(x[:, j:j + 1], pos[:, j:j + 1], cache, np.array([0], np.int64))[0, 0])
    assert cache.length == t
    scale = np.abs(whole).max()
    np.testing.assert_allclose(np.stack(steps), whole[p - 1:], atol=1e-3 * scale)  # measured 2.6e-7
    assert len(m.ask("Count the boxes.", _frame(), max_new_tokens=3).token_ids) >= 1


@pytest.mark.parametrize("weights", ["fp32", "int4"])
def test_a_growing_kv_cache_decodes_bit_for_bit_like_a_preallocated_one(tiny_checkpoints, tmp_path, monkeypatch, weights):
    """A session's cache starts empty and grows GROW_STEP tokens at a time as questions need (GroupQueryAttention
    commits the whole buffer it is bound to, kv_cache.py), in both KV layouts: portable (fp32 export) and fused
    (quantized export); the logits are those of a cache sized up front, bit for bit, and the context limit holds."""
    from molmo_edge.calibration.weight_quant import make_quantizer
    from molmo_edge.runtime import kv_cache
    from molmo_edge.runtime.kv_cache import ContextOverflow
    b = str(tmp_path / "b")
    quant = {"dtype": "fp16", "quantizer": make_quantizer(4)} if weights == "int4" else {}
    export_bundle(tiny_checkpoints["molmo-7b-d"], b, check=False, **quant, **QUIET)
    monkeypatch.setattr(kv_cache, "GROW_STEP", 4)
    m = Molmo.load(b)
    be, cfg = m.backend, m.backend.cfg
    assert m.cache.capacity == 0 and m.cache.max_len == cfg.max_sequence_length
    x = np.random.default_rng(1).standard_normal((1, 11, cfg.d_model)).astype(np.float32)
    pos = np.arange(11, dtype=np.int64)[None]

    def decode(cache):
        out = [be.run_decoder(x[:, :3], pos[:, :3], cache, np.array([2], np.int64))[0, 0]]
        out += [be.run_decoder(x[:, j:j + 1], pos[:, j:j + 1], cache, np.array([0], np.int64))[0, 0] for j in range(3, 11)]
        return np.stack(out)

    grown = be.new_cache()
    got = decode(grown)
    assert grown.capacity == 12 and grown.keys[0].shape[1 if grown.layout == "bsnh" else 2] == 12
    np.testing.assert_array_equal(got, decode(be.new_cache(11)))
    ans = m.ask("Count the boxes.", _frame(), max_new_tokens=3)
    assert m.cache.capacity == -(-(ans.prompt_tokens + 3) // 4) * 4 < m.cache.max_len
    with pytest.raises(ContextOverflow, match="exceed the model's context"):
        grown.reserve(cfg.max_sequence_length)


def test_head_is_checked_in_slices_and_a_broken_head_still_fails(tiny_checkpoints, tmp_path, monkeypatch):
    """Full-size heads are computed a slice of rows at a time (and the graph's on its first slice): the result
    is the same as the whole head, and a wrong head is still caught."""
    import molmo_edge.export.check as check
    from molmo_edge.calibration.weight_quant import make_quantizer
    from molmo_edge.export.graph import GraphBuilder
    monkeypatch.setattr(check, "HEAD_ROWS", 96)  # tiny vocab 512: six slices, the last one short
    for name, kw in (("fp16", {}), ("int4", {"quantizer": make_quantizer(4, head="int8")})):
        man = export_bundle(tiny_checkpoints["molmoe-1b"], str(tmp_path / name), dtype="fp16", whole_check=False,
                            **kw, **QUIET)
        f = next(iter(man["parity"]["flavours"].values()))
        assert f["head_max_rel_diff"] < (1e-5 if name == "fp16" else f["tolerance"]) and f["precision_cost"]["logit_cosine"] > 0.95
    real = GraphBuilder.linear

    def bad_linear(self, x, w, b, name):  # a plausible bug: the head's rows shifted by one
        return real(self, x, np.roll(w, 1, axis=0) if name == "lm_head" else w, b, name)
    monkeypatch.setattr(GraphBuilder, "linear", bad_linear)
    with pytest.raises(MolmoEdgeError, match="head differs"):
        export_bundle(tiny_checkpoints["molmoe-1b"], str(tmp_path / "bad"), dtype="fp16", whole_check=False, **QUIET)


def test_logit_agreement_over_vocabulary_chunks_equals_the_whole_comparison():
    """The self-check compares logits chunk by chunk (a full-size head's logits are not held): same figures,
    ties in the argmax keep the earlier index as a whole-row argmax does."""
    from molmo_edge.export.check import _Agreement
    rng = np.random.default_rng(0)
    a = rng.standard_normal((7, 50)).astype(np.float32)
    b = a + 0.1 * rng.standard_normal((7, 50)).astype(np.float32)
    a[0, 3] = a[0, 20] = b[0, 20] = b[0, 3] = 9.0  # a tie across two chunks
    b[1, 40] = 9.0  # an argmax disagreement in the last chunk
    got = _Agreement()
    for i in range(0, 50, 16):
        got.add(a[:, i:i + 16], b[:, i:i + 16])
    a64, b64 = a.astype(np.float64), b.astype(np.float64)  # the comparison over whole arrays
    want = {"max_abs_logit_diff": float(np.abs(a64 - b64).max()),
            "logit_cosine": float((a64 * b64).sum() / np.sqrt((a64 * a64).sum() * (b64 * b64).sum())),
            "argmax_agreement": float((a64.argmax(-1) == b64.argmax(-1)).mean())}
    got = got.result()
    assert got["argmax_agreement"] == want["argmax_agreement"] < 1.0
    assert got["max_abs_logit_diff"] == pytest.approx(want["max_abs_logit_diff"], rel=1e-12)
    assert got["logit_cosine"] == pytest.approx(want["logit_cosine"], rel=1e-12)


def test_atomic_writes_get_the_umask_permissions_not_mkstemps(tmp_path):
    """A bundle exported by one user is readable by the service user that serves it (mkstemp makes 0600 files)."""
    from molmo_edge.runtime import files
    p = str(tmp_path / "manifest.json")
    files.write_json_atomic(p, {"a": 1})
    with files.atomic_path(str(tmp_path / "x.npy")) as tmp:
        open(tmp, "wb").close()
    for f in (p, str(tmp_path / "x.npy")):
        assert os.stat(f).st_mode & 0o777 == 0o666 & ~files._UMASK
