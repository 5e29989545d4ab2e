"""The decisions of `molmo-edge build` and the TensorRT backend, without TensorRT: profiles and which one a
call uses, buffer sizes, KV addresses, what is built how, calibration caches, engine keys, and refusing
stale or foreign engines."""
import json
import os
import shutil

import numpy as np
import pytest

from molmo_edge.runtime.backends.trt_engines import (BuildConfigError, EngineError, TrtEnv, classify, decoder_buffers, decoder_call_shapes, decoder_profiles, default_workspace_mb, engine_key, engine_precision, find_engine, graph_hash, kv_addresses, kv_cache_bytes, max_image_tokens, mismatches, nbytes, profile_max, select_profile, typical_prefill, vision_buffers, vision_profiles, write_record)

from molmo_edge.runtime.tensorrt.build import build_plan, check_calibration_cache, read_cache_header

ORIN = TrtEnv("10.3.0.30", "Orin", "8.7", "36.4.3", "6.2", "12.6")
THOR = TrtEnv("10.13.3.9", "NVIDIA Thor", "11.0", "38.4.0", "7.1", "13.0")


@pytest.fixture(scope="module")
def full_cfg():
    from molmo_edge.export.synthetic import family_config
    from molmo_edge.runtime.config import config_from_hf
    return config_from_hf(family_config("molmoe-1b", "full", vocab_size=50280))


@pytest.fixture(scope="module")
def bundle(tiny_checkpoints, tmp_path_factory):
    from molmo_edge.export.bundle import export_bundle
    out = str(tmp_path_factory.mktemp("ec") / "b")
    export_bundle(tiny_checkpoints["molmo-7b-d"], out, check=False, progress=lambda *_: None)
    return out


# --- profiles ---------------------------------------------------------------------------------
def test_vision_profile_covers_crop_counts(full_cfg):
    (p,) = vision_profiles(full_cfg, 12)
    assert p.shapes["images"].min == (1, 576, 588) and p.shapes["images"].max == (13, 576, 588)
    assert p.shapes["image_masks"].max == (13, 576)
    assert select_profile([p], {"images": (5, 576, 588), "image_masks": (5, 576)}) == 0
    with pytest.raises(EngineError, match="outside the engine's profiles.*--max-crops"):
        select_profile([p], {"images": (14, 576, 588), "image_masks": (14, 576)})


def test_image_token_bound_holds_for_any_aspect(full_cfg):
    from molmo_edge.runtime.preprocess import preprocess_image
    rng = np.random.default_rng(0)
    for max_crops in (1, 4, 12):
        bound = max_image_tokens(full_cfg, max_crops)
        sizes = [(40, 1400), (1400, 40), (1400, 1400), (336, 336)] + [tuple(int(x) for x in rng.integers(40, 1400, 2))
                                                                    for _ in range(6)]
        for h, w in sizes:
            n = len(preprocess_image(np.zeros((h, w, 3), np.uint8), full_cfg, max_crops=max_crops).image_tokens)
            assert n <= bound, (h, w, max_crops, n, bound)
    assert typical_prefill(full_cfg, 12) < 1 + max_image_tokens(full_cfg, 12)


def test_decoder_profiles_and_the_calls_of_a_conversation(full_cfg):
    profiles = decoder_profiles(full_cfg, 4096, 12)
    names = [p.name for p in profiles]
    assert names == ["prefill", "extend", "decode"]
    pre, ext, dec = profiles
    assert pre.shapes["past_key.0"].max[1] == 0 and pre.shapes["inputs_embeds"].max[1] == 1 + max_image_tokens(full_cfg, 12) + 512
    assert ext.shapes["inputs_embeds"].max[1] == 512 and ext.shapes["past_key.0"].max[1] == 4095
    assert dec.shapes["inputs_embeds"].max[1] == 1 and dec.shapes["logit_positions"].max == (1,)
    assert all(f"past_value.{i}" in p.shapes for p in profiles for i in range(full_cfg.n_layers))

    def which(t, past, k):
        return names[select_profile(profiles, decoder_call_shapes(full_cfg, t, past, k))]

    prefix = typical_prefill(full_cfg, 12)
    assert which(prefix, 0, 1) == "prefill"            # image prefix on an empty cache
    assert which(1, 0, 1) == "prefill"                 # text-only: BOS alone
    assert which(20, prefix, 1) == "extend"            # the question on the cached prefix
    assert which(1, prefix + 20, 1) == "decode"        # each new token
    assert which(300, 0, 64) == "prefill"              # forward() of a short prompt, one logit row per token
    with pytest.raises(EngineError, match="--max-seq/--max-logits"):
        which(300, 0, 300)                             # more logit rows than the engine returns
    with pytest.raises(EngineError):
        which(600, 100, 1)                             # a long prompt on top of a prefix exceeds extend


