"""Molmo2's text attention mask (molmo2-spec.md §8, trap 7), in numpy for the runtime and the exporter.

At prefill every image/frame token (`mm_token_type_ids == 1`: `<im_patch>`, `<im_col>`, the
start/end tokens) attends to every other one in the whole sequence - one bidirectional block across
images and video frames - while all other tokens stay causal, and text between images stays
invisible to earlier image tokens. Cached decoding is plain causal.
"""
from __future__ import annotations

import numpy as np

from molmo_edge.runtime.config import MolmoConfig
from molmo_edge.runtime.molmo2_processor import MM_TOKENS


def mm_token_types(cfg: MolmoConfig, input_ids: np.ndarray) -> np.ndarray:
    """1 where a token belongs to an image or frame, else 0 (what the HF processor returns as
    `mm_token_type_ids`); the same shape and int64 dtype as the processor's."""
    ids = cfg.image_token_ids()
    wanted = np.array([ids[t] for t in MM_TOKENS if t in ids], dtype=np.int64)
    return np.isin(np.asarray(input_ids, dtype=np.int64), wanted).astype(np.int64)


def prefix_mask(token_types: np.ndarray, past: int = 0) -> np.ndarray:
    """bool [T, past + T] (True = may attend) for T new tokens after `past` cached ones.

    `token_types` covers the new tokens only; cached tokens count as text, so a chunk holding a
    whole image is bidirectional inside itself and causal to everything before it."""
    mm = np.asarray(token_types).reshape(-1) == 1
    t = mm.shape[0]
    q = np.arange(t)[:, None] + past
    k = np.arange(past + t)[None, :]
    allowed = k <= q
    allowed[:, past:] |= mm[:, None] & mm[None, :]
    return allowed
