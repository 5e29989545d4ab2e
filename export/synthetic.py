"""Random-weight Molmo checkpoints in the exact Hugging Face layout of each released family.

Used by the tests (tiny widths), the benchmarks (full width, fewer layers) and the demo. The
weights are untrained: answers are gibberish, and the folder says so in its README. Tensors are
generated and written one shard at a time, so full-width checkpoints never sit in memory whole.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from molmo_edge.runtime.config import IMAGE_TOKENS, config_from_hf
from molmo_edge.runtime.hf_names import hf_weight_shapes

FAMILIES = ("molmoe-1b", "molmo-7b-o", "molmo-7b-d", "molmo-72b")
MOLMO2_FAMILIES = ("molmo2-4b", "molmo2-8b", "molmo2-o-7b")

# Real released dimensions (molmo-spec.md §1.3); "tiny" shrinks widths, keeps every structural feature.
_REAL = {
    "molmoe-1b": dict(d=2048, heads=16, kv=16, layers=16, hidden=2048, experts=64, top_k=8, eps=1e-5, theta=1e4,
                      qk_norm=True, norm_after=False, qkv_bias=False),
    "molmo-7b-o": dict(d=4096, heads=32, kv=32, layers=32, hidden=22016, eps=1e-6, theta=5e5,
                       qk_norm=True, norm_after=True, qkv_bias=False),
    "molmo-7b-d": dict(d=3584, heads=28, kv=4, layers=28, hidden=37888, eps=1e-6, theta=1e6,
                       qk_norm=False, norm_after=False, qkv_bias=True),
    "molmo-72b": dict(d=8192, heads=64, kv=8, layers=80, hidden=59136, eps=1e-5, theta=1e6,
                      qk_norm=False, norm_after=False, qkv_bias=True),
}
_TINY = {
    "molmoe-1b": dict(d=64, heads=4, kv=4, layers=2, hidden=64, experts=8, top_k=2),
    "molmo-7b-o": dict(d=64, heads=4, kv=4, layers=2, hidden=192),
    "molmo-7b-d": dict(d=64, heads=4, kv=2, layers=2, hidden=192),
    "molmo-72b": dict(d=128, heads=8, kv=2, layers=2, hidden=256),
}
TINY_VISION = dict(image_emb_dim=32, image_num_heads=2, image_num_key_value_heads=2, image_head_dim=16,
                   image_mlp_dim=64, image_num_layers=10, image_num_pos=577, image_norm_eps=1e-5,
                   image_default_input_size=[336, 336], image_patch_size=14, image_mlp_activations="quick_gelu")

# Molmo2 (molmo2-spec.md §3). 4B: the spec's table (Molmo2-4B hub config). 8B: Qwen3-8B's text sizes;
# O-7B: OLMo-3-7B's (MHA, 11008 MLP, 100352-row padded vocab, YaRN x8 on every 4th layer, post-norm,
# full-width q/k norm). The ViT (SigLIP so400m, 27 declared / 25 stored blocks) and adapter are shared;
# the adapter MLP is the text MLP width, its output the text width.
_MOLMO2_TEXT = {
    "molmo2-4b": dict(hidden_size=2560, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=9728, vocab_size=151936, rope_theta=5e6, max_position_embeddings=36864,
                      qk_norm_type="qwen3", norm_after=False),
    "molmo2-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                      intermediate_size=12288, vocab_size=151936, rope_theta=1e6, max_position_embeddings=36864,
                      qk_norm_type="qwen3", norm_after=False),
    "molmo2-o-7b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                        intermediate_size=11008, vocab_size=100352, rope_theta=5e5, max_position_embeddings=65536,
                        qk_norm_type="olmo", norm_after=True,
                        rope_scaling={"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 8192,
                                      "attention_factor": 1.2079441541679836, "beta_fast": 32, "beta_slow": 1},
                        rope_scaling_layers=list(range(3, 32, 4))),
}
_MOLMO2_TINY_TEXT = {  # widths of the golden tiny checkpoints (q width != hidden, GQA; OLMo: MHA, YaRN on layer 3)
    "molmo2-4b": dict(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      intermediate_size=160),
    "molmo2-8b": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                      intermediate_size=128),
    "molmo2-o-7b": dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=16,
                        intermediate_size=176, rope_scaling_layers=[3]),
}
MOLMO2_VIT = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                  num_key_value_heads=16, head_dim=72, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6,
                  image_default_input_size=[378, 378], image_patch_size=14, image_num_pos=729)
# tiny: 32 wide; 9 declared layers so the taps [-3, -9] resolve to [6, 0] and 7 blocks are stored
MOLMO2_TINY_VIT = dict(MOLMO2_VIT, hidden_size=32, intermediate_size=120, num_hidden_layers=9, num_attention_heads=4,
                       num_key_value_heads=4, head_dim=8)
MOLMO2_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
                 "<frame_start>", "<frame_end>", "<|video|>")  # ids vocab+0.. in this order, as in the released models


def molmo2_family_config(family: str, size: str = "tiny", n_layers: int | None = None,
                         vocab_size: int | None = None) -> dict:
    """A Molmo2 hub `config.json` (keys vit_config/adapter_config/text_config, legacy names)."""
    text = dict(_MOLMO2_TEXT[family], **(_MOLMO2_TINY_TEXT[family] if size == "tiny" else {}))
    if size == "tiny":
        text["vocab_size"] = 512
    if vocab_size:
        text["vocab_size"] = vocab_size
    if n_layers:
        text["num_hidden_layers"] = n_layers
        if text.get("rope_scaling_layers"):
            text["rope_scaling_layers"] = [i for i in text["rope_scaling_layers"] if i < n_layers]
    vit = MOLMO2_TINY_VIT if size == "tiny" else MOLMO2_VIT
    text = {"model_type": "molmo2_text", "additional_vocab_size": 128, "qkv_bias": False, "use_qk_norm": True,
            "layer_norm_eps": 1e-6, "hidden_act": "silu", "rope_scaling": None, "rope_scaling_layers": None,
            "tie_word_embeddings": False, **text}
    adapter = {"model_type": "molmo2", "vit_layers": [-3, -9], "hidden_size": vit["hidden_size"],
               "num_attention_heads": vit["num_attention_heads"], "num_key_value_heads": vit["num_key_value_heads"],
               "head_dim": vit["head_dim"], "intermediate_size": text["intermediate_size"],
               "text_hidden_size": text["hidden_size"], "hidden_act": "silu", "pooling_attention_mask": True,
               "float32_attention": True}
    ids = {name: text["vocab_size"] + i for i, name in enumerate(MOLMO2_TOKENS)}
    return {"model_type": "molmo2", "architectures": ["Molmo2ForConditionalGeneration"],
            "vit_config": {"model_type": "molmo2", **vit}, "adapter_config": adapter, "text_config": text,
            "image_start_token_id": ids["<im_start>"], "image_end_token_id": ids["<im_end>"],
            "image_patch_id": ids["<im_patch>"], "image_high_res_id": ids["<im_patch>"], "image_col_id": ids["<im_col>"],
            "low_res_image_start_token_id": ids["<low_res_im_start>"], "image_low_res_id": ids["<im_low>"],
            "frame_start_token_id": ids["<frame_start>"], "frame_end_token_id": ids["<frame_end>"],
            "use_frame_special_tokens": True, "tie_word_embeddings": False}


def _molmo2_processor_files(folder: str, cfg: dict, eos_id: int, pad_id: int) -> None:
    """generation/preprocessor/processor/video configs as the released Molmo2 folders have them."""
    common = {"do_convert_rgb": True, "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "patch_size": 14, "resample": 2,
              "size": {"height": 378, "width": 378}, "processor_class": "Molmo2Processor"}
    files = {
        "generation_config.json": {"bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": pad_id},
        "preprocessor_config.json": {**common, "image_processor_type": "Molmo2ImageProcessor", "max_crops": 8,
                                     "overlap_margins": [4, 4], "pooling_size": [2, 2]},
        "video_preprocessor_config.json": {**common, "video_processor_type": "Molmo2VideoProcessor", "do_rescale": True,
                                           "rescale_factor": 1 / 255, "do_normalize": True, "do_sample_frames": True,
                                           "max_fps": 2, "num_frames": 64, "pooling_size": [3, 3]},
        "processor_config.json": {"processor_class": "Molmo2Processor", "image_use_col_tokens": True,
                                  "use_single_crop_col_tokens": None, "use_single_crop_start_token": True,
                                  "video_use_col_tokens": False, "use_frame_special_tokens": True},
    }
    for name, body in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(body, f, indent=2)


def _molmo2_tokenizer(folder: str, vocab_size: int) -> tuple[int, int]:
    """A small byte-level BPE with Qwen's chat tokens, padded to `vocab_size`, then Molmo2's ten
    image/frame tokens at vocab_size.. (ids as config.json says). Returns (eos id, pad id)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the trained tokenizer ({n})")
    tok.add_tokens([f"|<EXTRA_TOKENS_{i}>|" for i in range(vocab_size - n)])
    tok.add_special_tokens(list(MOLMO2_TOKENS))
    tok.save(os.path.join(folder, "tokenizer.json"))
    meta = {"bos_token": "<|im_end|>", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
            "additional_special_tokens": list(MOLMO2_TOKENS)}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**meta, "add_bos_token": False, "add_prefix_space": False, "tokenizer_class": "Qwen2Tokenizer"}, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump(meta, f, indent=2)
    return tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")


