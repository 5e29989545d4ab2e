import json

import pytest

from molmo_edge.runtime.config import ConfigError, config_from_hf, load_config
from molmo_edge.runtime.hf_names import hf_weight_shapes, parameter_count

MOLMOE_REAL = {  # allenai/MolmoE-1B-0924 config.json, the keys that matter (molmo-spec.md §2.1)
    "model_type": "molmo", "block_type": "moe", "d_model": 2048, "n_heads": 16, "n_kv_heads": None, "n_layers": 16,
    "mlp_ratio": 1, "mlp_hidden_size": None, "moe_num_experts": 64, "moe_top_k": 8, "attention_layer_norm": True,
    "layer_norm_type": "rms", "layer_norm_eps": 1e-5, "qkv_bias": False, "include_bias": False, "norm_after": False,
    "rope_theta": 10000.0, "max_position_embeddings": 32768, "max_sequence_length": 4096, "vocab_size": 50280,
    "embedding_size": 50304, "additional_vocab_size": 128, "vit_layers": [-2, -9],
    "vision_backbone": {"image_emb_dim": 1024, "image_num_layers": 23, "image_num_heads": 16, "image_head_dim": 64,
                        "image_mlp_dim": 4096, "image_mlp_activations": "quick_gelu", "image_num_pos": 577,
                        "image_norm_eps": 1e-5, "image_default_input_size": [336, 336], "image_patch_size": 14},
}
HF_STYLE = {"model_type": "molmo", "layer_norm_type": "rms", "max_position_embeddings": 4096, "tie_word_embeddings": False}
MOLMO_7B_D = {**HF_STYLE, "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4, "num_hidden_layers": 28,
              "intermediate_size": 37888, "vocab_size": 152064, "embedding_size": 152064, "qkv_bias": True,
              "attention_layer_norm": False, "norm_after": False, "layer_norm_eps": 1e-6, "rope_theta": 1000000.0}
MOLMO_7B_O = {**HF_STYLE, "hidden_size": 4096, "num_attention_heads": 32, "num_key_value_heads": None, "num_hidden_layers": 32,
              "intermediate_size": 22016, "vocab_size": 100278, "embedding_size": 100352, "qkv_bias": False,
              "attention_layer_norm": True, "norm_after": True, "layer_norm_eps": 1e-6, "rope_theta": 500000.0}
MOLMO_72B = {**HF_STYLE, "hidden_size": 8192, "num_attention_heads": 64, "num_key_value_heads": 8, "num_hidden_layers": 80,
             "intermediate_size": 59136, "vocab_size": 152064, "embedding_size": 152064, "qkv_bias": True,
             "attention_layer_norm": False, "norm_after": False, "layer_norm_eps": 1e-5, "rope_theta": 1000000.0}


def test_real_parameter_counts_exact():
    assert parameter_count(config_from_hf(MOLMOE_REAL))["total"] == 7_221_875_712
    assert parameter_count(config_from_hf(MOLMO_7B_D))["total"] == 8_021_025_280
    # active parameters per token of MolmoE (spec: ~1.58 B)
    assert round(parameter_count(config_from_hf(MOLMOE_REAL))["active"] / 1e9, 2) == 1.58


def test_families_as_data():
    e, d, o, x = (config_from_hf(c) for c in (MOLMOE_REAL, MOLMO_7B_D, MOLMO_7B_O, MOLMO_72B))
    assert (e.family, e.layout, e.moe_top_k, e.qk_norm, e.ffn_inner, e.head_dim) == ("molmoe", "molmoe", 8, True, 1024, 128)
    assert (d.family, d.layout, d.n_kv_heads, d.qkv_bias, d.ffn_inner, d.norm_eps) == ("qwen2-dense", "molmo", 4, True, 18944, 1e-6)
    assert (o.family, o.norm_after, o.qk_norm, o.n_kv_heads, o.kv_dim) == ("olmo-dense", True, True, 32, 4096)
    assert (x.n_layers, x.n_kv_heads, x.d_model) == (80, 8, 8192)
    # image special tokens follow the text vocabulary (molmo-spec §3.7)
    assert e.image_token_ids()["<im_patch>"] == 50282
    assert o.image_token_ids()["<im_start>"] == 100278
    assert d.image_token_ids()["<|image|>"] == 152068
    assert e.crop_zero_rule == "any" and d.crop_zero_rule == "all"


def test_vision_defaults_and_override():
    d = config_from_hf(MOLMO_7B_D)
    assert (d.vision.width, d.vision.layers, d.vision.heads, d.vision.num_patches, d.image_feature_dim) == (1024, 23, 16, 576, 2048)
    small = config_from_hf({**MOLMO_7B_D, "vision_backbone": {"image_emb_dim": 32, "image_num_heads": 2, "image_head_dim": 16,
                                                             "image_mlp_dim": 64, "image_num_layers": 10}})
    assert (small.vision.width, small.vision.heads, small.vision.kv_heads, small.vision.layers) == (32, 2, 2, 10)
    names = hf_weight_shapes(small)
    assert names["model.vision_backbone.image_pooling_2d.wq.weight"] == (32, 64)
    assert names["model.transformer.ff_out.weight"] == (152064, 3584)  # dense families: LM head is transformer.ff_out
    assert "model.transformer.blocks.0.att_proj.bias" in names


def test_golden_config(golden):
    cfg = load_config(str(golden / "molmoe-tiny"))
    assert (cfg.d_model, cfg.n_layers, cfg.moe_num_experts, cfg.moe_top_k, cfg.vision.layers) == (64, 3, 8, 2, 10)
    assert cfg.eos_token_id == 50279 and cfg.preprocess.max_crops == 12 and cfg.preprocess.overlap_margins == (4, 4)


def test_round_trip_dict():
    cfg = config_from_hf(MOLMOE_REAL)
    from molmo_edge.runtime.config import MolmoConfig
    assert MolmoConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("bad,msg", [
    ({"model_type": "llava"}, "not a Molmo 0924"),
    ({"model_type": "molmo2"}, "lacks one of vit_config"),
    ({"model_type": "molmo", "foo": 1}, "neither `d_model`"),
    ({**MOLMO_7B_D, "num_attention_heads": None}, "null or non-numeric"),
    ({**MOLMOE_REAL, "image_pooling_2d": "2x2"}, "attention-meanq"),
])
def test_bad_configs(bad, msg):
    with pytest.raises(ConfigError, match=msg):
        config_from_hf(bad)


def test_missing_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(str(tmp_path))
