"""TensorRT backend: runs engines that `molmo-edge build` (runtime/tensorrt/build.py) made; the thin layer
over the TensorRT 10.3/10.13 runtime API.

Every decision (profiles, keys, which profile a call runs in, buffer sizes, KV addresses) is made in
runtime/backends/trt_engines.py and tested there; this module only calls TensorRT and CUDA
(runtime/backends/cuda.py). `tensorrt` and the CUDA bindings are imported when a backend is created,
never at import time, and their absence is one clear error.

Memory: one execution context per engine (the decoder switches between its prefill, extend and
decode profiles), device buffers preallocated at the profile maxima, pinned host staging buffers,
and a device-resident KV cache: past K/V are bound as the cache's prefix and the new K/V are
written by the engine straight after it, so the cache never crosses to the host. Only embeddings
go in and logits / image features come out.
"""
from __future__ import annotations

from typing import Any

import numpy as np

from molmo_edge.runtime.bundle import Bundle
from molmo_edge.runtime.backends.cuda import CudaError, TensorRTMissing, open_cuda  # noqa: F401 - re-exported
from molmo_edge.runtime.backends.trt_engines import (EngineError, EngineRecord, Profile, ShapeRange, TrtEnv, decoder_buffers,
                                                     decoder_call_shapes, engine_precision, find_engine, kv_addresses,
                                                     nbytes, select_profile, vision_buffers)
from molmo_edge.runtime.kv_cache import KVCache


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as e:
        raise TensorRTMissing(f"TensorRT's Python bindings are not installed ({e}): on Jetson run jetson/setup.sh "
                              "(python3-libnvinfer from JetPack); elsewhere `pip install tensorrt-cu12`; or use "
                              "--backend onnxruntime") from None
    return trt


def current_env(trt: Any, cuda: Any) -> TrtEnv:
    from molmo_edge.runtime.machine import jetpack_for_l4t, read_l4t_release
    name, cc, _ = cuda.device()
    l4t = read_l4t_release()
    try:
        cuda_version = cuda.runtime_version()
    except Exception:  # noqa: BLE001 - informative only
        cuda_version = None
    return TrtEnv(str(trt.__version__), name, cc, l4t, jetpack_for_l4t(l4t), cuda_version)


# ---------------------------------------------------------------------------------------------
# Small pure helpers about engines (tested without TensorRT)
# ---------------------------------------------------------------------------------------------
_TRT_DTYPES = {"FLOAT": "float32", "HALF": "float16", "INT64": "int64", "INT32": "int32", "BOOL": "bool",
               "INT8": "int8", "UINT8": "uint8", "BF16": "bfloat16"}


def dtype_name(dt: Any) -> str:
    n = getattr(dt, "name", None) or str(dt).split(".")[-1]
    return _TRT_DTYPES.get(n, n.lower())


def expected_io(cfg, role: str) -> tuple[dict[str, str], dict[str, str]]:
    """(inputs, outputs) name -> dtype an engine built from the bundle's graph must have."""
    molmo2 = getattr(cfg, "is_molmo2", False)
    if role == "vision":
        ins = {"pixel_values": "float32", "pooling": "int64"} if molmo2 else {"images": "float32", "image_masks": "float32"}
        return ins, {"image_features": "float32"}
    ins = {"inputs_embeds": "float32", "position_ids": "int64", "logit_positions": "int64"}
    if molmo2:
        ins["token_types"] = "int64"
    outs = {"logits": "float32"}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            ins[f"past_{kind}.{i}"] = "float32"
            outs[f"new_{kind}.{i}"] = "float32"
    return ins, outs


def io_problems(got_in: dict[str, str], got_out: dict[str, str], want_in: dict[str, str], want_out: dict[str, str]) -> list[str]:
    out = []
    for kind, got, want in (("input", got_in, want_in), ("output", got_out, want_out)):
        for n, d in want.items():
            if n not in got:
                out.append(f"{kind} {n} is missing")
            elif got[n] != d:
                out.append(f"{kind} {n} is {got[n]}, expected {d}")
        for n in got:
            if n not in want:
                out.append(f"unexpected {kind} {n}")
    return out


