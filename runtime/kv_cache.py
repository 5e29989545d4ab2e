"""A preallocated KV cache: per layer one key and one value buffer.

Layout "bsnh" [1, max_len, kv_heads, head_dim] (portable decoder): sequence-major, so the filled
part `[:, :length]` is a contiguous prefix handed to the decoder without copying, and each step's
new entries are written in place right after it. Layout "bnsh" [1, kv_heads, max_len, head_dim]
(onnxruntime GroupQueryAttention in share-buffer mode): the whole buffer is bound as both past and
present and the op writes the new entries in place. Pages of the buffers are committed by the OS
only when first written (np.zeros is lazy).
"""
from __future__ import annotations

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError


class ContextOverflow(MolmoEdgeError):
    """The prompt plus the answer would not fit the model's context."""


class KVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, max_len: int, dtype=np.float32, layout: str = "bsnh"):
        self.max_len = max_len
        self.layout = layout
        shape = (1, max_len, kv_heads, head_dim) if layout == "bsnh" else (1, kv_heads, max_len, head_dim)
        self.keys = [np.zeros(shape, dtype) for _ in range(n_layers)]
        self.values = [np.zeros(shape, dtype) for _ in range(n_layers)]
        self.length = 0

    def reserve(self, n: int) -> None:
        """Fail clearly before running a step that would not fit."""
        if self.length + n > self.max_len:
            raise ContextOverflow(f"{self.length + n} tokens exceed the model's context of {self.max_len}: shorten the "
                                  "prompt, use fewer image crops (--max-crops) or fewer new tokens (--max-new-tokens)")

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[layer][:, : self.length], self.values[layer][:, : self.length]

    def slot(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the next n entries go (contiguous views into the buffers)."""
        return self.keys[layer][:, self.length: self.length + n], self.values[layer][:, self.length: self.length + n]

    def truncate(self, length: int) -> None:
        """Forget everything after `length` (e.g. back to a cached image prefix); nothing is copied."""
        self.length = min(self.length, length)
