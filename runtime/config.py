"""One config object for every released Molmo family, read from a checkpoint's `config.json`.

Two key styles exist (molmo-spec.md §2): MolmoE-1B uses flat OLMo-style keys (`d_model`,
`n_layers`, `block_type: moe`) and nests its tensors under `attn.`/`mlp.`; Molmo-7B-O/7B-D/72B
use HF-style keys (`hidden_size`, `num_hidden_layers`) with tensors flat under `blocks.N`.
Molmo2 (molmo2-spec.md §3) has `model_type: molmo2` with `vit_config`/`adapter_config`/`text_config`
sections (or the native transformers names `vision_config`, `rope_parameters`, ...); it is read into
the same object, its differences (SigLIP ViT without CLS, a separate adapter width, per-head q/k
norm, per-layer RoPE scaling, its own special-token ids) being fields as well.
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
    class_token: bool = True    # CLIP prepends a CLS token (and has a pre-LN); SigLIP (Molmo2) has neither
    pre_ln: bool = True
    patch_bias: bool = False

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
class ConnectorConfig:
    """The pooling attention + SwiGLU projector. Molmo v1 derives it from the ViT and the LLM (None in
    MolmoConfig); Molmo2's `adapter_config` sets it: pooling heads, output width and MLP width of its own."""
    width: int
    heads: int
    head_dim: int
    kv_heads: int
    mlp_dim: int


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
    # --- Molmo2 (defaults = Molmo v1 behaviour) ---
    qk_norm_per_head: bool = False          # Qwen3: RMSNorm(head_dim) per head; else over the full projection
    rope_type: str = "default"              # "yarn" for scaled layers
    rope_factor: float = 1.0
    rope_original_max_position: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_attention_factor: float = 0.0      # 0 = derived from rope_factor (YaRN's 0.1 ln(s) + 1)
    rope_truncate: bool = True
    rope_scaling_layers: tuple[int, ...] | None = None  # None = every layer uses the `rope_type` table
    connector: ConnectorConfig | None = None
    video_pooling: tuple[int, int] = (3, 3)
    special_tokens: tuple[tuple[str, int], ...] = ()     # Molmo2's image/frame token ids by name

    # --- derived facts -------------------------------------------------------------------
    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def is_molmo2(self) -> bool:
        return self.layout == "molmo2"

    @property
    def family(self) -> str:
        if self.is_molmo2:
            return "molmo2-qwen3" if self.qk_norm_per_head else "molmo2-olmo"
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
    def pooling(self) -> ConnectorConfig:
        """The connector's sizes: Molmo2's adapter section, or for v1 the ViT's heads and the LLM's MLP."""
        if self.connector is not None:
            return self.connector
        v = self.vision
        return ConnectorConfig(v.width, v.heads, v.head_dim, v.kv_heads, self.ffn_inner)

    @property
    def vit_layers_used(self) -> tuple[int, ...]:
        """The ViT blocks whose outputs are concatenated, as non-negative indices, in concat order."""
        return tuple(l % self.vision.layers for l in self.vit_layers)

    def layer_rope_scaled(self, i: int) -> bool:
        """Whether decoder layer i uses the scaled (`rope_type`) RoPE table; the others use plain RoPE."""
        return self.rope_type != "default" and (self.rope_scaling_layers is None or i in self.rope_scaling_layers)

    @property
    def tokens_per_crop(self) -> int:
        return self.preprocess.image_token_length_h * self.preprocess.image_token_length_w

    @property
    def crop_zero_rule(self) -> str:
        """Which crops the ViT output is zeroed for: MolmoE's code tests any pixel == -1, the dense code all pixels."""
        return "any" if self.layout == "molmoe" else "all"

    def image_token_ids(self) -> dict[str, int]:
        """v1: image special tokens right after the text vocabulary (molmo-spec §3.7); Molmo2: from config.json."""
        if self.special_tokens:
            return dict(self.special_tokens)
        return {name: self.vocab_size + i for i, name in enumerate(IMAGE_TOKENS)}

    @property
    def image_patch_id(self) -> int:
        """The token whose embedding receives the image features."""
        return self.image_token_ids()["<im_patch>"]

    def with_(self, **changes: Any) -> "MolmoConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "MolmoConfig":
        d = dict(d)
        vis = VisionConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("vision").items()})
        pre = PreprocessConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.pop("preprocess").items()})
        con = d.pop("connector", None)
        specials = tuple((str(k), int(v)) for k, v in d.pop("special_tokens", ()))
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
        return cls(vision=vis, preprocess=pre, connector=ConnectorConfig(**con) if con else None,
                   special_tokens=specials, **d)


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
    if cfg.get("model_type") == "molmo2":
        return molmo2_config_from_hf(cfg, preprocessor, generation)
    if cfg.get("model_type") not in (None, "molmo"):
        raise ConfigError(f"config.json has model_type {cfg.get('model_type')!r}, not a Molmo 0924 checkpoint "
                          "(other models are not supported); pass a Molmo-0924 or Molmo2 folder")
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