# ---------------------------------------------------------------------------------------------
# Runtime
# ---------------------------------------------------------------------------------------------
class _Engine:
    """One deserialized engine with one execution context, switching optimization profiles on demand."""

    def __init__(self, trt: Any, runtime: Any, path: str, cuda: Any, stream: Any):
        self.trt, self.cuda, self.stream = trt, cuda, stream
        with open(path, "rb") as f:
            data = f.read()
        self.engine = runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise EngineError(f"{path} cannot be deserialized by TensorRT {trt.__version__} (damaged, or built by another "
                              "version or with plugins that are not loaded): rebuild with `molmo-edge build BUNDLE --force`")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EngineError(f"TensorRT could not create an execution context for {path} (out of GPU memory?): free "
                              "memory or rebuild with smaller --max-seq/--max-crops")
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        self.inputs = {n: dtype_name(e.get_tensor_dtype(n)) for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        self.outputs = {n: dtype_name(e.get_tensor_dtype(n)) for n in names if n not in self.inputs}
        self.profiles = []
        for p in range(e.num_optimization_profiles):
            shapes = {}
            for n in self.inputs:
                lo, opt, hi = e.get_tensor_profile_shape(n, p)
                shapes[n] = ShapeRange(tuple(lo), tuple(opt), tuple(hi))
            self.profiles.append(Profile(str(p), shapes))
        self.profile = 0

    def run(self, shapes: dict[str, tuple[int, ...]], addresses: dict[str, int], profile: int) -> None:
        ctx, h = self.context, self.cuda.handle(self.stream)
        if profile != self.profile:
            if not ctx.set_optimization_profile_async(profile, h):
                raise EngineError(f"TensorRT refused optimization profile {profile}; rebuild the engine")
            self.profile = profile
        for n, s in shapes.items():
            if not ctx.set_input_shape(n, tuple(int(x) for x in s)):
                raise EngineError(f"TensorRT refused shape {list(s)} for {n}; rebuild with larger limits")
        for n, a in addresses.items():
            ctx.set_tensor_address(n, int(a))
        if not ctx.execute_async_v3(h):
            raise EngineError("TensorRT execution failed (see the TensorRT log above); check `molmo-edge doctor`")


class _Buffers:
    """Device buffers with pinned host mirrors, allocated once at the profile maxima."""

    def __init__(self, cuda: Any, specs: dict[str, tuple[tuple[int, ...], str]]):
        self.cuda = cuda
        self.dev: dict[str, int] = {}
        self.host: dict[str, np.ndarray] = {}
        self.specs = specs
        for n, (shape, dtype) in specs.items():
            size = nbytes(shape, dtype)
            self.dev[n] = cuda.malloc(size)
            self.host[n] = cuda.host_empty(size)

    def stage(self, name: str, arr: np.ndarray) -> np.ndarray:
        """Copy `arr` into the pinned mirror of `name` (as its dtype), return the filled view."""
        dtype = np.dtype(self.specs[name][1])
        view = self.host[name][: arr.size * dtype.itemsize].view(dtype).reshape(arr.shape)
        np.copyto(view, arr, casting="same_kind")
        return view

    def view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(self.specs[name][1])
        n = int(np.prod(shape))
        return self.host[name][: n * dtype.itemsize].view(dtype).reshape(shape)

    def close(self) -> None:
        for p in self.dev.values():
            self.cuda.free(p)
        for a in self.host.values():
            self.cuda.host_free(a)
        self.dev, self.host = {}, {}


class DeviceKVCache(KVCache):
    """The KV cache in GPU memory: per layer one key and one value buffer [1, max_len, kv_heads, head_dim]
    float32, sequence-major like the host cache. `reserve` and `truncate` work as in KVCache."""

    def __init__(self, cuda: Any, n_layers: int, kv_heads: int, head_dim: int, max_len: int, stream: Any = None):
        self.cuda, self.stream = cuda, stream
        self.max_len = self.capacity = max_len  # preallocated on the GPU, never grows
        self.layout = "bsnh"
        self.length = 0
        self.row_bytes = kv_heads * head_dim * 4
        self.row_shape = (kv_heads, head_dim)
        self.keys = [cuda.malloc(max_len * self.row_bytes) for _ in range(n_layers)]
        self.values = [cuda.malloc(max_len * self.row_bytes) for _ in range(n_layers)]

    def past(self, layer: int):
        raise EngineError("the TensorRT KV cache lives on the GPU; it is only addressed, never read on the host")

    slot = past

    def read_back(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copies of one layer's filled K/V [length, kv_heads, head_dim]: for build's parity check only
        (a step never does this)."""
        out = []
        for base in (self.keys[layer], self.values[layer]):
            host = np.empty((self.length, *self.row_shape), np.float32)
            if self.length:
                if self.stream is None:
                    self.stream = self.cuda.stream()
                self.cuda.d2h(host, base, self.stream)
                self.cuda.sync(self.stream)
            out.append(host)
        return out[0], out[1]

    def addresses(self, layer: int, new: int) -> dict[str, tuple[int, int]]:
        return {kind: kv_addresses(base, self.row_bytes, self.length, new, self.max_len)
                for kind, base in (("key", self.keys[layer]), ("value", self.values[layer]))}

    def close(self) -> None:
        for p in self.keys + self.values:
            self.cuda.free(p)
        self.keys, self.values = [], []

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class TrtBackend:
    name = "tensorrt"

    def __init__(self, bundle: Bundle, precision: str = "fp32", engine: str | None = None, fused: bool = True,
                 providers: Any = None, threads: int | None = None, record: EngineRecord | None = None,
                 _trt: Any = None, _cuda: Any = None):
        self.bundle, self.cfg = bundle, bundle.config
        self.precision = engine_precision(precision)
        self.trt = _trt or import_tensorrt()
        self.cuda = _cuda or open_cuda()
        self.env = current_env(self.trt, self.cuda)
        # `record`: an engine not registered yet (build's parity check runs it before it is kept)
        rec = record or find_engine(bundle.folder, bundle.manifest, self.env, self.precision, engine)
        self.record = rec
        self.graphs = dict(rec.key["graphs"])
        self.device = "cuda"
        self.stream = self.cuda.stream()
        logger = self.trt.Logger(self.trt.Logger.WARNING)
        self.trt.init_libnvinfer_plugins(logger, "")
        self._runtime = self.trt.Runtime(logger)
        self._vision = _Engine(self.trt, self._runtime, rec.plan_path("vision"), self.cuda, self.stream)
        self._decoder = _Engine(self.trt, self._runtime, rec.plan_path("decoder"), self.cuda, self.stream)
        for role, eng in (("vision", self._vision), ("decoder", self._decoder)):
            bad = io_problems(eng.inputs, eng.outputs, *expected_io(self.cfg, role))
            if bad:
                raise EngineError(f"the {role} engine in {rec.path} does not match this bundle ({'; '.join(bad[:3])}): "
                                  "rebuild with `molmo-edge build BUNDLE --force`")
        self._vbuf = _Buffers(self.cuda, vision_buffers(self.cfg, self._vision.profiles))
        self._dbuf = _Buffers(self.cuda, decoder_buffers(self.cfg, self._decoder.profiles))
        self.max_len = max(p.shapes["past_key.0"].max[1] for p in self._decoder.profiles) + 1
        crops_input = "pixel_values" if self.cfg.is_molmo2 else "images"
        self.max_vision_crops = max(p.shapes[crops_input].max[0] for p in self._vision.profiles)  # Molmo2 chunks by it

    # --- the backend interface ---------------------------------------------------------------
    def vision(self, images: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        shapes = {"images": tuple(images.shape), "image_masks": tuple(image_masks.shape)}
        profile = select_profile(self._vision.profiles, shapes)
        b, c, s = self._vbuf, self.cuda, self.stream
        c.h2d(b.dev["images"], b.stage("images", images), s)
        c.h2d(b.dev["image_masks"], b.stage("image_masks", image_masks), s)
        self._vision.run(shapes, {n: b.dev[n] for n in ("images", "image_masks", "image_features")}, profile)
        out = b.view("image_features", (images.shape[0], self.cfg.tokens_per_crop, self.cfg.d_model))
        c.d2h(out, b.dev["image_features"], s)
        c.sync(s)
        return out.copy()

    def vision_pooled(self, pixel_values: np.ndarray, pooling: np.ndarray) -> np.ndarray:
        """Molmo2: crops [N, 729, 588] + pooling index [M, k] -> features [M, d]."""
        pixels = np.asarray(pixel_values, np.float32).reshape(-1, *np.shape(pixel_values)[-2:])
        pool = np.asarray(pooling, np.int64).reshape(-1, np.shape(pooling)[-1])
        shapes = {"pixel_values": tuple(pixels.shape), "pooling": tuple(pool.shape)}
        profile = select_profile(self._vision.profiles, shapes)
        b, c, s = self._vbuf, self.cuda, self.stream
        c.h2d(b.dev["pixel_values"], b.stage("pixel_values", pixels), s)
        c.h2d(b.dev["pooling"], b.stage("pooling", pool), s)
        self._vision.run(shapes, {n: b.dev[n] for n in ("pixel_values", "pooling", "image_features")}, profile)
        out = b.view("image_features", (pool.shape[0], self.cfg.d_model))
        c.d2h(out, b.dev["image_features"], s)
        c.sync(s)
        return out.copy()

    def new_cache(self, max_len: int | None = None) -> DeviceKVCache:
        c = self.cfg
        return DeviceKVCache(self.cuda, c.n_layers, c.n_kv_heads, c.head_dim, min(max_len or self.max_len, self.max_len),
                             self.stream)

    def run_decoder(self, embeds: np.ndarray, positions: np.ndarray, cache: DeviceKVCache, logit_positions: np.ndarray,
                    token_types: np.ndarray | None = None) -> np.ndarray:
        if not isinstance(cache, DeviceKVCache):
            raise EngineError("the TensorRT backend needs its own KV cache: use backend.new_cache()")
        t, k = int(embeds.shape[1]), int(len(logit_positions))
        cache.reserve(t)
        shapes = decoder_call_shapes(self.cfg, t, cache.length, k)
        profile = select_profile(self._decoder.profiles, shapes)
        b, c, s = self._dbuf, self.cuda, self.stream
        c.h2d(b.dev["inputs_embeds"], b.stage("inputs_embeds", np.asarray(embeds, np.float32)), s)
        c.h2d(b.dev["position_ids"], b.stage("position_ids", np.asarray(positions, np.int64)), s)
        c.h2d(b.dev["logit_positions"], b.stage("logit_positions", np.asarray(logit_positions, np.int64)), s)
        addr = {n: b.dev[n] for n in ("inputs_embeds", "position_ids", "logit_positions", "logits")}
        if self.cfg.is_molmo2:  # the prefix mask's token types (None: text, causal)
            types = np.zeros((1, t), np.int64) if token_types is None else np.asarray(token_types, np.int64).reshape(1, t)
            c.h2d(b.dev["token_types"], b.stage("token_types", types), s)
            addr["token_types"] = b.dev["token_types"]
        for i in range(self.cfg.n_layers):
            for kind, (past, new) in cache.addresses(i, t).items():
                addr[f"past_{kind}.{i}"] = past
                addr[f"new_{kind}.{i}"] = new
        self._decoder.run(shapes, addr, profile)
        out = b.view("logits", (1, k, self.cfg.embedding_size))
        c.d2h(out, b.dev["logits"], s)
        c.sync(s)
        cache.length += t
        return out.copy()

    def close(self) -> None:
        for buf in ("_vbuf", "_dbuf"):
            if getattr(self, buf, None) is not None:
                getattr(self, buf).close()
                setattr(self, buf, None)


