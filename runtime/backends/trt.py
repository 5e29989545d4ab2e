"""TensorRT backend and engine builder: the thin layer over the TensorRT 10.3/10.13 Python API.

Every decision (which graph, typing and flags, profiles, keys, which profile a call runs in, buffer
sizes, KV addresses) is made by runtime/tensorrt/engines.py and tested there; this module only calls
TensorRT and CUDA. `tensorrt` and the CUDA bindings are imported when a backend or a build is
created, never at import time, and their absence is one clear error.

Memory: one execution context per engine (the decoder switches between its prefill, extend and
decode profiles), device buffers preallocated at the profile maxima, pinned host staging buffers,
and a device-resident KV cache: past K/V are bound as the cache's prefix and the new K/V are
written by the engine straight after it, so the cache never crosses to the host. Only embeddings
go in and logits / image features come out.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import time
from typing import Any, Callable

import numpy as np

from molmo_edge.runtime.bundle import Bundle, load_bundle
from molmo_edge.runtime.tensorrt.engines import (ENGINES, BuildConfigError, EngineError, GraphBuild, Profile, ShapeRange, TrtEnv,
                            build_plan, check_calibration_cache, decoder_buffers, decoder_call_shapes, decoder_profiles,
                            default_workspace_mb, engine_key, engine_precision, find_engine, kv_addresses, nbytes,
                            read_cache_header, read_record, select_profile, timing_cache_path, verify_files,
                            vision_buffers, vision_profiles, write_record, mismatches, DEFAULT_MAX_EXTEND,
                            DEFAULT_MAX_LOGITS)
from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.kv_cache import KVCache


class TensorRTMissing(MolmoEdgeError):
    """TensorRT's Python bindings or the CUDA bindings are not installed."""


class CudaError(MolmoEdgeError):
    """A CUDA call failed."""


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: PLC0415 - lazy on purpose
    except ImportError as e:
        raise TensorRTMissing(f"TensorRT's Python bindings are not installed ({e}): on Jetson run jetson/setup.sh "
                              "(python3-libnvinfer from JetPack); elsewhere `pip install tensorrt-cu12`; or use "
                              "--backend onnxruntime") from None
    return trt