def test_profile_limits_are_checked(full_cfg):
    with pytest.raises(BuildConfigError, match="--max-seq 9999"):
        decoder_profiles(full_cfg, 9999, 12)
    with pytest.raises(BuildConfigError, match="--max-logits"):
        decoder_profiles(full_cfg, 1024, 12, max_logits=2048)
    small = decoder_profiles(full_cfg, 1024, 2)
    assert small[0].shapes["inputs_embeds"].max[1] <= 1024 and small[2].shapes["past_key.0"].max[1] == 1023


def test_buffers_at_profile_maxima(full_cfg):
    vb = vision_buffers(full_cfg, vision_profiles(full_cfg, 12))
    assert vb["images"] == ((13, 576, 588), "float32") and vb["image_features"] == ((13, 144, 2048), "float32")
    profiles = decoder_profiles(full_cfg, 4096, 12)
    db = decoder_buffers(full_cfg, profiles)
    t_max = max(p.shapes["inputs_embeds"].max[1] for p in profiles)
    assert db["inputs_embeds"][0] == (1, t_max, 2048) and db["position_ids"] == ((1, t_max), "int64")
    assert db["logits"] == ((1, 64, full_cfg.embedding_size), "float32")
    assert profile_max(profiles)["past_key.3"] == (1, 4095, 16, 128)
    assert nbytes((2, 3), "int64") == 48
    assert kv_cache_bytes(full_cfg, 4096) == 2 * 16 * 4096 * 16 * 128 * 4


def test_kv_addresses():
    row = 16 * 128 * 4
    assert kv_addresses(1000, row, 0, 5, 10) == (1000, 1000)
    assert kv_addresses(1000, row, 7, 1, 10) == (1000, 1000 + 7 * row)
    with pytest.raises(EngineError, match="exceed the KV cache"):
        kv_addresses(1000, row, 7, 4, 10)


# --- what is built how --------------------------------------------------------------------------
def test_build_plan_decisions():
    man = {"graphs": {"vision": {}, "decoder": {}}}
    fp16 = build_plan(man, "fp16", trt_version="10.3.0.30")
    obey = ("FP16", "OBEY_PRECISION_CONSTRAINTS")            # fp16 with the fp32 islands obeyed
    assert [(b.role, b.graph, b.strongly_typed, b.flags) for b in fp16] == [("vision", "vision", False, obey),
                                                                           ("decoder", "decoder", False, obey)]
    assert not fp16[0].note and "deprecated since TensorRT 10.12" in build_plan(man, "fp16", trt_version="10.13.3")[0].note
    with pytest.raises(BuildConfigError, match="molmo-edge calibrate"):
        build_plan(man, "int8", "qdq", "10.3")
    qdq = build_plan({"graphs": {"vision": {}, "vision.int8": {}, "decoder": {}}}, "int8", "qdq", "10.3")
    assert (qdq[0].graph, qdq[0].strongly_typed, qdq[0].flags) == ("vision.int8", True, ())
    assert (qdq[1].graph, qdq[1].flags) == ("decoder", obey)
    cache = build_plan(man, "int8", "cache", "10.3")
    assert (cache[0].graph, cache[0].flags, cache[0].calibration_cache) == ("vision", ("INT8",) + obey,
                                                                            os.path.join("calibration", "vision.cache"))
    both = {"graphs": man["graphs"], "calibration": {"caches": [
        {"file": "calibration/vision.cache", "trt_version": "10.3.0"},
        {"file": "calibration/vision.trt-10.13.3.cache", "trt_version": "10.13.3"}]}}
    assert build_plan(both, "int8", "cache", "10.13.3.9")[0].calibration_cache == "calibration/vision.trt-10.13.3.cache"
    assert build_plan(both, "int8", "cache", "10.3.0.30")[0].calibration_cache == "calibration/vision.cache"
    with pytest.raises(BuildConfigError, match="TensorRT 11"):
        build_plan(man, "fp16", trt_version="11.4.1")
    with pytest.raises(BuildConfigError, match="--precision"):
        build_plan(man, "fp8")


