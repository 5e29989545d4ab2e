"""One config object for every released Molmo family, read from a checkpoint's `config.json`.

Two key styles exist (molmo-spec.md §2): MolmoE-1B uses flat OLMo-style keys (`d_model`,
`n_layers`, `block_type: moe`) and nests its tensors under `attn.`/`mlp.`; Molmo-7B-O/7B-D/72B
use HF-style keys (`hidden_size`, `num_hidden_layers`) with tensors flat under `blocks.N`.
Differences between families are fields here, never subclasses.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from molmo_edge.runtime.errors import MolmoEdgeError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGE_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<|image|>")


class ConfigError(MolmoEdgeError):
    """A checkpoint's config.json cannot describe a Molmo model."""


@dataclass(frozen=True)
class VisionConfig:
    """The CLIP ViT-L/14-336 tower (23 of 24 blocks kept) unless a `vision_backbone` section says otherwise."""
    width: int = 1024
    heads: int = 16
    head_dim: int = 64
    kv_heads: int = 16
    mlp_dim: int = 4096
    layers: int = 23
    num_pos: int = 577
    norm_eps: float = 1e-5
    input_size: tuple[int, int] = (336, 336)
    patch_size: int = 14
    activation: str = "quick_gelu"

    @property
    def patches_per_side(self) -> tuple[int, int]:
        return self.input_size[0] // self.patch_size, self.input_size[1] // self.patch_size

    @property
    def num_patches(self) -> int:
        h, w = self.patches_per_side
        return h * w

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * 3


@dataclass(frozen=True)
class PreprocessConfig:
    """Image processor settings (preprocessor_config.json; identical defaults for all four models)."""
    max_crops: int = 12
    overlap_margins: tuple[int, int] = (4, 4)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    image_token_length_h: int = 12
    image_token_length_w: int = 12
    image_padding_mask: bool = True
    message_format: str = "role"
    always_start_with_space: bool = True


@dataclass(frozen=True)
class MolmoConfig:
    layout: str                 # "molmoe" (attn./mlp. nesting, lm_head) or "molmo" (flat blocks, transformer.ff_out head)
    d_model: int
    n_heads: int
    n_kv_heads: int
    n_layers: int
    head_dim: int
    ffn_hidden: int             # fused SwiGLU width H; the activation's output is H // 2
    vocab_size: int
    embedding_size: int
    additional_vocab_size: int = 128
    moe_num_experts: int = 0    # 0 = dense SwiGLU FFN
    moe_top_k: int = 0
    norm_eps: float = 1e-5
    norm_after: bool = False    # OLMo-2 style x + Norm(f(x)) (Molmo-7B-O)
    qk_norm: bool = False       # RMSNorm over the full projected q and k, before RoPE
    qkv_bias: bool = False
    rope_theta: float = 10000.0
    max_position_embeddings: int = 32768
    max_sequence_length: int = 4096
    vit_layers: tuple[int, ...] = (-2, -9)
    image_pooling: tuple[int, int] = (2, 2)
    image_padding_embed: str = "pad_and_partial_pad"
    vision: VisionConfig = field(default_factory=VisionConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    # --- derived facts -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def family(self) -> str:
        if self.is_moe:
            return "molmoe"
        return "olmo-dense" if self.qk_norm else "qwen2-dense"

    @property
    def ffn_inner(self) -> int:
        return self.ffn_hidden // 2

    @property
    def kv_dim(self) -> int:
        return self.n_kv_heads * self.head_dim

    @property
    def q_dim(self) -> int:
        return self.n_heads * self.head_dim

    @property
    def image_feature_dim(self) -> int:
        """Channels per ViT patch after concatenating the `vit_layers` outputs."""
        return self.vision.width * len(self.vit_layers)

    @property
    def tokens_per_crop(self) -> int:
        return self.preprocess.image_token_length_h * self.preprocess.image_token_length_w

    @property
    def crop_zero_rule(self) -> str:
        """Which crops the ViT output is zeroed for: MolmoE's code tests any pixel == -1, the dense code all pixels."""
        return "any" if self.layout == "molmoe" else "all"

    def image_token_ids(self) -> dict[str, int]:
        """Image special tokens are appended right after the text vocabulary (molmo-spec §3.7)."""
        return {name: self.vocab_size + i for i, name in enumerate(IMAGE_TOKENS)}

    def with_(self, **changes: Any) -> "MolmoConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MolmoConfig":
        d = dict(d)
        vis = VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("vision").items()})
        pre = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("preprocess").items()})
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(vision=vis, preprocess=pre, **d)