# ---------------------------------------------------------------------------------------------
# CUDA: cuda-python (preferred, NVIDIA's own bindings) or pycuda
# ---------------------------------------------------------------------------------------------
class CudaPython:
    name = "cuda-python"

    def __init__(self):
        try:
            from cuda.bindings import runtime as rt  # cuda-python >= 12.6
        except ImportError:
            from cuda import cudart as rt  # older cuda-python
        self.rt = rt

    def _ok(self, res: Any, what: str) -> Any:
        err = res[0] if isinstance(res, tuple) else res
        if int(err) != 0:
            name = getattr(err, "name", str(err))
            raise CudaError(f"{what} failed with {name}: check the GPU with `molmo-edge doctor`")
        return res[1] if isinstance(res, tuple) and len(res) == 2 else (res[1:] if isinstance(res, tuple) else None)

    def malloc(self, n: int) -> int:
        return int(self._ok(self.rt.cudaMalloc(max(int(n), 1)), f"cudaMalloc({n})"))

    def free(self, ptr: int) -> None:
        self._ok(self.rt.cudaFree(ptr), "cudaFree")

    def host_empty(self, n: int) -> np.ndarray:
        ptr = int(self._ok(self.rt.cudaMallocHost(max(int(n), 1)), f"cudaMallocHost({n})"))
        arr = np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_uint8)), shape=(max(int(n), 1),))
        self._pinned = getattr(self, "_pinned", {})
        self._pinned[arr.ctypes.data] = ptr
        return arr

    def host_free(self, arr: np.ndarray) -> None:
        ptr = getattr(self, "_pinned", {}).pop(arr.ctypes.data, None)
        if ptr is not None:
            self._ok(self.rt.cudaFreeHost(ptr), "cudaFreeHost")

    def stream(self) -> Any:
        return self._ok(self.rt.cudaStreamCreate(), "cudaStreamCreate")

    def handle(self, stream: Any) -> int:
        return int(stream)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst, src.ctypes.data, src.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyHostToDevice,
                                         stream), "cudaMemcpyAsync H2D")

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self._ok(self.rt.cudaMemcpyAsync(dst.ctypes.data, src, dst.nbytes, self.rt.cudaMemcpyKind.cudaMemcpyDeviceToHost,
                                         stream), "cudaMemcpyAsync D2H")

    def sync(self, stream: Any) -> None:
        self._ok(self.rt.cudaStreamSynchronize(stream), "cudaStreamSynchronize")

    def device(self) -> tuple[str, str, int]:
        props = self._ok(self.rt.cudaGetDeviceProperties(0), "cudaGetDeviceProperties")
        name = props.name.decode(errors="replace") if isinstance(props.name, bytes) else str(props.name)
        return name.strip("\x00 "), f"{props.major}.{props.minor}", int(props.totalGlobalMem)

    def runtime_version(self) -> str:
        v = int(self._ok(self.rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
        return f"{v // 1000}.{v % 1000 // 10}"


class PyCuda:
    name = "pycuda"

    def __init__(self):
        import pycuda.driver as cuda  # noqa: PLC0415
        cuda.init()
        self.cuda = cuda
        self.ctx = cuda.Device(0).retain_primary_context()  # shared with TensorRT, no autoinit context
        self.ctx.push()
        self._allocs: dict[int, Any] = {}

    def malloc(self, n: int) -> int:
        a = self.cuda.mem_alloc(max(int(n), 1))
        self._allocs[int(a)] = a
        return int(a)

    def free(self, ptr: int) -> None:
        a = self._allocs.pop(ptr, None)
        if a is not None:
            a.free()

    def host_empty(self, n: int) -> np.ndarray:
        return self.cuda.pagelocked_empty(max(int(n), 1), np.uint8)

    def host_free(self, arr: np.ndarray) -> None:
        pass  # freed with the array

    def stream(self) -> Any:
        return self.cuda.Stream()

    def handle(self, stream: Any) -> int:
        return int(stream.handle)

    def h2d(self, dst: int, src: np.ndarray, stream: Any) -> None:
        self.cuda.memcpy_htod_async(dst, src, stream)

    def d2h(self, dst: np.ndarray, src: int, stream: Any) -> None:
        self.cuda.memcpy_dtoh_async(dst, src, stream)

    def sync(self, stream: Any) -> None:
        stream.synchronize()

    def device(self) -> tuple[str, str, int]:
        d = self.cuda.Device(0)
        major, minor = d.compute_capability()
        return d.name(), f"{major}.{minor}", int(d.total_memory())

    def runtime_version(self) -> str:
        major, minor, _ = self.cuda.get_version()
        return f"{major}.{minor}"


def open_cuda():
    """cuda-python when installed (the TensorRT samples' choice since 10.13), else pycuda."""
    errors = []
    for cls in (CudaPython, PyCuda):
        try:
            return cls()
        except ImportError as e:
            errors.append(f"{cls.name}: {e}")
    raise TensorRTMissing("no CUDA Python bindings (" + "; ".join(errors) + "): `pip install 'cuda-python>=12,<13'` "
                          "on JetPack 6 (CUDA 12.6), `'cuda-python>=13,<14'` on JetPack 7")


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
    if role == "vision":
        return {"images": "float32", "image_masks": "float32"}, {"image_features": "float32"}
    ins = {"inputs_embeds": "float32", "position_ids": "int64", "logit_positions": "int64"}
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

    def __init__(self, cuda: Any, n_layers: int, kv_heads: int, head_dim: int, max_len: int):
        self.cuda = cuda
        self.max_len = max_len
        self.layout = "bsnh"
        self.length = 0
        self.row_bytes = kv_heads * head_dim * 4
        self.keys = [cuda.malloc(max_len * self.row_bytes) for _ in range(n_layers)]
        self.values = [cuda.malloc(max_len * self.row_bytes) for _ in range(n_layers)]

    def past(self, layer: int):
        raise EngineError("the TensorRT KV cache lives on the GPU; it is only addressed, never read on the host")

    slot = past

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
                 providers: Any = None, threads: int | None = None, _trt: Any = None, _cuda: Any = None):
        self.bundle, self.cfg = bundle, bundle.config
        self.precision = engine_precision(precision)
        self.trt = _trt or import_tensorrt()
        self.cuda = _cuda or open_cuda()
        self.env = current_env(self.trt, self.cuda)
        rec = find_engine(bundle.folder, bundle.manifest, self.env, self.precision, engine)
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

    def new_cache(self, max_len: int | None = None) -> DeviceKVCache:
        c = self.cfg
        return DeviceKVCache(self.cuda, c.n_layers, c.n_kv_heads, c.head_dim, min(max_len or self.max_len, self.max_len))

    def decode(self, embeds: np.ndarray, positions: np.ndarray, cache: DeviceKVCache, logit_positions: np.ndarray) -> np.ndarray:
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


# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------
class _Clock:
    def __init__(self, progress: Callable[[str], None]):
        self.t0 = time.perf_counter()
        self.progress = progress

    def say(self, msg: str) -> None:
        s = time.perf_counter() - self.t0
        self.progress(f"[build {int(s // 60)}:{s % 60:04.1f}] {msg}")


def _cache_calibrator(trt: Any, cache: bytes, algorithm: str) -> Any:
    """An INT8 calibrator that never calibrates: TensorRT takes every scale from the cache."""
    bases = {"EntropyCalibration2": "IInt8EntropyCalibrator2", "EntropyCalibration": "IInt8EntropyCalibrator",
             "MinMaxCalibration": "IInt8MinMaxCalibrator"}
    if algorithm not in bases:
        raise BuildConfigError(f"calibration cache algorithm {algorithm} is not supported here; re-run `molmo-edge "
                               "calibrate` with the entropy or minmax method")
    base = getattr(trt, bases[algorithm])

    class CacheOnly(base):  # type: ignore[misc, valid-type]
        def __init__(self):
            base.__init__(self)

        def get_batch_size(self) -> int:
            return 1

        def get_batch(self, names: Any) -> None:
            return None  # no data: the cache must cover every tensor

        def read_calibration_cache(self) -> bytes:
            return cache

        def write_calibration_cache(self, data: Any) -> None:
            return None

    return CacheOnly()


def _build_one(trt: Any, logger: Any, bundle: Bundle, job: GraphBuild, profiles: list[Profile], workspace_mb: int,
               timing: bytes, clock: _Clock) -> tuple[bytes, bytes]:
    """(serialized engine, updated timing cache) for one graph."""
    path = bundle.graph_path(job.graph)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if job.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    clock.say(f"{job.role}: parsing {os.path.basename(path)} (+ external weights) ...")
    if not parser.parse_from_file(path):
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() if hasattr(e, "node_name") else e.node()
            errs.append(f"node {node}: {e.desc()}")
        raise BuildConfigError(f"TensorRT {trt.__version__} could not parse {os.path.basename(path)}: "
                               f"{'; '.join(errs[:3]) or 'no details'}; run `molmo-edge check-trt {bundle.folder}`")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb * 2**20)
    for f in job.flags:
        config.set_flag(getattr(trt.BuilderFlag, f))
    trt_profiles = []
    for p in profiles:
        tp = builder.create_optimization_profile()
        for name, r in p.shapes.items():
            tp.set_shape(name, r.min, r.opt, r.max)
        config.add_optimization_profile(tp)
        trt_profiles.append(tp)
    if job.calibration_cache:
        cache_path = bundle.path(job.calibration_cache)
        _, algorithm, _ = read_cache_header(cache_path)
        with open(cache_path, "rb") as f:
            config.int8_calibrator = _cache_calibrator(trt, f.read(), algorithm)
        config.set_calibration_profile(trt_profiles[0])
    tc = config.create_timing_cache(timing)
    if not config.set_timing_cache(tc, False):
        clock.say("the timing cache is from another GPU or TensorRT version: starting a fresh one")
        tc = config.create_timing_cache(b"")
        config.set_timing_cache(tc, False)
    what = "strongly typed" if job.strongly_typed else "+".join(job.flags)
    clock.say(f"{job.role}: building the engine ({what}, {len(profiles)} profile(s), workspace {workspace_mb} MB) ...")
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build the {job.role} engine (see the TensorRT log above): try a larger "
                          "--workspace, smaller --max-crops/--max-seq, or check `molmo-edge doctor`")
    return bytes(memoryview(plan)), bytes(memoryview(config.get_timing_cache().serialize()))


