"""The torch reference Molmo2 (molmo2-spec.md): SigLIP ViT with layer taps, index-driven attention
pooling and SwiGLU projector; the text decoder is Molmo v1's (export/model.py: `Block`, RoPE,
embedding, LM head), driven by the same config fields (per-head or full-width q/k norm,
norm-after, per-layer YaRN) plus the prefix mask: one bidirectional block over every image/frame
token at prefill, causal decoding.

Computes what transformers 5.24's native Molmo2 computes, in float32, from the hub-layout tensors.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.prefix_mask import mm_token_types, prefix_mask

from molmo_edge.export.model import Block, ForwardOutput, MolmoModel, RMSNorm, VitAttention, shared_source_names


class SiglipBlock(nn.Module):
    """Pre-LN block: x + attn(LN1 x), then x + fc2(gelu_tanh(fc1(LN2 x)))."""

    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        v = cfg.vision
        if v.activation != "gelu_pytorch_tanh":
            raise ValueError(f"ViT activation {v.activation!r} is not supported (Molmo2 uses gelu_pytorch_tanh)")
        self.attention_norm = nn.LayerNorm(v.width, eps=v.norm_eps)
        self.attention = VitAttention(v.width, v.width, v.heads, v.head_dim, v.kv_heads)
        self.ffn_norm = nn.LayerNorm(v.width, eps=v.norm_eps)
        self.w1 = nn.Linear(v.width, v.mlp_dim)
        self.w2 = nn.Linear(v.mlp_dim, v.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x))
        return x + self.w2(F.gelu(self.w1(self.ffn_norm(x)), approximate="tanh"))


class Molmo2Vision(nn.Module):
    """crops [N, 729, 588] + pooling index [M, k] (-1 = empty slot) -> features [M, d_model], one row
    per pooled token (= per `<im_patch>`, in order). k = 4 for 2x2 image windows, 9 for 3x3 video."""

    def __init__(self, cfg: MolmoConfig):
        super().__init__()
        v, c = cfg.vision, cfg.pooling
        self.cfg = cfg
        self.patch_embedding = nn.Linear(v.patch_dim, v.width)
        self.positional_embedding = nn.Parameter(torch.zeros(v.num_pos, v.width))
        self.layer_ids = list(cfg.vit_layers_used)
        self.blocks = nn.ModuleList(SiglipBlock(cfg) for _ in range(max(self.layer_ids) + 1))
        self.pool = VitAttention(cfg.image_feature_dim, c.width, c.heads, c.head_dim, c.kv_heads)
        self.proj_w1 = nn.Linear(c.width, c.mlp_dim, bias=False)
        self.proj_w3 = nn.Linear(c.width, c.mlp_dim, bias=False)
        self.proj_w2 = nn.Linear(c.mlp_dim, cfg.d_model, bias=False)
        if v.num_pos != v.num_patches:
            raise ValueError(f"positional embedding has {v.num_pos} rows for {v.num_patches} patches; "
                             "Molmo2's ViT has no CLS token and no interpolation")

    def vit_features(self, crops: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        """[N, P, 588] -> concat of the tapped layers' outputs [N, P, len(taps) * width], deepest first."""
        x = self.patch_embedding(crops) + self.positional_embedding.to(crops.dtype)
        if trace is not None:
            trace["vit_embeddings"] = x
        hidden = []
        for blk in self.blocks:
            x = blk(x)
            hidden.append(x)
        feats = torch.cat([hidden[i] for i in self.layer_ids], -1)
        if trace is not None:
            trace["vit_last_hidden"], trace["vit_features"] = x, feats
        return feats

    def pool_and_project(self, feats: torch.Tensor, pooling: torch.Tensor) -> torch.Tensor:
        """Masked attention pooling: query = mean of each token's valid patches, keys/values = those
        patches (empty slots masked out), then the SwiGLU projector."""
        flat = feats.reshape(-1, feats.shape[-1])
        valid = pooling >= 0
        patches = flat[pooling.clamp(min=0).long()] * valid[..., None].to(flat.dtype)      # [M, k, C]
        count = valid.sum(-1, keepdim=True).clamp(min=1).to(flat.dtype)
        query = patches.sum(-2, keepdim=True) / count[..., None]                          # [M, 1, C]
        pooled = self.pool(query, patches, mask=valid[:, None, None, :])[:, 0]            # [M, width]
        out = self.proj_w2(F.silu(self.proj_w1(pooled)) * self.proj_w3(pooled))
        return out[valid.any(-1)]  # tokens without any patch carry no feature (never with released geometry)

    def forward(self, crops: torch.Tensor, pooling: torch.Tensor, trace: dict | None = None) -> torch.Tensor:
        return self.pool_and_project(self.vit_features(crops, trace), pooling)