MOLMO2_TOKEN_KEYS = {  # config.json key -> token (molmo2-spec.md §3, §6); defaults are the released ids
    "image_start_token_id": ("<im_start>", 151936), "image_end_token_id": ("<im_end>", 151937),
    "image_patch_id": ("<im_patch>", 151938), "image_col_id": ("<im_col>", 151939),
    "low_res_image_start_token_id": ("<low_res_im_start>", 151940), "image_low_res_id": ("<im_low>", 151942),
    "frame_start_token_id": ("<frame_start>", 151943), "frame_end_token_id": ("<frame_end>", 151944),
}


def _molmo2_rope(text: dict[str, Any]) -> dict[str, Any]:
    """Hub `rope_theta` + `rope_scaling`, or the native `rope_parameters`, as our rope_* fields."""
    params = dict(text.get("rope_parameters") or {})
    scaling = dict(text.get("rope_scaling") or {})
    theta = params.get("rope_theta", text.get("rope_theta", 1e6))
    scaling = {**scaling, **{k: v for k, v in params.items() if k != "rope_theta"}}
    kind = scaling.get("rope_type", scaling.get("type", "default")) or "default"
    if kind not in ("default", "yarn"):
        raise ConfigError(f"text_config has RoPE type {kind!r}; only default and yarn (the released Molmo2 models) are supported")
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": kind}
    if kind == "yarn":
        out.update(rope_factor=float(scaling["factor"]),
                   rope_original_max_position=int(scaling.get("original_max_position_embeddings")
                                                  or text.get("max_position_embeddings", 0)),
                   rope_beta_fast=float(scaling.get("beta_fast") or 32.0), rope_beta_slow=float(scaling.get("beta_slow") or 1.0),
                   rope_attention_factor=float(scaling.get("attention_factor") or 0.0),
                   rope_truncate=bool(scaling.get("truncate", True)))
    layers = text.get("rope_scaling_layers")
    out["rope_scaling_layers"] = None if layers is None else tuple(int(i) for i in layers)
    return out