def build_engines(folder: str, precision: str = "fp16", int8_mode: str = "qdq", max_crops: int | None = None,
                  max_seq: int | None = None, workspace_mb: int | None = None, timing_cache: str | None = None,
                  force: bool = False, max_extend: int = DEFAULT_MAX_EXTEND, max_logits: int = DEFAULT_MAX_LOGITS,
                  progress: Callable[[str], None] = print, _trt: Any = None, _cuda: Any = None) -> str:
    """Build (or confirm) the engines of a bundle for this machine; returns the engine folder."""
    from molmo_edge.runtime.tensorrt.check import TRT_VERSIONS, check_graph, load_table, normalize_trt_version, read_onnx
    clock = _Clock(progress)
    bundle = load_bundle(folder)
    cfg = bundle.config
    trt = _trt or import_tensorrt()
    cuda = _cuda or open_cuda()
    env = current_env(trt, cuda)
    clock.say(f"{env.describe()}")
    jobs = build_plan(bundle.manifest, precision, int8_mode, env.tensorrt)
    crops = max_crops or cfg.preprocess.max_crops
    seq = max_seq or cfg.max_sequence_length
    profiles = {"vision": vision_profiles(cfg, crops), "decoder": decoder_profiles(cfg, seq, crops, max_extend, max_logits)}
    key = engine_key(folder, bundle.manifest, jobs, profiles, env, precision, int8_mode)
    out = os.path.join(folder, ENGINES, key.dirname())
    if os.path.isdir(out) and not force:
        try:
            rec = read_record(out)
            if not mismatches(rec.key, key.fields()) and not verify_files(rec):
                clock.say(f"up to date: {out}")
                return out
        except EngineError:
            pass
        clock.say(f"{out} is incomplete or stale: rebuilding")
    # check the graphs first: a parser failure deep in a 30-minute build is worse than a list of node names
    short = ".".join(env.tensorrt.split(".")[:2])
    if short in TRT_VERSIONS:
        table = load_table(normalize_trt_version(short))
        for job in jobs:
            errs = [p for p in check_graph(read_onnx(bundle.graph_path(job.graph)), table, job.graph) if p.severity == "error"]
            if errs:
                raise BuildConfigError(f"{job.graph} will not build on TensorRT {short}: {errs[0].line()} (and "
                                       f"{len(errs) - 1} more; see `molmo-edge check-trt {folder} --trt {short}`)")
    else:
        clock.say(f"no ONNX operator table for TensorRT {env.tensorrt}: skipping check-trt, the parser will tell")
    for job in jobs:
        if job.calibration_cache:
            g = read_onnx(bundle.graph_path(job.graph)).graph
            values = {v.name for v in g.inputs} | {o for n in g.nodes for o in n.outputs}
            check_calibration_cache(bundle.path(job.calibration_cache), env.tensorrt, values)
        if job.note:
            clock.say(f"{job.role}: {job.note}")
    tc_path = timing_cache or timing_cache_path(folder, env)
    timing = b""
    if os.path.isfile(tc_path):
        with open(tc_path, "rb") as f:
            timing = f.read()
        clock.say(f"timing cache {tc_path} ({len(timing)} bytes)")
    if workspace_mb is None:
        workspace_mb = default_workspace_mb(cuda.device()[2])
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    files, seconds = {}, {}
    try:
        for job in jobs:
            t0 = time.perf_counter()
            plan, timing = _build_one(trt, logger, bundle, job, profiles[job.role], workspace_mb, timing, clock)
            _write_atomic(tc_path, timing)   # keep the tuned tactics even if a later build fails
            name = f"{job.role}.plan"
            _write_atomic(os.path.join(tmp, name), plan)
            files[job.role] = {"file": name, "bytes": len(plan), "sha256": hashlib.sha256(plan).hexdigest(),
                               "graph": job.graph}
            seconds[job.role] = round(time.perf_counter() - t0, 1)
            clock.say(f"{job.role}: {len(plan) / 2**20:.1f} MiB engine in {seconds[job.role]} s")
        write_record(tmp, key, files, seconds)
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    clock.say(f"done: {out}")
    return out


def _write_atomic(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.partial-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