def test_engine_precision():
    assert engine_precision("fp32") == "fp16" and engine_precision("fp16") == "fp16" and engine_precision("int8") == "int8"
    with pytest.raises(EngineError, match="MatMulNBits"):
        engine_precision("int4")


def test_calibration_cache(tmp_path):
    p = tmp_path / "vision.cache"
    p.write_text("TRT-100300-EntropyCalibration2\nimages: 3c010a14\nmatmul_3: 3d4ccccd\n")
    assert read_cache_header(str(p)) == (100300, "EntropyCalibration2", ["images", "matmul_3"])
    assert check_calibration_cache(str(p), "10.3.0.30", {"images", "matmul_3", "x"}) == ["images", "matmul_3"]
    with pytest.raises(BuildConfigError, match="made for TensorRT 100300.*--trt-version 10.13.3"):
        check_calibration_cache(str(p), "10.13.3.9", {"images"})
    with pytest.raises(BuildConfigError, match="another export"):
        check_calibration_cache(str(p), "10.3.0", {"other"})
    p.write_text("TRT-100300-EntropyCalibration2\nimages: 3c01\n")
    with pytest.raises(BuildConfigError, match="line 2"):
        read_cache_header(str(p))
    p.write_text("not a cache\n")
    with pytest.raises(BuildConfigError, match="not a TensorRT calibration"):
        read_cache_header(str(p))
    with pytest.raises(BuildConfigError, match="molmo-edge calibrate"):
        read_cache_header(str(tmp_path / "none.cache"))


def test_default_workspace():
    assert default_workspace_mb(None) == 1024
    assert default_workspace_mb(8 * 2**30) == 512 and default_workspace_mb(64 * 2**30) == 1024
    assert default_workspace_mb(2 * 2**30) == 256


# --- keys and stored engines ---------------------------------------------------------------------
def _key(bundle, env=ORIN, precision="fp16", max_seq=256, crops=4):
    from molmo_edge.runtime.bundle import load_bundle
    b = load_bundle(bundle)
    plan = build_plan(b.manifest, precision, trt_version=env.tensorrt)
    profiles = {"vision": vision_profiles(b.config, crops), "decoder": decoder_profiles(b.config, max_seq, crops)}
    return b, engine_key(bundle, b.manifest, plan, profiles, env, precision, "qdq")


def _store(bundle, key, age="2025-01-01T00:00:00+00:00"):
    path = os.path.join(bundle, "engines", key.dirname())
    os.makedirs(path, exist_ok=True)
    files = {}
    for role in ("vision", "decoder"):
        with open(os.path.join(path, f"{role}.plan"), "wb") as f:
            f.write(b"plan" * 10)
        files[role] = {"file": f"{role}.plan", "bytes": 40, "sha256": "x"}
    write_record(path, key, files, {"vision": 1.0})
    rec = json.load(open(os.path.join(path, "engine.json")))
    rec["built"] = age
    json.dump(rec, open(os.path.join(path, "engine.json"), "w"))
    return path


