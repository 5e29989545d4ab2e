"""A preallocated KV cache: per layer one key and one value buffer.

Layout "bsnh" [1, max_len, kv_heads, head_dim] (portable decoder): sequence-major, so the filled
part `[:, :length]` is a contiguous prefix handed to the decoder without copying, and each step's
new entries are written in place right after it. Layout "bnsh" [1, kv_heads, max_len, head_dim]
(onnxruntime GroupQueryAttention in share-buffer mode): the whole buffer is bound as both past and
present and the op writes the new entries in place.

A cache made without a fixed size (a session's, which serves every question) grows to what the questions need,
GROW_STEP tokens at a time, up to the model's context: onnxruntime's CPU GroupQueryAttention commits the whole
buffer it is bound to, however few positions are filled (measured, full-size MolmoE-1B INT4: a 64-token prefill
left 0.47 GiB resident with a 4096-long fp16 cache, 0.08 GiB with a 1024-long one; decode speed the same), so a
context-long buffer cost every process 0.5 GiB. Growing copies the filled part once (about 0.1 GB at 800 tokens).
"""
from __future__ import annotations

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError


# the two KV layouts a decoder graph declares in its manifest entry ("kv_layout")
APPEND = "bsnh-append"   # portable decoder: past [1, T, kv_heads, hd] in, the new entries out
SHARED = "bnsh-shared"   # fused decoder: one [1, kv_heads, max_len, hd] buffer per layer bound as past and present


def kv_layout(entry: dict) -> str:
    """The KV layout a decoder's manifest entry declares (portable when it does not say)."""
    return entry.get("kv_layout", APPEND)


class ContextOverflow(MolmoEdgeError):
    """The prompt plus the answer would not fit the model's context."""


GROW_STEP = 256  # tokens a growing cache's buffers are rounded up to


def grown_capacity(tokens: int) -> int:
    """The buffer length a growing cache takes to hold `tokens` (before the context limit)."""
    return -(-tokens // GROW_STEP) * GROW_STEP


class KVCache:
    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, max_len: int, dtype=np.float32, layout: str = "bsnh",
                 capacity: int | None = None):
        """max_len: the most tokens it may hold; capacity: the tokens its buffers hold now (max_len when not
        given; fewer, even 0, and it grows in `reserve`)."""
        self.max_len = max_len
        self.layout = layout
        self.capacity = max_len if capacity is None else min(capacity, max_len)
        self._seq_axis = 1 if layout == "bsnh" else 2
        self._row = (kv_heads, head_dim)
        self.keys = [self._buffer(dtype) for _ in range(n_layers)]
        self.values = [self._buffer(dtype) for _ in range(n_layers)]
        self.length = 0

    def _buffer(self, dtype) -> np.ndarray:
        shape = [1, *self._row]
        shape.insert(self._seq_axis, self.capacity)
        return np.zeros(shape, dtype)

    def reserve(self, n: int) -> None:
        """Make room for n more entries, or fail clearly before running a step that would not fit."""
        need = self.length + n
        if need > self.max_len:
            raise ContextOverflow(f"{need} tokens exceed the model's context of {self.max_len}: shorten the "
                                  "prompt, use fewer image crops (--max-crops) or fewer new tokens (--max-new-tokens)")
        if need > self.capacity:
            self._grow(min(self.max_len, grown_capacity(need)))

    def _grow(self, capacity: int) -> None:
        """New buffers of `capacity` tokens holding the filled part of the old ones."""
        self.capacity = capacity
        filled = (slice(None),) * self._seq_axis + (slice(0, self.length),)
        for bufs in (self.keys, self.values):
            for i, old in enumerate(bufs):
                bufs[i] = self._buffer(old.dtype)
                bufs[i][filled] = old[filled]

    def past(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return self.keys[layer][:, : self.length], self.values[layer][:, : self.length]

    def slot(self, layer: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Where the next n entries go (contiguous views into the buffers)."""
        return self.keys[layer][:, self.length: self.length + n], self.values[layer][:, self.length: self.length + n]

    def truncate(self, length: int) -> None:
        """Forget everything after `length` (e.g. back to a cached image prefix); nothing is copied."""
        self.length = min(self.length, length)


def kv_dtype(entry: dict) -> np.dtype:
    """The KV cache dtype a decoder's manifest entry declares (its past_key.0 input; fp16 in the fused layout of
    fp16 and quantized exports, export/onnx_fused.py), float32 when the entry does not say."""
    for v in entry.get("inputs", []):
        if v["name"] == "past_key.0":
            return np.dtype(v.get("dtype", "float32"))
    return np.dtype(np.float32)


def first_pass_feeds(embeds: np.ndarray, kv_layout: str, n_layers: int, kv_heads: int, head_dim: int,
                     kv: np.dtype = np.float32) -> dict[str, np.ndarray]:
    """A decoder graph's inputs for one pass over `embeds` [1, T, d] from an empty cache, logits at every
    position, in either KV layout ("bsnh-append": empty past tensors; "bnsh-shared": a T-long shared buffer per
    layer, lengths for GroupQueryAttention; kv: its dtype). For the checks that run a graph directly, without a backend."""
    t = embeds.shape[1]
    feeds = {"inputs_embeds": np.asarray(embeds, np.float32), "logit_positions": np.arange(t, dtype=np.int64)}
    if kv_layout == SHARED:
        feeds.update(seqlens_k=np.array([t - 1], np.int32), total_sequence_length=np.array(t, np.int32))
        past = (1, kv_heads, t, head_dim)
    else:
        feeds["position_ids"] = np.arange(t, dtype=np.int64)[None]
        past = (1, 0, kv_heads, head_dim)
    for i in range(n_layers):
        for kind in ("key", "value"):
            feeds[f"past_{kind}.{i}"] = np.zeros(past, kv)
    return feeds