def _vision_from(section: dict[str, Any] | None) -> VisionConfig:
    if not section:
        return VisionConfig()
    base = VisionConfig()
    keys = {"image_emb_dim": "width", "image_num_heads": "heads", "image_head_dim": "head_dim",
            "image_num_key_value_heads": "kv_heads", "image_mlp_dim": "mlp_dim", "image_num_layers": "layers",
            "image_num_pos": "num_pos", "image_norm_eps": "norm_eps", "image_patch_size": "patch_size",
            "image_mlp_activations": "activation"}
    changes: dict[str, Any] = {ours: section[theirs] for theirs, ours in keys.items() if section.get(theirs) is not None}
    if section.get("image_default_input_size"):
        changes["input_size"] = tuple(section["image_default_input_size"])
    if "kv_heads" not in changes and "heads" in changes:
        changes["kv_heads"] = changes["heads"]
    return replace(base, **changes)


def _preprocess_from(cfg: dict[str, Any], proc: dict[str, Any] | None) -> PreprocessConfig:
    p = PreprocessConfig()
    src = {**{k: cfg[k] for k in ("max_crops", "overlap_margins") if k in cfg}, **(proc or {})}
    changes: dict[str, Any] = {}
    for key in ("max_crops", "image_token_length_h", "image_token_length_w", "image_padding_mask"):
        if src.get(key) is not None:
            changes[key] = src[key]
    for key in ("overlap_margins", "image_mean", "image_std"):
        if src.get(key) is not None:
            changes[key] = tuple(src[key])
    if cfg.get("message_formatting") is not None:
        changes["message_format"] = cfg["message_formatting"]
    if cfg.get("always_start_with_space") is not None:
        changes["always_start_with_space"] = bool(cfg["always_start_with_space"])
    return replace(p, **changes)


