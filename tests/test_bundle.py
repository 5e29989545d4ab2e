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
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("bundles"))


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


def test_fp16_bundle_reports_difference(tiny_checkpoints, tmp_path):
    manifest = export_bundle(tiny_checkpoints["molmo-7b-d"], str(tmp_path / "b16"), dtype="fp16", **QUIET)
    assert manifest["graphs"]["decoder"]["precision"]["weights"] == "fp16"
    assert 0 < manifest["parity"]["max_abs_logit_diff"] < manifest["parity"]["tolerance"]
    b32 = os.path.getsize(tmp_path / "b16" / "decoder.onnx.data")
    assert b32 > 0


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


def test_failed_self_check_writes_nothing(tiny_checkpoints, tmp_path, monkeypatch):
    import molmo_edge.export.onnx_graphs as og
    real = og._rope

    def wrong_rope(g, x, cos, sin, hd):  # a plausible bug: rotation sign flipped
        return real(g, x, cos, g.op("Neg", [sin]), hd)

    monkeypatch.setattr(og, "_rope", wrong_rope)
    with pytest.raises(MolmoEdgeError, match="self-check failed"):
        export_bundle(tiny_checkpoints["molmo-7b-d"], str(tmp_path / "bad"), **QUIET)
    assert os.listdir(tmp_path) == []


def test_partial_depth_check_for_models_larger_than_memory(tiny_checkpoints, tmp_path):
    from molmo_edge.export.bundle import check_layer_budget
    from molmo_edge.export.synthetic import family_config
    from molmo_edge.runtime.config import config_from_hf

    man = export_bundle(tiny_checkpoints["molmoe-1b"], str(tmp_path / "b"), check_layers=1, **QUIET)
    assert man["parity"]["decoder_layers_checked"] == 1 and man["parity"]["max_abs_logit_diff"] < 1e-3
    assert not os.path.exists(tmp_path / "b" / ".check")
    full = config_from_hf(family_config("molmoe-1b", "full", vocab_size=50280))
    assert check_layer_budget(full, 22 << 30) < full.n_layers       # 29 GB of fp32 weights cannot be held twice
    assert check_layer_budget(full, 1 << 40) == full.n_layers


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


def test_export_with_int4_weights(tiny_checkpoints, tmp_path):
    from molmo_edge.calibration.weight_quant import quantize_decoder_weights
    man = export_bundle(tiny_checkpoints["molmoe-1b"], str(tmp_path / "q"), weights="int4",
                        quantizer=quantize_decoder_weights, **QUIET)
    assert "decoder.int4" in man["graphs"]
    m = Molmo.load(str(tmp_path / "q"), precision="int4")
    assert m.backend.graphs["decoder"] == "decoder.int4"
    assert len(m.ask("Count the boxes.", _frame(), max_new_tokens=3).token_ids) >= 1
