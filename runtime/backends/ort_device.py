"""onnxruntime on a GPU without host round trips: with the CUDA (or TensorRT) execution provider the KV cache
lives in device memory (one OrtValue per layer and kind, allocated once at the context length), and each
step binds the past as the cache's filled prefix and the new K/V as the rows right after it, so the decoder
writes them in place; the step's inputs are copied up once as device OrtValues and the logits stay on the
device until they are read. Per token only the embeddings go up and the logits come down.

`binding_plan()` makes every decision from the session's providers and the graph's declared I/O types
(pure, tested); `DeviceDecoder` carries it out through IOBinding. The KV dtype follows the graph: fp16 when
its past_key/past_value inputs are declared float16, else float32 (a cast inside the graph would defeat
the in-place write). The CPU provider keeps the host path in ort.py unchanged unless device I/O is asked for
explicitly (`OrtBackend(..., device_io=True)`), which runs this same code on "cpu" OrtValues: how the
tests check the bookkeeping without a GPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.kv_cache import APPEND, SHARED, KVCache

# execution providers whose memory is CUDA device memory, in the order a session lists them
DEVICE_PROVIDERS = {"CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "cuda"}
ORT_TYPES = {  # onnxruntime type strings -> numpy dtype names
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(int64)": "int64", "tensor(int32)": "int32"}


@dataclass(frozen=True)
class BindingPlan:
    device: str                          # "cuda" | "cpu" (where the bound buffers live)
    device_id: int
    kv_dtype: str                        # "float32" | "float16": as the graph declares its past K/V
    kv_layout: str                       # kv_cache.APPEND (portable) | kv_cache.SHARED (GroupQueryAttention)
    on_device: tuple[str, ...]           # what lives in device memory
    per_step_h2d: tuple[str, ...]        # copied up each step
    per_step_d2h: tuple[str, ...]        # copied down each step
    why: str = ""
    notes: list[str] = field(default_factory=list)


def binding_plan(providers: list[str], input_types: dict[str, str], kv_layout: str, force: bool = False,
                 device_id: int = 0) -> BindingPlan | None:
    """How a decoder session binds its I/O, or None for the unchanged host path (CPU provider, not forced).
    `providers`: the session's providers (session.get_providers(), in priority order); `input_types`:
    input name -> onnxruntime type string ("tensor(float)")."""
    first = next((p for p in providers if p in DEVICE_PROVIDERS or p == "CPUExecutionProvider"), None)
    device = DEVICE_PROVIDERS.get(first or "")
    if device is None and not force:
        return None
    device = device or "cpu"
    kv_type = input_types.get("past_key.0", "tensor(float)")
    kv_dtype = ORT_TYPES.get(kv_type)
    if kv_dtype not in ("float32", "float16"):
        raise MolmoEdgeError(f"the decoder's past_key.0 is {kv_type}: a KV cache must be float32 or float16; re-export the bundle")
    if kv_layout not in (APPEND, SHARED):
        raise MolmoEdgeError(f"unknown KV layout {kv_layout!r} in the bundle manifest; re-export the bundle")
    inputs = ("inputs_embeds", "logit_positions") + (("seqlens_k", "total_sequence_length") if kv_layout == SHARED
                                                      else ("position_ids",))
    notes = [f"KV cache {kv_dtype} on {device}" + (" (the graph declares fp16 K/V)" if kv_dtype == "float16" else
                                                    " (the graph declares float32 K/V; an fp16 cache needs an fp16-I/O export)")]
    return BindingPlan(device, device_id, kv_dtype, kv_layout, ("past_key.*", "past_value.*", "new K/V", "logits") + inputs,
                       inputs, ("logits",), why=f"{first or 'forced'}: device I/O", notes=notes)


class OrtDeviceKVCache(KVCache):
    """The KV cache as device OrtValues: per layer a key and a value buffer, sequence-major [1, max_len, kv, hd]
    ("bsnh") or [1, kv, max_len, hd] ("bnsh", GroupQueryAttention share-buffer). Only addressed, never read."""

    def __init__(self, ort: Any, plan: BindingPlan, n_layers: int, kv_heads: int, head_dim: int, max_len: int):
        self.max_len = self.capacity = max_len  # preallocated on the device, never grows
        self.length = 0
        self.layout = "bnsh" if plan.kv_layout == SHARED else "bsnh"
        self.dtype = np.dtype(plan.kv_dtype)
        shape = [1, max_len, kv_heads, head_dim] if self.layout == "bsnh" else [1, kv_heads, max_len, head_dim]
        self.shape = shape
        self.row_bytes = kv_heads * head_dim * self.dtype.itemsize
        alloc = ort.OrtValue.ortvalue_from_shape_and_type
        self.keys = [alloc(shape, self.dtype.type, plan.device, plan.device_id) for _ in range(n_layers)]
        self.values = [alloc(shape, self.dtype.type, plan.device, plan.device_id) for _ in range(n_layers)]

    def past(self, layer: int):
        raise MolmoEdgeError("this KV cache lives in device memory (onnxruntime CUDA); it is bound, never read on the host")

    slot = past

    def nbytes(self) -> int:
        return 2 * len(self.keys) * int(np.prod(self.shape)) * self.dtype.itemsize


class DeviceDecoder:
    """Runs a decoder session with its cache and step I/O in device memory (see the module doc)."""

    def __init__(self, ort: Any, session: Any, cfg: Any, plan: BindingPlan):
        self.ort, self.session, self.cfg, self.plan = ort, session, cfg, plan
        self.copies: list[tuple[str, str, int]] = []          # (direction, name, bytes) of the last step

    def new_cache(self, max_len: int) -> OrtDeviceKVCache:
        c = self.cfg
        return OrtDeviceKVCache(self.ort, self.plan, c.n_layers, c.n_kv_heads, c.head_dim, max_len)

    def _up(self, io: Any, name: str, arr: np.ndarray) -> None:
        p = self.plan
        io.bind_ortvalue_input(name, self.ort.OrtValue.ortvalue_from_numpy(arr, p.device, p.device_id))
        self.copies.append(("h2d", name, int(arr.nbytes)))

    def run(self, embeds: np.ndarray, positions: np.ndarray, cache: OrtDeviceKVCache, logit_positions: np.ndarray,
            token_types: np.ndarray | None = None) -> np.ndarray:
        """token_types: Molmo2 decoders' [1, T] int64 input (the prefix mask), uploaded like the other step inputs."""
        if not isinstance(cache, OrtDeviceKVCache):
            raise MolmoEdgeError("this onnxruntime backend keeps its KV cache on the GPU: use backend.new_cache()")
        t = int(embeds.shape[1])
        cache.reserve(t)
        p, io, dt = self.plan, self.session.io_binding(), cache.dtype.type
        self.copies = []
        self._up(io, "inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        self._up(io, "logit_positions", np.ascontiguousarray(logit_positions, np.int64))
        if token_types is not None:
            self._up(io, "token_types", token_types)
        if p.kv_layout == SHARED:
            total = cache.length + t
            self._up(io, "seqlens_k", np.array([total - 1], np.int32))
            self._up(io, "total_sequence_length", np.array(total, np.int32))
            for i in range(self.cfg.n_layers):
                for kind, buf in (("key", cache.keys[i]), ("value", cache.values[i])):
                    io.bind_input(f"past_{kind}.{i}", p.device, p.device_id, dt, cache.shape, buf.data_ptr())
                    io.bind_output(f"present_{kind}.{i}", p.device, p.device_id, dt, cache.shape, buf.data_ptr())
        else:
            self._up(io, "position_ids", np.ascontiguousarray(positions, np.int64))
            kv, hd = self.cfg.n_kv_heads, self.cfg.head_dim
            for i in range(self.cfg.n_layers):
                for kind, buf in (("key", cache.keys[i]), ("value", cache.values[i])):
                    base = buf.data_ptr()
                    io.bind_input(f"past_{kind}.{i}", p.device, p.device_id, dt, [1, cache.length, kv, hd], base)
                    io.bind_output(f"new_{kind}.{i}", p.device, p.device_id, dt, [1, t, kv, hd],
                                   base + cache.length * cache.row_bytes)
        io.bind_output("logits", p.device, p.device_id)
        self.session.run_with_iobinding(io)
        cache.length += t
        logits = io.get_outputs()[-1].numpy()      # the one copy down per step
        self.copies.append(("d2h", "logits", int(logits.nbytes)))
        return logits


def device_decoder(ort: Any, session: Any, cfg: Any, kv_layout: str, force: bool = False) -> DeviceDecoder | None:
    """The device-I/O decoder for a session on the CUDA/TensorRT provider (or forced), None for the host path."""
    types = {i.name: i.type for i in session.get_inputs()}
    plan = binding_plan(list(session.get_providers()), types, kv_layout, force)
    return None if plan is None else DeviceDecoder(ort, session, cfg, plan)