_CORPUS = ("The quick brown fox jumps over the lazy dog. A robot points to the red cup on the table. "
           "How many people are in line? There are none. Counting the cups shows a total of 3. "
           "Describe this image. The sea is calm and blue under a bright sky. Point to the person.")


def _tokenizer(folder: str, vocab_size: int, eos: str, pad: str | None, bos_is_eos: bool) -> int:
    """Train a small byte-level BPE, pad it to `vocab_size` like OLMo's build_tokenizer, then add the
    five image tokens right after (ids vocab_size..vocab_size+4). Returns the text vocab size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [eos] + ([pad] if pad else [])
    trainer = trainers.BpeTrainer(vocab_size=min(vocab_size, 400), special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS] * 4, trainer)
    n = tok.get_vocab_size(with_added_tokens=True)
    if n > vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the trained tokenizer ({n})")
    tok.add_tokens([f"|<EXTRA_TOKENS_{i}>|" for i in range(vocab_size - n)])
    tok.add_special_tokens(list(IMAGE_TOKENS))
    tok.save(os.path.join(folder, "tokenizer.json"))
    meta = {"eos_token": eos, "bos_token": eos if bos_is_eos else None, "pad_token": pad or eos,
            "additional_special_tokens": list(IMAGE_TOKENS)}
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump({**meta, "add_bos_token": False, "add_prefix_space": False}, f, indent=2)
    with open(os.path.join(folder, "special_tokens_map.json"), "w") as f:
        json.dump({k: v for k, v in meta.items() if v is not None}, f, indent=2)
    return vocab_size


def family_config(family: str, size: str = "tiny", n_layers: int | None = None,
                  vocab_size: int = 512) -> dict:
    """config.json contents for a family: "tiny" (test widths) or "full" (real widths)."""
    if family in MOLMO2_FAMILIES:
        return molmo2_family_config(family, size, n_layers, None if vocab_size == 512 else vocab_size)
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES + MOLMO2_FAMILIES)}")
    p = dict(_REAL[family], **(_TINY[family] if size == "tiny" else {}))
    layers = n_layers or p["layers"]
    vision = TINY_VISION if size == "tiny" else None
    if family == "molmoe-1b":  # flat OLMo-style keys, as in the real MolmoE config.json
        emb = -(-(vocab_size + len(IMAGE_TOKENS)) // 64) * 64
        cfg = {"model_type": "molmo", "architectures": ["OLMoForCausalLM"], "block_type": "moe",
               "d_model": p["d"], "n_heads": p["heads"], "n_kv_heads": None, "n_layers": layers, "mlp_ratio": p["hidden"] // p["d"],
               "mlp_hidden_size": None, "moe_num_experts": p["experts"], "moe_top_k": p["top_k"],
               "attention_layer_norm": True, "layer_norm_type": "rms", "layer_norm_eps": p["eps"], "qkv_bias": False,
               "include_bias": False, "norm_after": False, "rope": True, "rope_theta": p["theta"], "rope_impl": "llama",
               "max_position_embeddings": 32768, "max_sequence_length": 4096, "vocab_size": vocab_size,
               "embedding_size": emb, "additional_vocab_size": 128, "weight_tying": False,
               "vit_layers": [-2, -9], "image_pooling_2d": "attention-meanq", "image_pooling_h": 2, "image_pooling_w": 2,
               "image_projector": "mlp", "image_padding_embed": "pad_and_partial_pad", "crop_mode": "overlap-and-resize-c2",
               "max_crops": 12, "overlap_margins": [4, 4], "message_formatting": "role", "always_start_with_space": True,
               "pad_token_id": 1}
        if vision:
            cfg["vision_backbone"] = vision
    else:  # HF-style keys (Molmo-7B-O/7B-D/72B); the vision tower is hard-coded there, so tiny adds a section
        cfg = {"model_type": "molmo", "architectures": ["MolmoForCausalLM"], "hidden_size": p["d"],
               "num_attention_heads": p["heads"], "num_key_value_heads": p["kv"], "num_hidden_layers": layers,
               "intermediate_size": p["hidden"], "attention_layer_norm": p["qk_norm"], "norm_after": p["norm_after"],
               "qkv_bias": p["qkv_bias"], "layer_norm_type": "rms", "layer_norm_eps": p["eps"], "rope_theta": p["theta"],
               "max_position_embeddings": 4096, "vocab_size": vocab_size, "embedding_size": vocab_size,
               "clip_qkv": None, "tie_word_embeddings": False, "weight_tying": False, "torch_dtype": "float32",
               "use_position_ids": True}
        if vision:
            cfg["vision_backbone"] = vision
    return cfg


def _random_tensor(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    leaf = name.rsplit(".", 1)[-1]
    if "norm" in name or name.endswith(("pre_ln.weight", "ln_f.weight")):
        return (1.0 + 0.2 * rng.standard_normal(shape)).astype(np.float32) if leaf == "weight" else \
            (0.1 * rng.standard_normal(shape)).astype(np.float32)
    if leaf == "bias":
        return (0.05 * rng.standard_normal(shape)).astype(np.float32)
    if leaf in ("embedding", "new_embedding") or name.endswith(("class_embedding", "positional_embedding", "pad_embed")):
        return (0.5 * rng.standard_normal(shape)).astype(np.float32)
    std = 1.0 / np.sqrt(shape[-1])
    return (std * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)


def write_torch_zip(path: str, shapes: dict[str, tuple[int, ...]], make, dtype) -> None:
    """Write a state dict in torch.save's zip format one tensor at a time (`make(name)` -> tensor), never
    holding more than one: the pickle names every storage first, then each storage's bytes are streamed
    in as its own record. torch.load(..., mmap=True, weights_only=True) reads it like torch.save's output."""
    import collections
    import io
    import pickle

    import torch

    storage_type = {torch.float32: torch.FloatStorage, torch.float16: torch.HalfStorage,
                    torch.bfloat16: torch.BFloat16Storage}[dtype]

    class _Storage:
        def __init__(self, key: str, numel: int):
            self.key, self.numel = key, numel

    class _Tensor:
        def __init__(self, key: str, shape: tuple[int, ...]):
            self.storage, self.shape = _Storage(key, int(np.prod(shape)) if shape else 1), tuple(shape)

    def rebuild(t: _Tensor):
        stride, acc = [], 1
        for d in reversed(t.shape):
            stride.insert(0, acc)
            acc *= d
        return torch._utils._rebuild_tensor_v2, (t.storage, 0, t.shape, tuple(stride), False, collections.OrderedDict())

    class _Pickler(pickle.Pickler):
        dispatch_table = {_Tensor: rebuild}

        def persistent_id(self, obj):
            if isinstance(obj, _Storage):
                return ("storage", storage_type, obj.key, "cpu", obj.numel)
            return None

    names = list(shapes)
    state = collections.OrderedDict((n, _Tensor(str(i), shapes[n])) for i, n in enumerate(names))
    buf = io.BytesIO()
    _Pickler(buf, protocol=2).dump(state)
    writer = torch._C.PyTorchFileWriter(path)
    data = buf.getvalue()
    writer.write_record("data.pkl", data, len(data))
    writer.write_record(".format_version", "1", 1)
    writer.write_record("byteorder", "little", len("little"))
    for i, n in enumerate(names):
        t = make(n).contiguous()
        if tuple(t.shape) != tuple(shapes[n]) or t.dtype != dtype:
            raise ValueError(f"{n}: made {tuple(t.shape)} {t.dtype}, expected {tuple(shapes[n])} {dtype}")
        storage = t.untyped_storage()
        writer.write_record(f"data/{i}", storage, storage.nbytes())
        del t, storage
    writer.write_end_of_file()


