"""onnxruntime backend: CPU by default, the CUDA provider when present. The decoder's new K/V are
bound straight into the preallocated cache (IOBinding), so no per-token allocation of the cache."""
from __future__ import annotations

import os

import numpy as np

from molmo_edge.runtime.bundle import Bundle, BundleError, GraphChoice, choose_graphs
from molmo_edge.runtime.deps import require
from molmo_edge.runtime.kv_cache import SHARED, KVCache, kv_dtype, kv_layout
from molmo_edge.runtime.machine import drop_mapped_pages, int8_pairs_saturate, paging_out, trim_heap
from molmo_edge.runtime.memory import CAST_PER_RUN_ROLES, VISION_CROPS_PER_RUN
from molmo_edge.runtime.onnx_index import load_only_ranges, weight_casts_first


def default_providers() -> list[str]:
    ort = require("onnxruntime")
    have = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in have]


def session_options(threads: int | None = None):
    """The onnxruntime SessionOptions every graph of a bundle runs with: the runtime, calibrate, the export and
    quantize self-checks and the TensorRT parity reference (so a check runs what the runtime will)."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # x86 CPUs without VNNI (AVX2, AVX-512 before VNNI) multiply INT8 through VPMADDUBSW, whose int16 pair sums
    # saturate for weights outside [-64, 63]: onnxruntime then computes those MatMuls as u8u8 instead (measured on
    # an AVX2-only AMD EPYC: the tiny INT8 vision's crop cosine 0.98 without this, 0.997 with it, the same as
    # computing the Q/DQ graph unfused). Only there: on a VNNI Xeon the u8u8 path made an INT8 MatMul 7.5x slower
    # (29.2 against 3.9 ms) and the full-size INT8 vision as slow as fp32 (1.24 against 1.38 s a crop).
    if int8_pairs_saturate():
        opts.add_session_config_entry("session.x64quantprecision", "1")
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # no CPU arena: it grows by doubling and keeps every chunk, so one question's activations stayed resident
    # (measured, full-width MolmoE-1B INT4, 2 layers, 7 crops: +1.09 GiB with the arena, +0.14 GiB without;
    # speed the same within noise)
    opts.enable_cpu_mem_arena = False
    return opts


def provider_device(providers: list[str]) -> str:
    return "cuda" if "CUDAExecutionProvider" in providers else "cpu"


def open_session(path: str, providers: list[str] | None = None, threads: int | None = None,
                 cast_weights_per_run: bool = False):
    """A session of one of a bundle's graphs with session_options (the CPU provider unless told).
    cast_weights_per_run, on CPU: fp16 weights stay fp16, memory-mapped, and each is converted to float32 just
    before the node that uses it, at every run, instead of being folded to float32 at load and held for the
    session's life (twice the file). For the vision graph, whose runs are few and long: full-width MolmoE-1B, 2
    crops, 0.25 GiB peak anonymous instead of 1.28; full size, 7 crops, 2-8 % slower a pass (2-core AMD EPYC,
    benchmarks/RESULTS.md). The fp16 Casts go first in the node list (onnx_index.weight_casts_first) and constant
    folding is off; ORT_ENABLE_ALL folds them whatever the optimizer list, so this level is EXTENDED. An
    onnxruntime that cannot load a model from bytes with its external data beside it gets the graph file as usual."""
    ort = require("onnxruntime")
    providers = providers or ["CPUExecutionProvider"]
    model = weight_casts_first(path) if cast_weights_per_run and provider_device(providers) == "cpu" else None
    if model is not None:
        opts = session_options(threads)
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      os.path.dirname(os.path.abspath(path)))
        try:
            return ort.InferenceSession(model, sess_options=opts, providers=providers,
                                        disabled_optimizers=["ConstantFolding"])
        except Exception:  # onnxruntime's own types; the file path below raises a real problem again
            pass
    return ort.InferenceSession(path, sess_options=session_options(threads), providers=providers)


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, bundle: Bundle, providers: list[str] | None = None, threads: int | None = None,
                 precision: str = "auto", fused: bool | None = None, device_io: bool | None = None,
                 choice: GraphChoice | None = None):
        """choice: the graphs to run (Molmo.load picks them and checks memory first); else picked here."""
        ort = require("onnxruntime")
        self.bundle = bundle
        self.cfg = bundle.config
        self.providers = providers or default_providers()
        self._ort = ort
        self.sessions = {}
        self._data: dict[str, list[str]] = {}  # graph role -> its external data file
        if choice is None:
            choice = choose_graphs(bundle.manifest, precision, fused, provider_device(self.providers))
        self.choice = choice
        self.graphs = {"vision": choice.vision, "decoder": choice.decoder}
        self.precision = choice.precision
        for name, key in self.graphs.items():
            path = bundle.graph_path(key)
            try:  # what the load reads only once is paged out while it runs, the rest dropped after it
                with paging_out(load_only_ranges(path)):
                    self.sessions[name] = open_session(path, self.providers, threads, cast_weights_per_run=name in CAST_PER_RUN_ROLES)
            except Exception as e:  # onnxruntime raises its own exception types; keep the first line
                first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
                raise BundleError(f"{os.path.basename(path)} cannot be loaded by onnxruntime ({first}); the file is "
                                  "damaged or from another version: re-export the bundle") from None
            # the original scales of a quantized graph stay mapped and resident, never read again (runtime.memory)
            data = bundle.manifest["graphs"][key].get("data")
            self._data[name] = [bundle.path(data)] if data else []
            drop_mapped_pages(self._data[name])
        self.device = "cuda" if "CUDAExecutionProvider" in self.sessions["decoder"].get_providers() else "cpu"
        entry = bundle.manifest["graphs"][self.graphs["decoder"]]
        self.kv_layout = kv_layout(entry)
        self.kv_dtype = kv_dtype(entry)
        # CUDA/TensorRT provider: KV cache and step I/O in device memory (ort_device.py); device_io=True forces
        # that path on any provider, False keeps the host path
        from molmo_edge.runtime.backends.ort_device import device_decoder
        self.device_io = None if device_io is False else device_decoder(ort, self.sessions["decoder"], self.cfg,
                                                                          self.kv_layout, force=bool(device_io))
        self._takes_token_types = any(i.name == "token_types" for i in self.sessions["decoder"].get_inputs())

    def vision(self, images: np.ndarray, image_masks: np.ndarray) -> np.ndarray:
        """Features of crops [N, 576, 588]; on CPU VISION_CROPS_PER_RUN crops a run: each crop's features depend on
        that crop alone (bit for bit the same as all at once), and the working memory is the run's."""
        images = np.ascontiguousarray(images, np.float32)
        image_masks = np.ascontiguousarray(image_masks, np.float32)
        k = VISION_CROPS_PER_RUN if self.device == "cpu" else max(len(images), 1)
        runs = [self.sessions["vision"].run(["image_features"], {"images": images[i:i + k],
                                                                 "image_masks": image_masks[i:i + k]})[0]
                for i in range(0, max(len(images), 1), k)]
        out = runs[0] if len(runs) == 1 else np.concatenate(runs)
        del runs
        self._vision_done()
        return out

    def vision_pooled(self, pixel_values: np.ndarray, pooling: np.ndarray) -> np.ndarray:
        """Molmo2: crops [N, 729, 588] + pooling index [M, k] (-1 = empty) -> features [M, d]."""
        out = self.sessions["vision"].run(["image_features"], {
            "pixel_values": np.ascontiguousarray(pixel_values, np.float32).reshape(-1, *np.shape(pixel_values)[-2:]),
            "pooling": np.ascontiguousarray(pooling, np.int64).reshape(-1, np.shape(pooling)[-1])})[0]
        self._vision_done()
        return out

    def _vision_done(self) -> None:
        """After a vision pass, what it no longer needs leaves the process: its freed activations (no arena,
        trim_heap) and the fp16 weight pages it read (cast per run: file pages, 0.59 GiB for MolmoE-1B, that stay
        in the page cache, so the next pass faults them back without reading the disk)."""
        trim_heap()
        drop_mapped_pages(self._data["vision"])

    def new_cache(self, max_len: int | None = None) -> KVCache:
        """A cache of max_len tokens; without max_len (a session's) one that grows to the questions' needs, up to
        the model's context, on the host (kv_cache.py: why)."""
        c = self.cfg
        n = min(max_len or c.max_sequence_length, c.max_sequence_length)  # RoPE tables cover max_sequence_length
        if self.device_io is not None:
            return self.device_io.new_cache(n)
        return KVCache(c.n_layers, c.n_kv_heads, c.head_dim, n, self.kv_dtype,
                       layout="bnsh" if self.kv_layout == SHARED else "bsnh", capacity=0 if max_len is None else n)

    def run_decoder(self, embeds: np.ndarray, positions: np.ndarray, cache: KVCache, logit_positions: np.ndarray,
                    token_types: np.ndarray | None = None) -> np.ndarray:
        """token_types [1, T] (Molmo2 decoders only): 1 marks image/frame tokens, which see each other at
        prefill; None = all text (causal)."""
        types = None
        if self._takes_token_types:
            t = embeds.shape[1]
            types = np.ascontiguousarray(np.zeros((1, t), np.int64) if token_types is None else token_types,
                                         np.int64).reshape(1, t)
        if self.device_io is not None:
            return self.device_io.run(embeds, positions, cache, logit_positions, token_types=types)
        t = embeds.shape[1]
        cache.reserve(t)
        sess = self.sessions["decoder"]
        io = sess.io_binding()
        io.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, np.float32))
        if types is not None:
            io.bind_cpu_input("token_types", types)
        io.bind_cpu_input("logit_positions", np.ascontiguousarray(logit_positions, np.int64))
        if self.kv_layout == SHARED:
            # positions are implied by the cache length (RoPE inside GroupQueryAttention)
            total = cache.length + t
            io.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
            io.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
            for i in range(self.cfg.n_layers):
                for kind, buf in (("key", cache.keys[i]), ("value", cache.values[i])):
                    io.bind_input(f"past_{kind}.{i}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
                    io.bind_output(f"present_{kind}.{i}", "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)
            io.bind_output("logits", "cpu")
            sess.run_with_iobinding(io)
            cache.length += t
            return io.get_outputs()[-1].numpy()
        io.bind_cpu_input("position_ids", np.ascontiguousarray(positions, np.int64))
        for i in range(self.cfg.n_layers):
            pk, pv = cache.past(i)
            nk, nv = cache.slot(i, t)
            for name, arr in ((f"past_key.{i}", pk), (f"past_value.{i}", pv)):
                io.bind_input(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
            for name, arr in ((f"new_key.{i}", nk), (f"new_value.{i}", nv)):
                io.bind_output(name, "cpu", 0, np.float32, list(arr.shape), arr.ctypes.data)
        io.bind_output("logits", "cpu")
        sess.run_with_iobinding(io)
        cache.length += t
        return io.get_outputs()[-1].numpy()  # logits (bound last)
