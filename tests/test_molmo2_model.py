"""Molmo2 in the model layer: config, hub tensor names and sizes, and the torch reference against the
golden outputs of transformers 5.24 (Qwen3 backbone) and an independent numpy model (OLMo backbone)."""
import json

import numpy as np
import pytest

from molmo_edge.runtime.config import MolmoConfig, config_from_hf, load_config
from molmo_edge.runtime.prefix_mask import mm_token_types, prefix_mask
from molmo_edge.runtime.hf_names import hf_weight_shapes, parameter_count

torch = pytest.importorskip("torch")

from molmo_edge.export.checkpoint import WeightSource, load_reference_model  # noqa: E402
from molmo_edge.export.synthetic import MOLMO2_FAMILIES, make_random_checkpoint, molmo2_family_config  # noqa: E402

from numpy_molmo2 import molmo2_logits  # noqa: E402

CASES = ("chelsea_point", "video_pan", "text_only")
MODEL_INPUTS = ("input_ids", "pixel_values", "image_token_pooling", "pixel_values_videos", "video_token_pooling",
                "mm_token_type_ids")


@pytest.fixture(scope="module")
def m2golden(golden):
    root = golden / "molmo2"
    if not (root / "ckpt-qwen3-tiny" / "model.safetensors").exists():
        pytest.skip(f"Molmo2 golden data not found under {root}")
    return root


@pytest.fixture(scope="module")
def golden_model(m2golden):
    model, cfg, _ = load_reference_model(str(m2golden / "ckpt-qwen3-tiny"))
    return model, cfg


def _inputs(pre) -> dict:
    return {k: pre[k] for k in MODEL_INPUTS if k in pre.files}


# --- config and names ----------------------------------------------------------------------------
def test_golden_config_trims_the_vit_and_names_every_tensor(m2golden):
    cfg = load_config(str(m2golden / "ckpt-qwen3-tiny"))
    assert (cfg.layout, cfg.family, cfg.vision.layers, cfg.vit_layers) == ("molmo2", "molmo2-qwen3", 25, (24, 18))
    assert (cfg.vision.class_token, cfg.vision.num_pos, cfg.vision.activation) == (False, 729, "gelu_pytorch_tanh")
    assert (cfg.embedding_size, cfg.additional_vocab_size, cfg.q_dim, cfg.d_model) == (1024, 151040, 128, 64)
    assert (cfg.pooling.width, cfg.pooling.heads, cfg.pooling.mlp_dim, cfg.image_feature_dim) == (32, 4, 160, 64)
    assert cfg.qk_norm_per_head and not cfg.norm_after and cfg.rope_theta == 5e6 and cfg.rope_type == "default"
    assert (cfg.image_patch_id, cfg.eos_token_id, cfg.pad_token_id) == (151938, 151645, 151643)
    assert cfg.preprocess.max_crops == 8 and cfg.preprocess.image_mean == (0.5, 0.5, 0.5)
    src = WeightSource(str(m2golden / "ckpt-qwen3-tiny"))
    want = hf_weight_shapes(cfg)
    assert {n: src.shape(n) for n in src} == want                           # 442 names, every shape
    manifest = json.loads((m2golden / "manifest.json").read_text())
    assert parameter_count(cfg)["total"] == manifest["checkpoint"]["n_params"] == 10_338_712
    assert MolmoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_native_transformers_layout_reads_the_same(m2golden):
    hub = json.loads((m2golden / "ckpt-qwen3-tiny" / "config.json").read_text())
    vit = hub["vit_config"]
    native = {**hub, "vision_config": {"hidden_size": 32, "intermediate_size": 120, "num_hidden_layers": 25,
                                       "num_attention_heads": 4, "num_key_value_heads": 4, "head_dim": 8,
                                       "hidden_act": vit["hidden_act"], "layer_norm_eps": 1e-6, "image_size": [378, 378],
                                       "patch_size": 14, "num_position_embeddings": 729}}
    del native["vit_config"]
    ad = dict(hub["adapter_config"])
    ad["vision_feature_layer"] = [24, 18]
    del ad["vit_layers"]
    text = dict(hub["text_config"], rope_parameters={"rope_type": "default", "rope_theta": 5e6}, rms_norm_eps=1e-6,
                attention_bias=False)
    for k in ("rope_theta", "rope_scaling", "layer_norm_eps", "qkv_bias"):
        text.pop(k)
    native.update(adapter_config=ad, text_config=text)
    assert config_from_hf(native) == config_from_hf(hub)


