"""`molmo-edge build`: which graphs are built how, calibration caches, and the TensorRT 10.3/10.13 builder calls.

The engine format (profiles, keys, records, lookup) is shared with the runtime and lives in
runtime/backends/trt_engines.py; this module only makes engines. `tensorrt` and the CUDA
bindings are imported when a build starts, never at import time.
"""
from __future__ import annotations

import gc
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass
from typing import Any, Callable

from molmo_edge.runtime.backends.cuda import open_cuda
from molmo_edge.runtime.backends.trt import current_env, import_tensorrt
from molmo_edge.runtime.backends.trt_engines import (BuildConfigError, CALIBRATION_CACHE, DEFAULT_MAX_EXTEND, DEFAULT_MAX_LOGITS, ENGINES,
                                                     EngineError, EngineRecord, Profile, default_workspace_mb, decoder_profiles,
                                                     engine_key, mismatches, read_record, timing_cache_path,
                                                     trt_major_minor, trt_version_int, verify_files, vision_profiles,
                                                     write_record)
from molmo_edge.runtime.bundle import Bundle, load_bundle
from molmo_edge.runtime.files import say, timed, write_bytes_atomic, write_json_atomic
from molmo_edge.runtime.tensorrt.host_memory import HostMemory
from molmo_edge.runtime.tensorrt.parity import refusal


PRECISIONS = ("fp16", "int8")


INT8_MODES = ("qdq", "cache")
OBEY = "OBEY_PRECISION_CONSTRAINTS"   # the BuilderFlag that makes per-layer precision binding, not a hint


# ---------------------------------------------------------------------------------------------
# What gets built
# ---------------------------------------------------------------------------------------------
@dataclass
class GraphBuild:
    role: str                          # "vision" | "decoder"
    graph: str                         # bundle graph key
    strongly_typed: bool
    flags: tuple[str, ...]             # BuilderFlag names
    calibration_cache: str | None = None
    note: str = ""


def build_plan(manifest: dict[str, Any], precision: str, int8_mode: str = "qdq", trt_version: str = "10.3") -> list[GraphBuild]:
    """Which graphs are built how. fp16: the portable graphs, weakly typed with the FP16 flag. int8/qdq:
    the calibrated Q/DQ vision graph, strongly typed (precision from the graph); int8/cache: the fp32
    vision graph with the calibration cache (implicit INT8, INT8+FP16 flags; TensorRT 10.x only). The
    decoder stays FP16 under int8: it has no activation Q/DQ, and W8A8 gains little at one token."""
    if precision not in PRECISIONS:
        raise BuildConfigError(f"--precision {precision} is not one of {', '.join(PRECISIONS)}")
    if int8_mode not in INT8_MODES:
        raise BuildConfigError(f"--int8-mode {int8_mode} is not one of {', '.join(INT8_MODES)}")
    major, minor = trt_major_minor(trt_version)
    if major != 10:
        raise BuildConfigError(f"TensorRT {trt_version} is not supported: builds target TensorRT 10.x (JetPack 6: 10.3, "
                               "JetPack 7: 10.13); TensorRT 11 removed the FP16/INT8 builder flags these builds use")
    graphs = manifest["graphs"]
    weak_note = "weak typing (FP16/INT8 flags) is deprecated since TensorRT 10.12 and still honoured" if minor >= 12 else ""
    # fp16 builds keep norms, softmax, the router and RoPE in fp32 (runtime/tensorrt/precision.py), obeyed
    fp16 = ("FP16", OBEY)
    decoder = GraphBuild("decoder", "decoder", False, fp16, note=weak_note)
    if precision == "fp16":
        return [GraphBuild("vision", "vision", False, fp16, note=weak_note), decoder]
    if int8_mode == "qdq":
        if "vision.int8" not in graphs:
            raise BuildConfigError("this bundle has no Q/DQ vision graph (vision.int8): run `molmo-edge calibrate BUNDLE "
                                   "--source FRAMES` first, or use --int8-mode cache")
        return [GraphBuild("vision", "vision.int8", True, (), note="strongly typed: layers outside Q/DQ run in the "
                           "graph's own precision"), decoder]
    return [GraphBuild("vision", "vision", False, ("INT8",) + fp16, calibration_cache_for(manifest, trt_version),
                       note="implicit INT8 from the calibration cache (deprecated since TensorRT 10.1, removed in 11)"),
            decoder]


def calibration_cache_for(manifest: dict[str, Any], trt_version: str) -> str:
    """The bundle's calibration cache made for this TensorRT (`molmo-edge calibrate --trt-version X.Y.Z` records
    one per version in manifest["calibration"]["caches"]); calibration/vision.cache when none matches, whose
    header check then says which version it was made for."""
    want = ".".join((str(trt_version).split(".") + ["0", "0"])[:3])
    for c in (manifest.get("calibration") or {}).get("caches", []):
        if c.get("trt_version") == want and c.get("file"):
            return c["file"]
    return CALIBRATION_CACHE