def make_random_checkpoint(folder: str, family: str = "molmoe-1b", size: str = "tiny", n_layers: int | None = None,
                           vocab_size: int = 512, dtype: str = "float32", fmt: str = "safetensors",
                           shard_bytes: int = 2 << 30, seed: int = 0, tokenizer_from: str | None = None) -> str:
    """Write a random checkpoint folder: config.json, generation/preprocessor configs, tokenizer, weights.

    fmt: "safetensors" (one file, or shards with an index when larger than shard_bytes),
    "sharded" (always several safetensors shards), or "bin" (pytorch_model.bin, torch's zip format, written
    one tensor at a time so a full-size checkpoint never sits in memory).
    tokenizer_from: copy tokenizer files from this checkpoint (vocab_size then follows its config).
    Molmo2 families (MOLMO2_FAMILIES) get the hub layout: config sections, processor files, tokenizer.
    """
    os.makedirs(folder, exist_ok=True)
    if tokenizer_from:
        for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json"):
            if os.path.exists(os.path.join(tokenizer_from, f)):
                shutil.copy(os.path.join(tokenizer_from, f), folder)
        with open(os.path.join(tokenizer_from, "config.json")) as f:
            vocab_size = json.load(f)["vocab_size"]
    qwen = family in ("molmo-7b-d", "molmo-72b")
    eos, pad = ("<|endoftext|>", None) if qwen else ("<|endoftext|>", "<|padding|>")
    cfg = family_config(family, size, n_layers, vocab_size)
    if family in MOLMO2_FAMILIES:
        eos_id, pad_id = _molmo2_tokenizer(folder, cfg["text_config"]["vocab_size"])
        _molmo2_processor_files(folder, cfg, eos_id, pad_id)
    elif not tokenizer_from:
        _tokenizer(folder, vocab_size, eos, pad, bos_is_eos=not qwen)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    if family in MOLMO2_FAMILIES:
        return _write_weights(folder, family, size, cfg, dtype, fmt, shard_bytes, seed)
    from tokenizers import Tokenizer
    eos_id = Tokenizer.from_file(os.path.join(folder, "tokenizer.json")).token_to_id(eos)
    with open(os.path.join(folder, "generation_config.json"), "w") as f:
        json.dump({"eos_token_id": eos_id, "pad_token_id": 1 if pad else eos_id}, f, indent=2)
    with open(os.path.join(folder, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "MolmoImageProcessor", "base_image_input_size": [336, 336],
                   "image_patch_size": 14, "image_token_length_h": 12, "image_token_length_w": 12, "max_crops": 12,
                   "overlap_margins": [4, 4], "image_padding_mask": True, "do_normalize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]},
                  f, indent=2)
    return _write_weights(folder, family, size, cfg, dtype, fmt, shard_bytes, seed)


def _write_weights(folder: str, family: str, size: str, cfg: dict, dtype: str, fmt: str, shard_bytes: int,
                   seed: int) -> str:
    import torch
    from safetensors.torch import save_file

    with open(os.path.join(folder, "README.md"), "w") as f:
        f.write(f"# UNTRAINED random-weight {family} ({size}) checkpoint\n\nMade by molmo-edge for tests and demos. "
                "Its answers are meaningless; use a real checkpoint (e.g. allenai/MolmoE-1B-0924) for real answers.\n")

    shapes = hf_weight_shapes(config_from_hf(cfg))
    rng = np.random.default_rng(seed)
    tdtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    elem = torch.tensor([], dtype=tdtype).element_size()
    if fmt == "bin":
        write_torch_zip(os.path.join(folder, "pytorch_model.bin"), shapes,
                        lambda n: torch.from_numpy(_random_tensor(n, shapes[n], rng)).to(tdtype), tdtype)
        return folder
    total = sum(int(np.prod(s)) * elem for s in shapes.values())
    limit = max(1, total // 3 + 1) if fmt == "sharded" else shard_bytes
    groups: list[list[str]] = [[]]
    size_now = 0
    for n, s in shapes.items():
        nb = int(np.prod(s)) * elem
        if groups[-1] and size_now + nb > limit:
            groups.append([])
            size_now = 0
        groups[-1].append(n)
        size_now += nb
    if len(groups) == 1:
        state = {n: torch.from_numpy(_random_tensor(n, shapes[n], rng)).to(tdtype) for n in groups[0]}
        save_file(state, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return folder
    weight_map = {}
    for i, names in enumerate(groups):
        shard = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        state = {n: torch.from_numpy(_random_tensor(n, shapes[n], rng)).to(tdtype) for n in names}
        save_file(state, os.path.join(folder, shard), metadata={"format": "pt"})
        weight_map.update({n: shard for n in names})
        del state
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return folder