def test_released_sizes_exact_parameter_counts():
    """Molmo2-4B from molmo2-spec.md §3; 8B and O-7B with the text sizes of their Qwen3-8B / OLMo-3-7B bases."""
    counts = {f: parameter_count(config_from_hf(molmo2_family_config(f, "full"))) for f in MOLMO2_FAMILIES}
    assert counts["molmo2-4b"] == {"vit": 382_505_936, "connector": 56_611_328, "llm": 4_411_751_936,
                                   "total": 4_850_869_200}
    assert counts["molmo2-8b"]["total"] == 8_661_703_120
    assert counts["molmo2-o-7b"]["total"] == 7_761_393_104
    # the 4B count by hand: 25 SigLIP blocks + patch/pos embeddings; pooling on 2x1152; 36 Qwen3 blocks
    vit_block = 4 * (1152 * 1152 + 1152) + 2 * 1152 * 4304 + 4304 + 1152 + 4 * 1152
    vit = 25 * vit_block + 588 * 1152 + 1152 + 729 * 1152
    connector = 3 * (2304 * 1152 + 1152) + 1152 * 1152 + 1152 + 2 * 1152 * 9728 + 9728 * 2560
    block = 2560 * (4096 + 2 * 1024) + 4096 * 2560 + 2 * 128 + 3 * 2560 * 9728 + 2 * 2560
    llm = 36 * block + (151936 + 128) * 2560 + 151936 * 2560 + 2560
    assert (vit, connector, llm) == (counts["molmo2-4b"]["vit"], counts["molmo2-4b"]["connector"], counts["molmo2-4b"]["llm"])
    o7 = config_from_hf(molmo2_family_config("molmo2-o-7b", "full"))
    assert (o7.rope_type, o7.rope_scaling_layers, o7.norm_after, o7.qk_norm_per_head) == ("yarn", (3, 7, 11, 15, 19, 23, 27, 31),
                                                                                         True, False)
    assert hf_weight_shapes(o7)["model.transformer.blocks.0.self_attn.q_norm.weight"] == (4096,)


