"""Backends run the bundle's two graphs and own the KV cache; everything above them is backend-blind.

A backend has: `name`, `vision(images, image_masks) -> features [N, 144, d]`,
`new_cache() -> KVCache`, and `run_decoder(embeds [1, T, d], positions [1, T], cache, logit_positions [K])
-> logits [1, K, V]` (a prefill of T tokens or one decode step), which appends the K/V to the cache in place.
Molmo2 bundles add `vision_pooled(pixel_values [N, 729, 588], pooling [M, k]) -> features [M, d]` and a
`token_types` [1, T] argument of `run_decoder` (1 = image/frame token: one bidirectional block at prefill);
the onnxruntime backend has both, the TensorRT backend not yet.
"""
from __future__ import annotations

from molmo_edge.runtime.bundle import Bundle
from molmo_edge.runtime.errors import MolmoEdgeError

BACKENDS = ("onnxruntime", "tensorrt")


def open_backend(bundle: Bundle, name: str = "onnxruntime", **options):
    if name == "onnxruntime":
        from molmo_edge.runtime.backends.ort import OrtBackend
        return OrtBackend(bundle, **options)
    if name == "tensorrt":
        from molmo_edge.runtime.backends.trt import TrtBackend
        return TrtBackend(bundle, **options)
    raise MolmoEdgeError(f"unknown backend {name!r}; available: {', '.join(BACKENDS)}")
