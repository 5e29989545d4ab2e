"""The torch reference Molmo: ViT, connector and LLM in one readable file, driven by MolmoConfig.

Computes what AI2's HF remote code computes (modeling_molmoe.py / modeling_molmo.py) in float32.
Family differences (MoE vs dense SwiGLU, qk-norm, norm-after, qkv bias, GQA) are config fields.
Weights come from the HF checkpoint through `hf_source_names`, a plain table from our parameter
names to the checkpoint's (experts are stacked into [E, ...] tensors so export can gather them).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.hf_names import block_prefixes, lm_head_name


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def _heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """[..., T, n*hd] -> [..., n, T, hd]"""
    return x.unflatten(-1, (n, -1)).transpose(-3, -2)


class VitAttention(nn.Module):
    """Multi-head dot-product attention with biases (ViT blocks and the 2x2 pooling)."""

    def __init__(self, q_in: int, out: int, heads: int, head_dim: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads = heads, kv_heads
        self.wq = nn.Linear(q_in, heads * head_dim)
        self.wk = nn.Linear(q_in, kv_heads * head_dim)
        self.wv = nn.Linear(q_in, kv_heads * head_dim)
        self.wo = nn.Linear(heads * head_dim, out)

    def forward(self, xq: torch.Tensor, xkv: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
        """mask: bool, broadcast to [..., heads, Lq, Lkv] (True = may attend); None = full attention."""
        xkv = xq if xkv is None else xkv
        q, k, v = _heads(self.wq(xq), self.heads), _heads(self.wk(xkv), self.kv_heads), _heads(self.wv(xkv), self.kv_heads)
        if self.kv_heads != self.heads:
            rep = self.heads // self.kv_heads
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        o = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(xq.dtype)
        return self.wo(o.transpose(-3, -2).flatten(-2))


class VitBlock(nn.Module):
    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        v = cfg.vision
        self.attention_norm = nn.LayerNorm(v.width, eps=v.norm_eps)
        self.attention = VitAttention(v.width, v.width, v.heads, v.head_dim, v.kv_heads)
        self.ffn_norm = nn.LayerNorm(v.width, eps=v.norm_eps)
        self.w1 = nn.Linear(v.width, v.mlp_dim)
        self.w2 = nn.Linear(v.mlp_dim, v.width)
        if v.activation != "quick_gelu":
            raise ValueError(f"ViT activation {v.activation!r} is not supported (Molmo uses quick_gelu)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        h = self.w1(self.ffn_norm(x))
        return x + self.w2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class VisionEncoder(nn.Module):
    """images [N, 576, 588] + image_masks [N, 576] -> projected features [N, 144, d_model]."""

    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        v = cfg.vision
        self.cfg = cfg
        self.patch_embedding = nn.Linear(v.patch_dim, v.width, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(v.width))
        self.positional_embedding = nn.Parameter(torch.zeros(v.num_pos, v.width))
        self.pre_ln = nn.LayerNorm(v.width, eps=v.norm_eps)
        # Blocks after the deepest feature layer never influence the output: not built, not run.
        self.layer_ids = [l % v.layers for l in cfg.vit_layers]
        self.blocks = nn.ModuleList(VitBlock(cfg) for _ in range(max(self.layer_ids) + 1))
        self.pad_embed = nn.Parameter(torch.zeros(2, cfg.image_feature_dim))
        self.pool = VitAttention(cfg.image_feature_dim, v.width, v.heads, v.head_dim, v.kv_heads)
        self.proj_w1 = nn.Linear(v.width, cfg.ffn_inner, bias=False)
        self.proj_w3 = nn.Linear(v.width, cfg.ffn_inner, bias=False)
        self.proj_w2 = nn.Linear(cfg.ffn_inner, cfg.d_model, bias=False)
        if v.num_pos != v.num_patches + 1:
            raise ValueError(f"positional embedding has {v.num_pos} rows for {v.num_patches} patches; "
                             "only the native 336 px grid is supported")

    def vit(self, images: torch.Tensor) -> list[torch.Tensor]:
        x = self.patch_embedding(images)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = self.pre_ln(torch.cat([cls, x], 1) + self.positional_embedding.to(x.dtype))
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        return hidden

    def forward(self, images: torch.Tensor, image_masks: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        cfg = self.cfg
        hidden = self.vit(images)
        feats = torch.cat([hidden[i] for i in self.layer_ids], -1)[:, 1:]
        if trace is not None:
            trace["vit_hidden"] = torch.stack([hidden[i] for i in self.layer_ids])
        pad = images == -1
        keep = ~(pad.any(-1).any(-1) if cfg.crop_zero_rule == "any" else pad.all(-1).all(-1))
        feats = feats * keep[:, None, None].to(feats.dtype)
        if cfg.image_padding_embed == "pad_and_partial_pad":
            all_pad = (image_masks == 0).to(feats.dtype)
            partial = ((image_masks < 1) & (image_masks != 0)).to(feats.dtype)
            feats = feats + self.pad_embed[0] * all_pad[..., None]
            feats = feats + self.pad_embed[1] * partial[..., None]
        elif cfg.image_padding_embed:
            raise ValueError(f"image_padding_embed {cfg.image_padding_embed!r} is not supported")
        n = feats.shape[0]
        gh, gw = cfg.vision.patches_per_side
        ph, pw = cfg.image_pooling
        # 2x2 windows in raster order, each window's patches row-major
        win = feats.reshape(n, gh // ph, ph, gw // pw, pw, -1).permute(0, 1, 3, 2, 4, 5).reshape(-1, ph * pw, feats.shape[-1])
        pooled = self.pool(win.mean(-2, keepdim=True), win).reshape(n, (gh // ph) * (gw // pw), -1)
        return self.proj_w2(F.silu(self.proj_w1(pooled)) * self.proj_w3(pooled))


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                inv_freq: torch.Tensor | None = None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin [..., T, head_dim] in float32, llama (non-interleaved) layout."""
    if inv_freq is None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = positions.to(torch.float32)[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos() * scale, emb.sin() * scale


def yarn_inv_freq(cfg: MolmoConfig) -> tuple[torch.Tensor, float]:
    """YaRN: inverse frequencies blended between interpolated (/factor) and original by a linear ramp
    over the dimensions whose wavelength lies between beta_fast and beta_slow rotations of the
    pre-training context; cos/sin are then scaled by the attention factor (molmo2-spec §8)."""
    dim, base, factor = cfg.head_dim, cfg.rope_theta, cfg.rope_factor
    orig = cfg.rope_original_max_position or cfg.max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(cfg.rope_beta_fast), correction_dim(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    attention = cfg.rope_attention_factor or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, float(attention)


def layer_rope_tables(cfg: MolmoConfig, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(cos, sin) [B, 1, T, hd] per decoder layer: the scaled table on `rope_scaling_layers`, plain
    RoPE with the same theta elsewhere (one table for every layer when there is no scaling)."""
    plain = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    scaled = plain
    if cfg.rope_type == "yarn":
        inv_freq, scale = yarn_inv_freq(cfg)
        scaled = rope_tables(positions, cfg.head_dim, cfg.rope_theta, inv_freq, scale)
    elif cfg.rope_type != "default":
        raise ValueError(f"RoPE type {cfg.rope_type!r} is not supported")
    return [tuple(t[:, None] for t in (scaled if cfg.layer_rope_scaled(i) else plain)) for i in range(cfg.n_layers)]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, -1)
    rot = torch.cat([-x2, x1], -1)
    return (x.float() * cos + rot * sin).to(x.dtype)


class MoE(nn.Module):
    """Top-k of a softmax router without renormalisation; experts are SwiGLU MLPs stacked [E, ...]."""

    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        e, d, f = cfg.moe_num_experts, cfg.d_model, cfg.ffn_inner
        self.top_k = cfg.moe_top_k
        self.gate = nn.Linear(d, e, bias=False)
        self.w_gate = nn.Parameter(torch.zeros(e, f, d))
        self.w_up = nn.Parameter(torch.zeros(e, f, d))
        self.w_down = nn.Parameter(torch.zeros(e, d, f))

    def forward(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        logits = self.gate(x)
        if trace is not None:
            trace.setdefault("router_logits", []).append(logits.reshape(*shape[:-1], -1))
        probs = torch.softmax(logits.float(), -1)
        weights, experts = torch.topk(probs, self.top_k, -1)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        for e in experts.unique().tolist():  # only experts some token chose are read
            tok, slot = torch.where(experts == e)
            h = x[tok]
            y = F.linear(F.silu(F.linear(h, self.w_gate[e])) * F.linear(h, self.w_up[e]), self.w_down[e])
            out.index_add_(0, tok, y * weights[tok, slot, None])
        return out.reshape(shape)


class DenseFFN(nn.Module):
    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        self.ff_proj = nn.Linear(cfg.d_model, cfg.ffn_hidden, bias=False)
        self.ff_out = nn.Linear(cfg.ffn_inner, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        value, gate = self.ff_proj(x).chunk(2, -1)  # fused [value; gate]
        return self.ff_out(F.silu(gate) * value)


class Block(nn.Module):
    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        self.cfg = cfg
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.att_proj = nn.Linear(cfg.d_model, cfg.q_dim + 2 * cfg.kv_dim, bias=cfg.qkv_bias)
        self.attn_out = nn.Linear(cfg.q_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:  # over the full projection (OLMo) or per head (Qwen3), both before RoPE
            self.q_norm = RMSNorm(cfg.head_dim if cfg.qk_norm_per_head else cfg.q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim if cfg.qk_norm_per_head else cfg.kv_dim, cfg.norm_eps)
        self.ffn = MoE(cfg) if cfg.is_moe else DenseFFN(cfg)

    def forward(self, x, cos, sin, past=None, trace=None, mask=None):
        """mask: bool [T, S] (True = may attend) replacing the causal one (Molmo2's prefill block)."""
        cfg = self.cfg
        h = x if cfg.norm_after else self.attn_norm(x)
        q, k, v = self.att_proj(h).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], -1)
        if cfg.qk_norm and not cfg.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = _heads(q, cfg.n_heads), _heads(k, cfg.n_kv_heads), _heads(v, cfg.n_kv_heads)
        if cfg.qk_norm and cfg.qk_norm_per_head:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], -2), torch.cat([past[1], v], -2)
        present = (k, v)
        if cfg.n_kv_heads != cfg.n_heads:
            rep = cfg.n_heads // cfg.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
        t, s = q.shape[-2], k.shape[-2]
        if mask is None:
            mask = torch.ones(t, s, dtype=torch.bool).tril(s - t)  # causal, queries at the end
        att = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(x.dtype)
        att = self.attn_out(att.transpose(-3, -2).flatten(-2))
        if cfg.norm_after:
            att = self.attn_norm(att)
        x = x + att
        h = self.ffn(x if cfg.norm_after else self.ff_norm(x), trace)
        if cfg.norm_after:
            h = self.ff_norm(h)
        return x + h, present