def molmo2_config_from_hf(cfg: dict[str, Any], preprocessor: dict[str, Any] | None = None,
                          generation: dict[str, Any] | None = None) -> MolmoConfig:
    """Molmo2-4B/8B/O-7B: hub keys (`vit_config`, legacy names) or the native transformers layout.

    The hub config declares a 27-layer ViT while the weights stop at block 24: with the legacy
    `vit_config` the taps [-3, -9] resolve against 27 to [24, 18] and the tower is trimmed to 25
    blocks, as transformers 5.24 does (molmo2-spec.md trap 8)."""
    legacy = "vit_config" in cfg and "vision_config" not in cfg
    vit = cfg.get("vit_config") if legacy else cfg.get("vision_config")
    adapter, text = cfg.get("adapter_config"), cfg.get("text_config")
    if not (vit and adapter and text):
        raise ConfigError("Molmo2 config.json lacks one of vit_config (or vision_config), adapter_config, text_config; "
                          "re-download the checkpoint's config.json")
    try:
        size = vit.get("image_default_input_size") or vit.get("image_size") or [378, 378]
        patch = vit.get("image_patch_size") or vit.get("patch_size") or 14
        n_pos = vit.get("image_num_pos") or vit.get("num_position_embeddings") or (size[0] // patch) * (size[1] // patch)
        layers = vit["num_hidden_layers"]
        taps = adapter.get("vit_layers") if "vit_layers" in adapter else adapter.get("vision_feature_layer")
        taps = list(taps if taps is not None else [24, 18])
        if legacy:
            taps = [t % layers for t in taps]
            layers = max(taps) + 1
        if not all(-layers <= t < layers for t in taps):
            raise ConfigError(f"adapter_config vit_layers {taps} do not index the {layers} ViT layers; fix config.json")
        vh = vit["num_attention_heads"]
        vision = VisionConfig(width=vit["hidden_size"], heads=vh, head_dim=vit.get("head_dim") or vit["hidden_size"] // vh,
                              kv_heads=vit.get("num_key_value_heads") or vh, mlp_dim=vit["intermediate_size"],
                              layers=layers, num_pos=n_pos, norm_eps=vit.get("layer_norm_eps", 1e-6),
                              input_size=tuple(size), patch_size=patch, activation=vit.get("hidden_act", "gelu_pytorch_tanh"),
                              class_token=False, pre_ln=False, patch_bias=True)
        ah = adapter["num_attention_heads"]
        connector = ConnectorConfig(width=adapter["hidden_size"], heads=ah,
                                    head_dim=adapter.get("head_dim") or adapter["hidden_size"] // ah,
                                    kv_heads=adapter.get("num_key_value_heads") or ah, mlp_dim=adapter["intermediate_size"])
        d, nh = text["hidden_size"], text["num_attention_heads"]
        qk_type = text.get("qk_norm_type", "qwen3")
        if qk_type not in ("qwen3", "olmo"):
            raise ConfigError(f"text_config qk_norm_type {qk_type!r} is not 'qwen3' or 'olmo'; fix config.json")
        if adapter.get("text_hidden_size", d) != d:
            raise ConfigError(f"adapter_config text_hidden_size {adapter['text_hidden_size']} != text_config hidden_size {d}")
        proc = preprocessor or {}
        side = vision.patches_per_side[0]
        pool = tuple(proc.get("pooling_size", (2, 2)))
        pre = replace(PreprocessConfig(), max_crops=proc.get("max_crops", 8),
                      image_token_length_h=-(-side // pool[0]), image_token_length_w=-(-side // pool[1]),  # 14 x 14 per crop
                      overlap_margins=tuple(proc.get("overlap_margins", (4, 4))),
                      image_mean=tuple(proc.get("image_mean", (0.5, 0.5, 0.5))),
                      image_std=tuple(proc.get("image_std", (0.5, 0.5, 0.5))))
        gen = generation or {}
        eos = gen.get("eos_token_id", cfg.get("eos_token_id", 151645))
        specials = tuple((tok, int(cfg.get(key, default))) for key, (tok, default) in MOLMO2_TOKEN_KEYS.items())
        vocab = text["vocab_size"]
        c = MolmoConfig(
            layout="molmo2", d_model=d, n_heads=nh, n_kv_heads=text.get("num_key_value_heads") or nh,
            n_layers=text["num_hidden_layers"], head_dim=text.get("head_dim") or d // nh,
            ffn_hidden=2 * text["intermediate_size"], vocab_size=vocab, embedding_size=vocab,
            additional_vocab_size=text.get("additional_vocab_size", 128),
            norm_eps=text.get("layer_norm_eps", text.get("rms_norm_eps", 1e-6)),
            norm_after=bool(text.get("norm_after", False)), qk_norm=True, qk_norm_per_head=qk_type == "qwen3",
            qkv_bias=bool(text.get("qkv_bias", text.get("attention_bias", False))),
            max_position_embeddings=text.get("max_position_embeddings", 36864),
            max_sequence_length=text.get("max_position_embeddings", 36864),
            vit_layers=tuple(taps), image_pooling=tuple(proc.get("pooling_size", (2, 2))), image_padding_embed="",
            vision=vision, preprocess=pre, eos_token_id=eos[0] if isinstance(eos, list) else eos,
            pad_token_id=gen.get("pad_token_id", cfg.get("pad_token_id", 151643)),
            connector=connector, special_tokens=specials, **_molmo2_rope(text))
    except KeyError as e:
        raise ConfigError(f"Molmo2 config.json is missing the key {e.args[0]!r}; re-download the checkpoint's config.json") from None
    except TypeError as e:
        raise ConfigError(f"Molmo2 config.json has a null or non-numeric size ({e}); re-download the checkpoint's config.json") from None
    if c.n_heads % c.n_kv_heads:
        raise ConfigError(f"text_config num_attention_heads {c.n_heads} is not a multiple of num_key_value_heads {c.n_kv_heads}")
    if cfg.get("tie_word_embeddings"):
        raise ConfigError("tie_word_embeddings=true is not supported (the released Molmo2 models have a separate lm_head)")
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