def test_engine_key_covers_everything(bundle):
    _, k = _key(bundle)
    assert k.digest == _key(bundle)[1].digest                          # deterministic
    assert k.dirname().startswith("orin-sm87-trt10.3.0.30-l4t36.4.3-fp16-")
    others = [_key(bundle, max_seq=512)[1], _key(bundle, crops=2)[1], _key(bundle, env=THOR)[1],
              _key(bundle, env=TrtEnv("10.3.0.30", "Orin", "8.7", "36.4.4", "6.2.1"))[1],
              _key(bundle, env=TrtEnv("10.3.0.26", "Orin", "8.7", "36.4.3", "6.2"))[1],
              _key(bundle, env=TrtEnv("10.3.0.30", "Orin", "8.6", "36.4.3", "6.2"))[1]]
    digests = {o.digest for o in others}
    assert k.digest not in digests and len(digests) == 6
    assert _key(bundle, env=THOR)[1].dirname().startswith("thor-sm110-trt10.13.3.9-l4t38.4.0-fp16-")
    assert "the bundle's decoder graph changed" not in " ".join(mismatches(k.fields(), k.fields()))
    assert mismatches(k.fields(), k.fields()) == []
    diff = mismatches(_key(bundle, env=THOR)[1].fields(), k.fields())
    assert any("tensorrt 10.13.3.9 (this machine: 10.3.0.30)" in d for d in diff)


def test_graph_hash_tracks_graph_content(bundle, tmp_path):
    from molmo_edge.runtime.bundle import load_bundle
    copy = str(tmp_path / "copy")
    shutil.copytree(bundle, copy)
    man = load_bundle(copy).manifest
    h = graph_hash(copy, man, "decoder")
    assert h == graph_hash(copy, man, "decoder") and h != graph_hash(copy, man, "vision")
    with open(os.path.join(copy, "decoder.onnx"), "r+b") as f:   # same size, other bytes
        f.seek(100)
        b = f.read(1)
        f.seek(100)
        f.write(bytes([b[0] ^ 1]))
    assert graph_hash(copy, man, "decoder") != h


def test_find_engine_current_stale_foreign(bundle, tmp_path):
    from molmo_edge.runtime.bundle import load_bundle
    folder = str(tmp_path / "b")
    shutil.copytree(bundle, folder)
    b, key = _key(folder)
    with pytest.raises(EngineError, match="no engines under.*molmo-edge build"):
        find_engine(folder, b.manifest, ORIN, "fp16")
    path = _store(folder, key)
    assert find_engine(folder, b.manifest, ORIN, "fp16").path == path
    assert classify(key.fields(), ORIN, {"vision": key.bundle["vision"], "decoder": key.bundle["decoder"]}) == "current"
    # a newer build with other profiles wins
    _, key2 = _key(folder, max_seq=128)
    path2 = _store(folder, key2, age="2025-06-01T00:00:00+00:00")
    assert find_engine(folder, b.manifest, ORIN, "fp16").path == path2
    shutil.rmtree(path2)
    # another machine: refused, naming both sides
    with pytest.raises(EngineError, match=r"built for TensorRT 10.3.0.30 on Orin \(sm_87\).*this machine has TensorRT "
                                          r"10.13.3.9 on NVIDIA Thor"):
        find_engine(folder, b.manifest, THOR, "fp16")
    assert classify(key.fields(), THOR, key.bundle) == "foreign"
    # int8 asked, only fp16 stored
    with pytest.raises(EngineError, match="no usable int8"):
        find_engine(folder, b.manifest, ORIN, "int8")
    # truncated plan file
    with open(os.path.join(path, "decoder.plan"), "wb") as f:
        f.write(b"x")
    with pytest.raises(EngineError, match="truncated or replaced"):
        find_engine(folder, b.manifest, ORIN, "fp16")
    with open(os.path.join(path, "decoder.plan"), "wb") as f:
        f.write(b"plan" * 10)
    # the bundle changes (re-export): stale, never loaded
    man = json.load(open(os.path.join(folder, "manifest.json")))
    man["created"] = "2099-01-01T00:00:00+00:00"
    json.dump(man, open(os.path.join(folder, "manifest.json"), "w"))
    man = load_bundle(folder).manifest
    with pytest.raises(EngineError, match="stale, the bundle's vision, decoder graph changed"):
        find_engine(folder, man, ORIN, "fp16")
    # a damaged record
    with open(os.path.join(path, "engine.json"), "w") as f:
        f.write("{")
    with pytest.raises(EngineError, match="no readable engine.json"):
        find_engine(folder, man, ORIN, "fp16", engine=path)