@dataclass
class ForwardOutput:
    logits: torch.Tensor                    # [B, T, embedding_size]
    past: list                              # per layer (k, v) [B, n_kv, S, hd]
    image_features: torch.Tensor | None = None
    trace: dict = field(default_factory=dict)


class MolmoModel(nn.Module):
    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        self.cfg = cfg
        self.vision = VisionEncoder(cfg)
        self.wte = nn.Parameter(torch.zeros(cfg.embedding_size, cfg.d_model))
        self.wte_new = nn.Parameter(torch.zeros(cfg.additional_vocab_size, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Rows of concat(embedding, new_embedding), without building the concatenation."""
        n = self.cfg.embedding_size
        base = F.embedding(input_ids.clamp(0, n - 1), self.wte)
        extra = F.embedding((input_ids - n).clamp(0, self.cfg.additional_vocab_size - 1), self.wte_new)
        return torch.where((input_ids >= n)[..., None], extra, base)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, past=None, trace: dict | None = None,
               mask: torch.Tensor | None = None):
        """Input embeddings [B, T, d] at positions [B, T] -> logits [B, T, V] and the new KV cache.
        mask: bool [T, S] instead of causal (Molmo2 prefill)."""
        tables = layer_rope_tables(self.cfg, positions)
        if trace is not None:
            trace["hidden_states"] = [x]
        presents = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk(x, *tables[i], None if past is None else past[i], trace, mask)
            presents.append(kv)
            if trace is not None:
                trace["hidden_states"].append(x)
        x = self.ln_f(x)
        if trace is not None:
            trace["final_hidden"] = x
        return self.lm_head(x), presents

    def forward(self, input_ids: torch.Tensor, images: torch.Tensor | None = None,
                image_masks: torch.Tensor | None = None, image_input_idx: torch.Tensor | None = None,
                past=None, positions: torch.Tensor | None = None, trace: dict | None = None) -> ForwardOutput:
        """input_ids [T] or [B, T]; images [N, 576, 588] (or [B, N, ...]); image_input_idx [N, 144]."""
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        b, t = input_ids.shape
        x = self.embed(input_ids)
        feats = None
        if images is not None:
            if past is not None:
                raise ValueError("images can only be given with the prompt (prefill), not while decoding")
            imgs = images.reshape(b, -1, *images.shape[-2:])
            masks = image_masks.reshape(b, -1, image_masks.shape[-1])
            idx = image_input_idx.reshape(b, -1)
            feats = self.vision(imgs.flatten(0, 1).to(x.dtype), masks.flatten(0, 1).to(x.dtype), trace)
            flat = feats.reshape(b, -1, feats.shape[-1])
            for bi in range(b):  # x[idx] += feature, for every kept feature
                valid = idx[bi] >= 0
                x[bi] = x[bi].index_add(0, idx[bi][valid].long(), flat[bi][valid])
            feats = feats.reshape(b, -1, *feats.shape[-2:])
        if positions is None:
            start = 0 if past is None else past[0][0].shape[-2]
            positions = torch.arange(start, start + t)[None].expand(b, t)
        logits, presents = self.decode(x, positions, past, trace)
        return ForwardOutput(logits, presents, feats, trace if trace is not None else {})

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, images=None, image_masks=None, image_input_idx=None,
                 max_new_tokens: int = 200, eos_token_id: int | None = None) -> list[int]:
        """Greedy decoding with a KV cache; stops at EOS (included) or after max_new_tokens."""
        out = self.forward(input_ids, images, image_masks, image_input_idx)
        tokens: list[int] = []
        past, logits = out.past, out.logits[0, -1]
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
            step = self.forward(torch.tensor([[nxt]]), past=past)
            past, logits = step.past, step.logits[0, -1]
        return tokens


def hf_source_names(cfg: MolmoConfig) -> dict[str, str | list[str]]:
    """Our parameter name -> the HF checkpoint tensor name (a list = stacked along a new axis 0)."""
    v = "model.vision_backbone."
    m: dict[str, str | list[str]] = {
        "vision.class_embedding": v + "image_vit.class_embedding",
        "vision.pre_ln.weight": v + "image_vit.pre_ln.weight", "vision.pre_ln.bias": v + "image_vit.pre_ln.bias",
        "vision.pad_embed": v + "pad_embed",
    }
    m.update(shared_source_names(cfg, max(l % cfg.vision.layers for l in cfg.vit_layers) + 1))
    return m


def shared_source_names(cfg: MolmoConfig, vit_blocks: int) -> dict[str, str | list[str]]:
    """The names Molmo v1 and Molmo2 checkpoints share: patch/position embeddings, the first `vit_blocks` ViT
    blocks, the pooling attention, the projector, the embeddings, the decoder blocks and the head."""
    v = "model.vision_backbone."
    m: dict[str, str | list[str]] = {
        "vision.patch_embedding.weight": v + "image_vit.patch_embedding.weight",
        "vision.positional_embedding": v + "image_vit.positional_embedding",
        "vision.proj_w1.weight": v + "image_projector.w1.weight", "vision.proj_w2.weight": v + "image_projector.w2.weight",
        "vision.proj_w3.weight": v + "image_projector.w3.weight",
        "wte": "model.transformer.wte.embedding", "wte_new": "model.transformer.wte.new_embedding",
        "ln_f.weight": "model.transformer.ln_f.weight", "lm_head.weight": lm_head_name(cfg),
    }
    for n in ("wq", "wk", "wv", "wo"):
        for p in ("weight", "bias"):
            m[f"vision.pool.{n}.{p}"] = f"{v}image_pooling_2d.{n}.{p}"
    for i in range(vit_blocks):
        src, dst = f"{v}image_vit.transformer.resblocks.{i}.", f"vision.blocks.{i}."
        for p in ("weight", "bias"):
            for n in ("wq", "wk", "wv", "wo"):
                m[f"{dst}attention.{n}.{p}"] = f"{src}attention.{n}.{p}"
            m[f"{dst}w1.{p}"] = f"{src}feed_forward.w1.{p}"
            m[f"{dst}w2.{p}"] = f"{src}feed_forward.w2.{p}"
            m[f"{dst}attention_norm.{p}"] = f"{src}attention_norm.{p}"
            m[f"{dst}ffn_norm.{p}"] = f"{src}ffn_norm.{p}"
    m.update(decoder_source_names(cfg))
    return m


def decoder_source_names(cfg: MolmoConfig) -> dict[str, str | list[str]]:
    """The decoder blocks' part of `hf_source_names` (shared by Molmo v1 and Molmo2)."""
    m: dict[str, str | list[str]] = {}
    for i in range(cfg.n_layers):
        a, f, an, fn = block_prefixes(cfg, i)
        d = f"blocks.{i}."
        m.update({d + "att_proj.weight": a + "att_proj.weight", d + "attn_out.weight": a + "attn_out.weight",
                  d + "attn_norm.weight": an + "attn_norm.weight", d + "ff_norm.weight": fn + "ff_norm.weight"})
        if cfg.qkv_bias:
            m[d + "att_proj.bias"] = a + "att_proj.bias"
        if cfg.qk_norm:
            m[d + "q_norm.weight"] = a + "q_norm.weight"
            m[d + "k_norm.weight"] = a + "k_norm.weight"
        if cfg.is_moe:
            m[d + "ffn.gate.weight"] = f + "gate.weight"
            for ours, theirs in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                m[d + "ffn." + ours] = [f"{f}experts.{e}.{theirs}.weight" for e in range(cfg.moe_num_experts)]
        else:
            m[d + "ffn.ff_proj.weight"] = f + "ff_proj.weight"
            m[d + "ffn.ff_out.weight"] = f + "ff_out.weight"
    return m


def build_model(cfg: MolmoConfig, tensors, dtype: torch.dtype = torch.float32) -> MolmoModel:
    """Assemble the model from `tensors` (name -> torch tensor, any float dtype; read lazily) without
    first allocating random weights. Molmo2 configs get the Molmo2 model (export/molmo2_model.py)."""
    if cfg.is_molmo2:
        from molmo_edge.export.molmo2_model import Molmo2Model, molmo2_source_names
        model_cls, names = Molmo2Model, molmo2_source_names(cfg)
    else:
        model_cls, names = MolmoModel, hf_source_names(cfg)
    with torch.device("meta"):
        model = model_cls(cfg)
    state = {}
    if cfg.is_molmo2:
        from molmo_edge.export.checkpoint import EMBEDDINGS, embedding_resplit
        if embedding_resplit(tensors, cfg):  # re-saved file: rows split otherwise, same concatenation
            table = torch.cat([tensors[n].to(dtype) for n in EMBEDDINGS])
            state["wte"], state["wte_new"] = table[:cfg.embedding_size].clone(), table[cfg.embedding_size:].clone()
            names = {k: v for k, v in names.items() if k not in ("wte", "wte_new")}
    for ours, theirs in names.items():
        if isinstance(theirs, list):
            first = tensors[theirs[0]]
            t = torch.empty((len(theirs), *first.shape), dtype=dtype)
            for e, name in enumerate(theirs):
                t[e] = tensors[name] if e else first
        else:
            t = tensors[theirs].to(dtype)
        state[ours] = t
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval().requires_grad_(False)