def _as_tensor(x, dtype=None) -> torch.Tensor | None:
    if x is None:
        return None
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.asarray(x))
    return t if dtype is None else t.to(dtype)


class Molmo2Model(MolmoModel):
    """Molmo2ForConditionalGeneration's computation. The decoder, embedding and LM head are Molmo v1's
    (inherited: same parameters, `embed` and `decode`); vision and the prefix mask are Molmo2's."""

    def __init__(self, cfg: MolmoConfig):
        nn.Module.__init__(self)
        self.cfg = cfg
        self.vision = Molmo2Vision(cfg)
        self.wte = nn.Parameter(torch.zeros(cfg.embedding_size, cfg.d_model))
        self.wte_new = nn.Parameter(torch.zeros(cfg.additional_vocab_size, cfg.d_model))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.embedding_size, bias=False)

    def image_features(self, pixel_values=None, image_token_pooling=None, pixel_values_videos=None,
                       video_token_pooling=None, trace: dict | None = None) -> torch.Tensor | None:
        """Connector output [n_patch_tokens, d] for the images or the video of one sample."""
        if pixel_values is not None and pixel_values_videos is not None:
            raise ValueError("give images or a video, not both in one forward (as transformers 5.24)")
        crops, pooling = ((pixel_values, image_token_pooling) if pixel_values is not None
                          else (pixel_values_videos, video_token_pooling))
        if crops is None:
            return None
        if pooling is None:
            raise ValueError("pixel values came without their pooling index (image_token_pooling / video_token_pooling)")
        crops = _as_tensor(crops, torch.float32)
        return self.vision(crops.reshape(-1, *crops.shape[-2:]), _as_tensor(pooling, torch.long).reshape(-1, pooling.shape[-1]),
                           trace)

    def forward(self, input_ids, pixel_values=None, image_token_pooling=None, pixel_values_videos=None,
                video_token_pooling=None, mm_token_type_ids=None, past=None, positions=None,
                trace: dict | None = None, **_ignored) -> ForwardOutput:
        """One sample: input_ids [T] or [1, T] with the processor's arrays (HF names). Without
        `mm_token_type_ids` they are derived from the ids (the reference would silently go causal).
        With `past`, the new tokens are causal to the cache and bidirectional among their own image tokens."""
        ids = _as_tensor(input_ids, torch.long).reshape(1, -1)
        x = self.embed(ids)
        feats = self.image_features(pixel_values, image_token_pooling, pixel_values_videos, video_token_pooling, trace)
        if feats is not None:
            at = (ids[0] == self.cfg.image_patch_id).nonzero()[:, 0]
            if at.numel() != feats.shape[0]:
                raise ValueError(f"{at.numel()} <im_patch> tokens but {feats.shape[0]} image features: "
                                 "input_ids and the pooling index come from different prompts")
            x = x.clone()
            x[0, at] += feats.to(x.dtype)  # added to the <im_patch> embedding, not substituted
        if trace is not None:
            trace["inputs_embeds"] = x
        start = 0 if past is None else past[0][0].shape[-2]
        types = (mm_token_types(self.cfg, ids.numpy()) if mm_token_type_ids is None
                 else np.asarray(_as_tensor(mm_token_type_ids)).reshape(-1))
        mask = torch.from_numpy(prefix_mask(types, start))
        if trace is not None:
            trace["lm_attention_mask"] = mask
        if positions is None:
            positions = torch.arange(start, start + ids.shape[1])[None]
        logits, presents = self.decode(x, positions, past, trace, mask)
        return ForwardOutput(logits, presents, None if feats is None else feats[None], trace if trace is not None else {})

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens: int = 200, eos_token_id: int | None = None, **inputs) -> list[int]:
        """Greedy decoding with a KV cache: the prompt (with its images) at prefill, then one causal
        token at a time; stops at EOS (included) or after max_new_tokens."""
        out = self.forward(input_ids, **inputs)
        tokens: list[int] = []
        past, logits = out.past, out.logits[0, -1]
        for _ in range(max_new_tokens):
            nxt = int(torch.argmax(logits))
            tokens.append(nxt)
            if eos_token_id is not None and nxt == eos_token_id:
                break
            step = self.forward(torch.tensor([nxt]), past=past)
            past, logits = step.past, step.logits[0, -1]
        return tokens


def molmo2_source_names(cfg: MolmoConfig) -> dict[str, str | list[str]]:
    """Our parameter name -> the hub checkpoint tensor name (molmo2-spec.md §4)."""
    m = {"vision.patch_embedding.bias": "model.vision_backbone.image_vit.patch_embedding.bias"}  # SigLIP's, not v1's
    m.update(shared_source_names(cfg, max(cfg.vit_layers_used) + 1))
    return m