# --- golden (transformers 5.24, Qwen3 backbone) --------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_golden_forward(m2golden, golden_model, case):
    model, _ = golden_model
    pre = np.load(m2golden / "cases" / f"{case}.preprocess.npz")
    ref = np.load(m2golden / "cases" / "q3" / f"{case}.forward.npz")
    trace = {}
    with torch.no_grad():
        out = model(**_inputs(pre), trace=trace)
    assert np.abs(out.logits[0].numpy() - ref["logits"]).max() < 1e-3
    close = dict(rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(trace["final_hidden"][0].numpy(), ref["final_hidden"], **close)
    np.testing.assert_allclose(trace["inputs_embeds"][0].numpy(), ref["inputs_embeds"], **close)
    if "lm_attention_mask" in ref.files:
        assert np.array_equal(trace["lm_attention_mask"].numpy(), ref["lm_attention_mask"])
        assert np.array_equal(prefix_mask(pre["mm_token_type_ids"][0]), ref["lm_attention_mask"])
    if "image_features" in ref.files and ref["image_features"].size:
        np.testing.assert_allclose(out.image_features[0].numpy(), ref["image_features"], **close)
        for k in ("vit_embeddings", "vit_last_hidden", "vit_features"):
            np.testing.assert_allclose(trace[k][0].numpy(), ref[f"{k}_crop0"], **close)


def test_token_types_from_ids_match_the_processor(m2golden, golden_model):
    _, cfg = golden_model
    for case in CASES:
        pre = np.load(m2golden / "cases" / f"{case}.preprocess.npz")
        assert np.array_equal(mm_token_types(cfg, pre["input_ids"]), pre["mm_token_type_ids"])


@pytest.mark.parametrize("case", ["chelsea_point", "text_only"])
def test_golden_greedy_tokens(m2golden, golden_model, case):
    model, cfg = golden_model
    pre = np.load(m2golden / "cases" / f"{case}.preprocess.npz")
    ref = json.loads((m2golden / "cases" / "q3" / f"{case}.generate.json").read_text())
    inputs = _inputs(pre)
    tokens = model.generate(inputs.pop("input_ids"), max_new_tokens=8, eos_token_id=cfg.eos_token_id, **inputs)
    assert tokens == ref["token_ids"]


# --- tiny synthetic families: numpy reference, cache ---------------------------------------------
@pytest.fixture(scope="module")
def molmo2_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("molmo2")
    return {f: make_random_checkpoint(str(root / f), f, seed=10 + i) for i, f in enumerate(MOLMO2_FAMILIES)}


def _image_prompt(cfg, n_tokens: int, rng) -> np.ndarray:
    """text, an image block (start, patches with a column token, end), more text, a second block, text."""
    ids = cfg.image_token_ids()
    half = n_tokens // 2
    block = lambda n: [ids["<im_start>"]] + [ids["<im_patch>"]] * n + [ids["<im_col>"], ids["<im_end>"]]  # noqa: E731
    seq = list(rng.integers(0, 300, 3)) + block(half) + list(rng.integers(0, 300, 2)) + block(n_tokens - half) + [7, 9]
    return np.asarray(seq, np.int64)


@pytest.mark.parametrize("family", MOLMO2_FAMILIES)
def test_families_match_numpy_reference(molmo2_checkpoints, family):
    from safetensors.numpy import load_file

    folder = molmo2_checkpoints[family]
    raw = json.loads(open(f"{folder}/config.json").read())
    model, cfg, _ = load_reference_model(folder)
    rng = np.random.default_rng(0)
    crops = rng.uniform(-1, 1, (2, 729, 588)).astype(np.float32)
    pooling = rng.integers(0, 2 * 729, (6, 4)).astype(np.int32)
    pooling[1, 3] = pooling[4, 0] = -1  # empty slots are masked out of the mean and the attention
    ids = _image_prompt(cfg, 6, rng)
    with torch.no_grad():
        got = model(ids, pixel_values=crops, image_token_pooling=pooling).logits[0].numpy()
    want = molmo2_logits(load_file(f"{folder}/model.safetensors"), raw, ids, crops, pooling)
    assert np.abs(got - want).max() < 1e-3 * max(1.0, np.abs(want).max())


def test_olmo_backbone_uses_yarn_on_listed_layers_only(molmo2_checkpoints):
    from safetensors.numpy import load_file

    folder = molmo2_checkpoints["molmo2-o-7b"]
    raw = json.loads(open(f"{folder}/config.json").read())
    model, cfg, _ = load_reference_model(folder)
    assert (cfg.rope_scaling_layers, cfg.norm_after, cfg.qk_norm_per_head) == ((3,), True, False)
    ids = np.arange(40, dtype=np.int64) * 7 % 500
    with torch.no_grad():
        got = model(ids).logits[0].numpy()
    W = load_file(f"{folder}/model.safetensors")
    assert np.abs(got - molmo2_logits(W, raw, ids)).max() < 1e-3
    # the scaling matters: all layers plain (or all scaled) gives other logits
    for layers in ([], [0, 1, 2, 3]):
        other = json.loads(json.dumps(raw))
        other["text_config"]["rope_scaling_layers"] = layers
        assert np.abs(got - molmo2_logits(W, other, ids)).max() > 1e-3


@pytest.mark.parametrize("family", ["molmo2-4b", "molmo2-o-7b"])
def test_cached_generation_equals_full_recompute(molmo2_checkpoints, family):
    model, cfg, _ = load_reference_model(molmo2_checkpoints[family])
    rng = np.random.default_rng(1)
    crops = rng.uniform(-1, 1, (1, 729, 588)).astype(np.float32)
    pooling = rng.integers(0, 729, (4, 4)).astype(np.int32)
    ids = _image_prompt(cfg, 4, rng)
    tokens = model.generate(ids, max_new_tokens=5, pixel_values=crops, image_token_pooling=pooling)
    seq = ids.tolist()
    with torch.no_grad():
        for _ in range(5):  # new tokens are text: the full re-forward keeps them causal
            seq.append(int(model(np.asarray(seq), pixel_values=crops, image_token_pooling=pooling).logits[0, -1].argmax()))
    assert tokens == seq[len(ids):]


def test_mismatched_image_tokens_fail_clearly(molmo2_checkpoints):
    model, cfg, _ = load_reference_model(molmo2_checkpoints["molmo2-4b"])
    ids = _image_prompt(cfg, 4, np.random.default_rng(2))
    with pytest.raises(ValueError, match="4 <im_patch> tokens but 3 image features"):
        model(ids, pixel_values=np.zeros((1, 729, 588), np.float32), image_token_pooling=np.zeros((3, 4), np.int32))


@pytest.mark.parametrize("case", ["video_pan"])
def test_cli_forward_torch_writes_golden_logits(m2golden, tmp_path, case):
    from molmo_edge.runtime.cli.main import main

    out = tmp_path / "out.npz"
    assert main(["forward", str(m2golden / "ckpt-qwen3-tiny"), "--inputs", str(m2golden / "cases" / f"{case}.preprocess.npz"),
                 "-o", str(out), "--backend", "torch"]) == 0
    got, ref = np.load(out), np.load(m2golden / "cases" / "q3" / f"{case}.forward.npz")
    assert got["logits"].dtype == np.float32 and got["logits"].shape == ref["logits"].shape
    assert np.abs(got["logits"] - ref["logits"]).max() < 1e-3
    np.testing.assert_allclose(got["image_features"], ref["image_features"], rtol=1e-4, atol=1e-3)


def test_plan_and_engine_profiles_cover_molmo2():
    """`plan` for Molmo2-4B/8B on every Jetson in the table; TensorRT profiles carry the new inputs."""
    from molmo_edge.runtime.backends.trt_engines import (decoder_profiles, molmo2_image_tokens, vision_profiles)
    from molmo_edge.runtime.device.plan import PlanSettings, make_plan
    from molmo_edge.runtime.device.targets import DEVICES

    four = config_from_hf(molmo2_family_config("molmo2-4b", "full"))
    assert molmo2_image_tokens(four, 1, 2) == (518, 550)  # the golden chelsea image: 518 <im_patch>, T = 550 + text
    assert four.tokens_per_crop == 196
    for family in ("molmo2-4b", "molmo2-8b"):
        cfg = config_from_hf(molmo2_family_config(family, "full"))
        for dev in DEVICES.values():
            plan = make_plan(cfg, dev, PlanSettings(precision="int4", max_crops=8, max_seq=4096))
            assert plan.total_gib > 0 and plan.floors_ms["decode_per_token"] > 0
    nano = make_plan(four, DEVICES["orin-nano-8gb"], PlanSettings(precision="int4", max_crops=8, max_seq=4096))
    assert nano.fits and nano.memory_gib["decoder weights (int4)"] < 2.5
    (vp,) = vision_profiles(four, 8)
    assert set(vp.shapes) == {"pixel_values", "pooling"} and vp.shapes["pooling"].max[1] == 9
    assert all("token_types" in p.shapes for p in decoder_profiles(four, 4096, 8))


def test_resaved_checkpoint_with_equal_embedding_halves_loads(m2golden, tmp_path):
    """transformers 5.24's save_pretrained splits the embedding into two equal halves (spec trap 16): same rows
    in total, so it loads (re-split at vocab_size) and gives the golden logits."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = m2golden / "ckpt-qwen3-tiny"
    dst = tmp_path / "resaved"
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors"))
    state = load_file(str(src / "model.safetensors"))
    table = torch.cat([state.pop("model.transformer.wte.embedding"), state.pop("model.transformer.wte.new_embedding")])
    half = table.shape[0] // 2
    state["model.transformer.wte.embedding"], state["model.transformer.wte.new_embedding"] = table[:half], table[half:]
    save_file(state, str(dst / "model.safetensors"))
    model, _, _ = load_reference_model(str(dst))
    pre = np.load(m2golden / "cases" / "text_only.preprocess.npz")
    ref = np.load(m2golden / "cases" / "q3" / "text_only.forward.npz")
    with torch.no_grad():
        logits = model(**_inputs(pre)).logits[0].numpy()
    assert np.abs(logits - ref["logits"]).max() < 1e-3