def read_cache_header(path: str) -> tuple[int, str, list[str]]:
    """(TensorRT version int, algorithm, tensor names) of a TensorRT calibration cache."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            lines = f.read().splitlines()
    except OSError:
        raise BuildConfigError(f"no calibration cache at {path}: run `molmo-edge calibrate BUNDLE --source FRAMES` first, "
                               "or use --int8-mode qdq") from None
    m = re.match(r"^TRT-(\d+)-([A-Za-z0-9]+)$", lines[0].strip()) if lines else None
    if not m:
        raise BuildConfigError(f"{path} does not start with a TRT-<version>-<algorithm> line: not a TensorRT calibration "
                               "cache; re-run `molmo-edge calibrate`")
    names = []
    for no, line in enumerate(lines[1:], start=2):
        lm = re.match(r"^(.+): [0-9a-fA-F]{8}$", line)
        if not lm:
            raise BuildConfigError(f"{path} line {no} is not `tensor: 8 hex digits`; the cache is damaged, re-run calibrate")
        names.append(lm.group(1))
    return int(m.group(1)), m.group(2), names


def check_calibration_cache(path: str, trt_version: str, graph_values: set[str]) -> list[str]:
    """Refuse a cache made for another TensorRT or for another graph; returns its tensor names."""
    version, algo, names = read_cache_header(path)
    want = trt_version_int(trt_version)
    if version != want:
        raise BuildConfigError(f"{path} was made for TensorRT {version} (header TRT-{version}-{algo}) but this is "
                               f"TensorRT {trt_version} ({want}): TensorRT would ignore it; re-run `molmo-edge calibrate "
                               f"BUNDLE --trt-version {'.'.join(str(trt_version).split('.')[:3])}`")
    if not names:
        raise BuildConfigError(f"{path} has no tensor scales; re-run `molmo-edge calibrate`")
    unknown = [n for n in names if n not in graph_values]
    if len(unknown) == len(names):
        raise BuildConfigError(f"none of the {len(names)} tensors in {path} exists in the vision graph (e.g. "
                               f"{unknown[0]!r}): the cache is from another export; re-run `molmo-edge calibrate`")
    return names


# ---------------------------------------------------------------------------------------------
# Builder
# ---------------------------------------------------------------------------------------------

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
               timing: bytes, clock: Callable[[str], None], mem: HostMemory) -> tuple[bytes, bytes, dict[str, int]]:
    """(serialized engine, updated timing cache, fp32 layers per reason) for one graph. The parser reads the
    external weights itself (parse_from_file: no second copy in Python) and everything it holds is dropped
    before returning, so the parity check and the next graph start from the plan bytes alone."""
    from molmo_edge.runtime.onnx_reader import read_onnx
    from molmo_edge.runtime.tensorrt.precision import constrain_network, fp32_islands
    path = bundle.graph_path(job.graph)
    builder = trt.Builder(logger)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if job.strongly_typed else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    clock(f"{job.role}: parsing {os.path.basename(path)} (+ external weights) ...")
    with mem.stage(f"{job.role}: parse"):
        parsed = parser.parse_from_file(path)
    if not parsed:
        errs = []
        for i in range(parser.num_errors):
            e = parser.get_error(i)
            node = e.node_name() if hasattr(e, "node_name") else e.node()
            errs.append(f"node {node}: {e.desc()}")
        raise BuildConfigError(f"TensorRT {trt.__version__} could not parse {os.path.basename(path)}: "
                               f"{'; '.join(errs[:3]) or 'no details'}; run `molmo-edge check-trt {bundle.folder}`")
    fp32: dict[str, int] = {}
    if OBEY in job.flags:
        fp32 = constrain_network(trt, network, fp32_islands(read_onnx(path).graph))
        clock(f"{job.role}: {sum(fp32.values())} layers kept in fp32 ("
              + ", ".join(f"{k} {v}" for k, v in sorted(fp32.items())) + ")")
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
        clock("the timing cache is from another GPU or TensorRT version: starting a fresh one")
        tc = config.create_timing_cache(b"")
        config.set_timing_cache(tc, False)
    what = "strongly typed" if job.strongly_typed else "+".join(job.flags)
    clock(f"{job.role}: building the engine ({what}, {len(profiles)} profile(s), workspace {workspace_mb} MB) ...")
    with mem.stage(f"{job.role}: build"):
        plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineError(f"TensorRT could not build the {job.role} engine (see the TensorRT log above): try a larger "
                          "--workspace, smaller --max-crops/--max-seq, or check `molmo-edge doctor`")
    out = bytes(memoryview(plan)), bytes(memoryview(config.get_timing_cache().serialize())), fp32
    del plan, tc, trt_profiles, config, parser, network, builder   # the parsed weights go with the parser
    gc.collect()
    return out


def build_engines(folder: str, precision: str = "fp16", int8_mode: str = "qdq", max_crops: int | None = None,
                  max_seq: int | None = None, workspace_mb: int | None = None, timing_cache: str | None = None,
                  force: bool = False, max_extend: int = DEFAULT_MAX_EXTEND, max_logits: int = DEFAULT_MAX_LOGITS,
                  verify: bool = True, progress: Callable[[str], None] = say, _trt: Any = None, _cuda: Any = None) -> str:
    """Build (or confirm) the engines of a bundle for this machine; returns the engine folder. With `verify`
    (the default) the new engines must match onnxruntime on sample inputs (runtime/tensorrt/parity.py) or
    they are not registered; the report goes to BUNDLE/engines/parity-<engine>.json either way."""
    from molmo_edge.runtime.tensorrt.check import TRT_VERSIONS, check_graph, load_table, normalize_trt_version, read_onnx
    clock = timed(progress, "build")
    bundle = load_bundle(folder)
    cfg = bundle.config
    trt = _trt or import_tensorrt()
    cuda = _cuda or open_cuda()
    env = current_env(trt, cuda)
    clock(f"{env.describe()}")
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
                clock(f"up to date: {out}")
                return out
        except EngineError:
            pass
        clock(f"{out} is incomplete or stale: rebuilding")
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
        clock(f"no ONNX operator table for TensorRT {env.tensorrt}: skipping check-trt, the parser will tell")
    for job in jobs:
        if job.calibration_cache:
            g = read_onnx(bundle.graph_path(job.graph)).graph
            values = {v.name for v in g.inputs} | {o for n in g.nodes for o in n.outputs}
            check_calibration_cache(bundle.path(job.calibration_cache), env.tensorrt, values)
        if job.note:
            clock(f"{job.role}: {job.note}")
    tc_path = timing_cache or timing_cache_path(folder, env)
    timing = b""
    if os.path.isfile(tc_path):
        with open(tc_path, "rb") as f:
            timing = f.read()
        clock(f"timing cache {tc_path} ({len(timing)} bytes)")
    if workspace_mb is None:
        workspace_mb = default_workspace_mb(cuda.device()[2])
    tmp = f"{out}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    logger = trt.Logger(trt.Logger.WARNING)
    trt.init_libnvinfer_plugins(logger, "")
    files, seconds, fp32 = {}, {}, {}
    mem = HostMemory()
    report_path = os.path.join(folder, ENGINES, f"parity-{key.dirname()}.json")
    try:
        for job in jobs:
            t0 = time.perf_counter()
            plan, timing, fp32[job.role] = _build_one(trt, logger, bundle, job, profiles[job.role], workspace_mb, timing,
                                                      clock, mem)
            write_bytes_atomic(tc_path, timing)   # keep the tuned tactics even if a later build fails
            name = f"{job.role}.plan"
            write_bytes_atomic(os.path.join(tmp, name), plan)
            files[job.role] = {"file": name, "bytes": len(plan), "sha256": hashlib.sha256(plan).hexdigest(),
                               "graph": job.graph}
            seconds[job.role] = round(time.perf_counter() - t0, 1)
            clock(f"{job.role}: {len(plan) / 2**20:.1f} MiB engine in {seconds[job.role]} s")
            del plan
        if verify:
            report = _verify(bundle, key, tmp, files, precision, crops, trt, cuda, clock, mem)
            report["report_path"] = report_path
            write_json_atomic(report_path, report)
            err = refusal(report)
            if err is not None:
                raise err
            parity = {role: {k: report[role][k] for k in ("ok", "graph", "tolerance", "worst")} for role in ("vision", "decoder")}
        else:
            clock("parity check skipped (--no-verify): these engines are NOT verified against onnxruntime")
            parity = {"skipped": True}
        clock(f"peak host memory {mem.peak_mib():.0f} MiB (" + ", ".join(
            f"{k} {v['peak_rss_mib']:.0f}" for k, v in mem.stages.items()) + ")")
        write_record(tmp, key, files, seconds, {"parity": parity, "host_memory": mem.summary(), "fp32_layers": fp32})
        if os.path.isdir(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    clock(f"done: {out}")
    return out


def _verify(bundle: Bundle, key: Any, tmp: str, files: dict[str, dict[str, Any]], precision: str, crops: int, trt: Any,
            cuda: Any, clock: Callable[[str], None], mem: HostMemory) -> dict[str, Any]:
    """The parity check of engines not registered yet (they still sit in the partial folder)."""
    from molmo_edge.runtime.backends.trt import TrtBackend
    from molmo_edge.runtime.tensorrt.parity import verify_engines
    rec = EngineRecord(tmp, key.fields(), files)
    run_as = "int8" if precision == "int8" else "fp32"
    precisions = {"vision": "int8" if precision == "int8" else "fp16", "decoder": "fp16"}
    with mem.stage("parity"):
        return verify_engines(bundle, dict(key.graphs), precisions, crops,
                              lambda: TrtBackend(bundle, precision=run_as, record=rec, _trt=trt, _cuda=cuda), clock)