def config_from_hf(cfg: dict[str, Any], preprocessor: dict[str, Any] | None = None,
                   generation: dict[str, Any] | None = None) -> MolmoConfig:
    """Build the config from the dicts of config.json (+ preprocessor_config.json, generation_config.json)."""
    if cfg.get("model_type") not in (None, "molmo"):
        raise ConfigError(f"config.json has model_type {cfg.get('model_type')!r}, not a Molmo 0924 checkpoint "
                          "(Molmo2 and other models are not supported); pass a MolmoE-1B/Molmo-7B/72B-0924 folder")
    common: dict[str, Any] = dict(vision=_vision_from(cfg.get("vision_backbone")),
                                  preprocess=_preprocess_from(cfg, preprocessor))
    if cfg.get("vit_layers") is not None:
        common["vit_layers"] = tuple(cfg["vit_layers"])
    if cfg.get("image_pooling_h") is not None:
        common["image_pooling"] = (cfg["image_pooling_h"], cfg.get("image_pooling_w", cfg["image_pooling_h"]))
    for theirs, ours in (("image_padding_embed", "image_padding_embed"), ("additional_vocab_size", "additional_vocab_size"),
                         ("max_position_embeddings", "max_position_embeddings"), ("max_sequence_length", "max_sequence_length")):
        if cfg.get(theirs) is not None:
            common[ours] = cfg[theirs]
    for ours in ("image_pooling_2d", "image_projector"):
        want = {"image_pooling_2d": "attention-meanq", "image_projector": "mlp"}[ours]
        if cfg.get(ours, want) != want:
            raise ConfigError(f"config.json has {ours}={cfg[ours]!r}; only {want!r} (the released 0924 models) is supported")
    gen = generation or {}
    eos = gen.get("eos_token_id", cfg.get("eos_token_id"))
    common["eos_token_id"] = eos[0] if isinstance(eos, list) else eos
    common["pad_token_id"] = gen.get("pad_token_id", cfg.get("pad_token_id"))

    try:
        if "d_model" in cfg:  # flat OLMo-style keys (MolmoE-1B)
            d, nh = cfg["d_model"], cfg["n_heads"]
            hidden = cfg.get("mlp_hidden_size") or int(cfg.get("mlp_ratio", 4) * d)
            moe = cfg.get("block_type") == "moe"
            c = MolmoConfig(
                layout="molmoe" if moe else "molmo", d_model=d, n_heads=nh,
                n_kv_heads=cfg.get("n_kv_heads") or nh, n_layers=cfg["n_layers"],
                head_dim=cfg.get("head_dim") or d // nh, ffn_hidden=hidden,
                vocab_size=cfg["vocab_size"], embedding_size=cfg.get("embedding_size") or cfg["vocab_size"],
                moe_num_experts=cfg.get("moe_num_experts", 0) if moe else 0,
                moe_top_k=cfg.get("moe_top_k", 0) if moe else 0,
                norm_eps=cfg.get("layer_norm_eps", 1e-5), norm_after=bool(cfg.get("norm_after", False)),
                qk_norm=bool(cfg.get("attention_layer_norm", False)),
                qkv_bias=bool(cfg.get("qkv_bias", False) or cfg.get("include_bias", False)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)), **common)
        elif "hidden_size" in cfg:  # HF-style keys (Molmo-7B-O, 7B-D, 72B)
            d, nh = cfg["hidden_size"], cfg["num_attention_heads"]
            c = MolmoConfig(
                layout="molmo", d_model=d, n_heads=nh, n_kv_heads=cfg.get("num_key_value_heads") or nh,
                n_layers=cfg["num_hidden_layers"], head_dim=cfg.get("head_dim") or d // nh,
                ffn_hidden=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
                embedding_size=cfg.get("embedding_size") or cfg["vocab_size"],
                norm_eps=cfg.get("layer_norm_eps", 1e-5), norm_after=bool(cfg.get("norm_after", False)),
                qk_norm=bool(cfg.get("attention_layer_norm", False)), qkv_bias=bool(cfg.get("qkv_bias", False)),
                rope_theta=float(cfg.get("rope_theta", 10000.0)), **common)
        else:
            raise ConfigError("config.json has neither `d_model` (MolmoE-style) nor `hidden_size` (Molmo-7B-style); "
                              "is this a Molmo checkpoint folder?")
    except KeyError as e:
        raise ConfigError(f"config.json is missing the key {e.args[0]!r}; re-download the checkpoint's config.json") from None
    except TypeError as e:
        raise ConfigError(f"config.json has a null or non-numeric size ({e}); re-download the checkpoint's config.json") from None
    if cfg.get("layer_norm_type", "rms") != "rms":
        raise ConfigError(f"layer_norm_type={cfg['layer_norm_type']!r} is not supported (Molmo uses 'rms')")
    if c.n_heads % c.n_kv_heads:
        raise ConfigError(f"n_heads {c.n_heads} is not a multiple of n_kv_heads {c.n_kv_heads}")
    return c


def _read_json(path: str) -> dict[str, Any] | None:
    if not os.path.exists(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-download it") from None


def load_config(folder: str) -> MolmoConfig:
    """Read config.json (+ preprocessor_config.json, generation_config.json) from a checkpoint folder."""
    cfg = _read_json(os.path.join(folder, "config.json"))
    if cfg is None:
        raise ConfigError(f"no config.json in {folder}: pass a Molmo checkpoint folder (or a bundle made by `molmo-edge export`)")
    return config_from_hf(cfg, _read_json(os.path.join(folder, "preprocessor_config.json")),
                          _read_json(os.path.join(folder, "generation_config.json")))
