"""The TensorRT engine format shared by `molmo-edge build` and the TensorRT backend, as plain functions
(no TensorRT here); which graph is built how lives in runtime/tensorrt/build.py.

- the optimization profiles: one over crop counts for vision, prefill + decode for the decoder;
- which profile a decode call runs in, and the device buffer sizes at the profile maxima;
- the engine key: bundle hash, precision, profiles, TensorRT version, GPU name and compute
  capability, L4T/JetPack release; engines live in `BUNDLE/engines/<key>/` with `engine.json`;
- whether a stored engine is current, stale (the bundle changed) or foreign (another TensorRT,
  GPU or JetPack): a stale or foreign engine is never loaded; the message says why and how to rebuild.
"""
from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.files import write_json_atomic

TRT_VERSIONS = ("10.3", "10.13")  # the releases JetPack 6 and 7 ship, which check-trt has tables for
ENGINES = "engines"
ENGINE_JSON = "engine.json"
ENGINE_FORMAT = 1
CALIBRATION_CACHE = os.path.join("calibration", "vision.cache")
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1, "int8": 1, "uint8": 1}


class EngineError(MolmoEdgeError):
    """No usable engine: missing, stale (bundle changed), foreign (other TensorRT/GPU/JetPack) or damaged."""


class BuildConfigError(MolmoEdgeError):
    """The requested build cannot be made from this bundle (missing graph, unusable calibration cache...)."""


# ---------------------------------------------------------------------------------------------
# The machine
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TrtEnv:
    """What an engine is tied to (tensorrt-onnxruntime-notes.md §8: plans are not portable)."""
    tensorrt: str                   # full version, "10.3.0.30"
    gpu: str                        # device name, "Orin"
    compute_capability: str         # "8.7"
    l4t: str | None = None          # "36.4.3" on Jetson, None elsewhere
    jetpack: str | None = None      # "6.2"
    cuda: str | None = None         # runtime version "12.6" (informative, not part of the key)

    def describe(self) -> str:
        where = f", L4T {self.l4t} (JetPack {self.jetpack or '?'})" if self.l4t else ", not a Jetson"
        return f"TensorRT {self.tensorrt} on {self.gpu} (sm_{self.compute_capability.replace('.', '')}){where}"

    def tag(self) -> str:
        """A short readable folder-name part: 'orin-sm87-trt10.3.0.30-l4t36.4.3'."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-").replace("nvidia-", "") or "gpu"
        return f"{gpu[:24]}-sm{self.compute_capability.replace('.', '')}-trt{self.tensorrt}-" + \
               (f"l4t{self.l4t}" if self.l4t else "nol4t")


def trt_major_minor(version: str) -> tuple[int, int]:
    try:
        parts = [int(p) for p in str(version).split(".")[:2]]
    except ValueError:
        raise EngineError(f"TensorRT version {version!r} is not like 10.3.0; check the installation "
                          "(molmo-edge doctor)") from None
    return (parts + [0])[0], (parts + [0, 0])[1]


# ---------------------------------------------------------------------------------------------
# Profiles
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ShapeRange:
    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]

    def contains(self, shape: Sequence[int]) -> bool:
        return len(shape) == len(self.max) and all(lo <= s <= hi for lo, s, hi in zip(self.min, shape, self.max))


@dataclass(frozen=True)
class Profile:
    name: str
    shapes: dict[str, ShapeRange]

    def contains(self, shapes: dict[str, Sequence[int]]) -> bool:
        return all(self.shapes[n].contains(s) for n, s in shapes.items() if n in self.shapes)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shapes": {n: {"min": list(r.min), "opt": list(r.opt), "max": list(r.max)}
                                              for n, r in sorted(self.shapes.items())}}


def _check_limits(cfg, max_crops: int, max_seq: int, max_logits: int) -> None:
    if max_crops < 1:
        raise BuildConfigError(f"--max-crops {max_crops} must be at least 1")
    if not 2 <= max_seq <= cfg.max_sequence_length:
        raise BuildConfigError(f"--max-seq {max_seq} must be between 2 and the model's context "
                               f"{cfg.max_sequence_length}")
    if not 1 <= max_logits <= max_seq:
        raise BuildConfigError(f"--max-logits {max_logits} must be between 1 and --max-seq {max_seq}")


def molmo2_image_tokens(cfg, rows: int, cols: int) -> tuple[int, int]:
    """(pooled tokens, prompt tokens) of one Molmo2 image tiled rows x cols (molmo2-spec.md §5-6): the
    low-res view pooled to ceil(P/2)^2, the high-res canvas of rows*(P-2m)+2m patches per side pooled
    likewise; a column token after every row, start and end tokens per block."""
    side = cfg.vision.patches_per_side[0]
    ph, pw = cfg.image_pooling
    m = sum(cfg.preprocess.overlap_margins)
    lo_h, lo_w = -(-side // ph), -(-side // pw)
    hi_h, hi_w = -(-(rows * (side - m) + m) // ph), -(-(cols * (side - m) + m) // pw)
    pooled = lo_h * lo_w + hi_h * hi_w
    return pooled, pooled + lo_h + hi_h + 4


def molmo2_max_image(cfg, max_crops: int) -> tuple[int, int]:
    """(pooled tokens, prompt tokens) of the largest tiling with at most max_crops crops."""
    return max(molmo2_image_tokens(cfg, r, c) for r in range(1, max_crops + 1) for c in range(1, max_crops // r + 1))


def vision_profiles(cfg, max_crops: int) -> list[Profile]:
    """One profile over the crop count: 1 .. max_crops + 1 (the global view comes on top of the crops);
    optimised for the maximum, which is what a camera frame at the default crops produces.
    Molmo2: crops as above and the pooling index [tokens, window], window 4 (2x2 images) .. 9 (3x3 video)."""
    n = max_crops + 1
    v = cfg.vision
    if cfg.is_molmo2:
        tokens = molmo2_max_image(cfg, max_crops)[0]
        return [Profile("crops", {"pixel_values": ShapeRange((1, v.num_patches, v.patch_dim), (n, v.num_patches, v.patch_dim),
                                                             (n, v.num_patches, v.patch_dim)),
                                  "pooling": ShapeRange((1, 4), (tokens, 4), (tokens, 9))})]
    return [Profile("crops", {"images": ShapeRange((1, v.num_patches, v.patch_dim), (n, v.num_patches, v.patch_dim),
                                                   (n, v.num_patches, v.patch_dim)),
                              "image_masks": ShapeRange((1, v.num_patches), (n, v.num_patches), (n, v.num_patches))})]


def typical_prefill(cfg, max_crops: int) -> int:
    """Tokens of the image prefix (BOS + image tokens) of a 640x480 camera frame at `max_crops`."""
    return _typical_prefill(cfg, max_crops)


@functools.lru_cache(maxsize=64)
def _typical_prefill(cfg, max_crops: int) -> int:
    import numpy as np

    from molmo_edge.runtime.preprocess import preprocess_image
    if cfg.is_molmo2:  # sized for the largest tiling (the v1 processor does not tile Molmo2 frames)
        return 1 + molmo2_max_image(cfg, max_crops)[1]
    frame = np.zeros((480, 640, 3), np.uint8)
    return 1 + len(preprocess_image(frame, cfg, max_crops=max_crops).image_tokens)


def max_image_tokens(cfg, max_crops: int) -> int:
    """An upper bound of the image tokens of any image at `max_crops`: the global block plus a grid of at
    most max_crops crops, each at most tok_h rows of tok_w patches + a column token, plus start/end tokens."""
    if cfg.is_molmo2:
        return molmo2_max_image(cfg, max_crops)[1]
    p = cfg.preprocess
    block = p.image_token_length_h * (p.image_token_length_w + 1)
    return (max_crops + 1) * block + 4


DEFAULT_MAX_EXTEND = 512   # text tokens prefilled on top of a cached prefix in one call
DEFAULT_MAX_LOGITS = 64    # logits rows per call (ask needs 1; forward needs one per position)


def decoder_profiles(cfg, max_seq: int, max_crops: int, max_extend: int = DEFAULT_MAX_EXTEND,
                     max_logits: int = DEFAULT_MAX_LOGITS) -> list[Profile]:
    """Three profiles over the decoder's dynamic axes (batch is 1), each sized for what it serves, because
    TensorRT sizes activations for every profile's maxima and cannot express T + P <= max_seq:
    - prefill: the image prefix (or a whole prompt) on an empty cache: T = 1..BOS + image tokens at
      max_crops + max_extend, P = 0;
    - extend: the question on top of a cached prefix: T = 1..max_extend, P = 0..max_seq-1;
    - decode: one token, P = 1..max_seq-1, one logit row.
    One execution context switches between them, so activation memory is the largest profile's, once."""
    _check_limits(cfg, max_crops, max_seq, max_logits)
    d, kv, hd = cfg.d_model, cfg.n_kv_heads, cfg.head_dim
    ext = max(1, min(max_extend, max_seq))
    pre = min(max_seq, 1 + max_image_tokens(cfg, max_crops) + ext)
    typical = min(typical_prefill(cfg, max_crops), pre)

    def shapes(t: tuple[int, int, int], p: tuple[int, int, int], k: tuple[int, int, int]) -> dict[str, ShapeRange]:
        s = {"inputs_embeds": ShapeRange(*((1, x, d) for x in t)), "position_ids": ShapeRange(*((1, x) for x in t)),
             "logit_positions": ShapeRange(*((x,) for x in k))}
        for i in range(cfg.n_layers):
            for kind in ("key", "value"):
                s[f"past_{kind}.{i}"] = ShapeRange(*((1, x, kv, hd) for x in p))
        if cfg.is_molmo2:  # the prefix mask's token types, one per new token
            s["token_types"] = ShapeRange(*((1, x) for x in t))
        return s

    k_pre = min(max_logits, pre)
    return [Profile("prefill", shapes((1, typical, pre), (0, 0, 0), (1, 1, k_pre))),
            Profile("extend", shapes((1, min(32, ext), ext), (0, min(typical, max_seq - 1), max_seq - 1),
                                     (1, 1, min(max_logits, ext)))),
            Profile("decode", shapes((1, 1, 1), (1, min(typical, max_seq - 1), max_seq - 1), (1, 1, 1)))]


def decoder_call_shapes(cfg, t: int, past: int, k: int) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {"inputs_embeds": (1, t, cfg.d_model), "position_ids": (1, t), "logit_positions": (k,)}
    for i in range(cfg.n_layers):
        for kind in ("key", "value"):
            s[f"past_{kind}.{i}"] = (1, past, cfg.n_kv_heads, cfg.head_dim)
    if cfg.is_molmo2:
        s["token_types"] = (1, t)
    return s


def select_profile(profiles: Sequence[Profile], shapes: dict[str, Sequence[int]]) -> int:
    """The profile a call runs in: the most specific one that contains the shapes (fewest elements at its
    maxima), so a one-token step runs in the decode profile, tuned for it. Engines do not keep profile
    names, so only the shapes decide. Raises with the limits when no profile contains the call."""
    def size(p: Profile) -> int:
        total = 0
        for r in p.shapes.values():
            n = 1
            for x in r.max:
                n *= x
            total += n
        return total

    fitting = [i for i, p in enumerate(profiles) if p.contains(shapes)]
    if fitting:
        return min(fitting, key=lambda i: (size(profiles[i]), i))
    limits = "; ".join(f"{p.name}: " + ", ".join(f"{n} {list(r.min)}..{list(r.max)}" for n, r in p.shapes.items()
                                                  if n in ("inputs_embeds", "logit_positions", "past_key.0", "images"))
                       for p in profiles)
    shown = ("inputs_embeds", "logit_positions", "past_key.0", "images")
    got = ", ".join(f"{n} {list(s)}" for n, s in shapes.items() if n in shown)
    raise EngineError(f"shapes {got} are outside the engine's profiles ({limits}); rebuild with larger "
                      "--max-seq/--max-logits/--max-crops (`molmo-edge build BUNDLE ...`) or ask for less")


def profile_max(profiles: Sequence[Profile]) -> dict[str, tuple[int, ...]]:
    """Elementwise maximum shape of every input over all profiles (what buffers are allocated for)."""
    out: dict[str, tuple[int, ...]] = {}
    for p in profiles:
        for n, r in p.shapes.items():
            out[n] = tuple(max(a, b) for a, b in zip(out.get(n, r.max), r.max))
    return out


def nbytes(shape: Sequence[int], dtype: str) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * DTYPE_BYTES[dtype]


def vision_buffers(cfg, profiles: Sequence[Profile]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Device buffers of the vision engine at the profile maxima: name -> (shape, dtype)."""
    mx = profile_max(profiles)
    if cfg.is_molmo2:
        return {"pixel_values": (mx["pixel_values"], "float32"), "pooling": (mx["pooling"], "int64"),
                "image_features": ((mx["pooling"][0], cfg.d_model), "float32")}
    n = mx["images"][0]
    return {"images": (mx["images"], "float32"), "image_masks": (mx["image_masks"], "float32"),
            "image_features": ((n, cfg.tokens_per_crop, cfg.d_model), "float32")}


def decoder_buffers(cfg, profiles: Sequence[Profile]) -> dict[str, tuple[tuple[int, ...], str]]:
    """Device buffers of the decoder engine besides the KV cache (past and new K/V live in the cache):
    name -> (shape, dtype), at the profile maxima."""
    mx = profile_max(profiles)
    k = mx["logit_positions"][0]
    out = {"inputs_embeds": (mx["inputs_embeds"], "float32"), "position_ids": (mx["position_ids"], "int64"),
           "logit_positions": (mx["logit_positions"], "int64"), "logits": ((1, k, cfg.embedding_size), "float32")}
    if cfg.is_molmo2:
        out["token_types"] = (mx["token_types"], "int64")
    return out


def kv_cache_bytes(cfg, max_len: int, dtype: str = "float32") -> int:
    return 2 * cfg.n_layers * nbytes((1, max_len, cfg.n_kv_heads, cfg.head_dim), dtype)


def kv_addresses(base: int, row_bytes: int, length: int, new: int, capacity: int) -> tuple[int, int]:
    """(past address, new-rows address) in a sequence-major cache buffer: the past is the prefix
    [0, length) at `base`, the step writes rows [length, length + new) right after it."""
    if length + new > capacity:
        raise EngineError(f"{length + new} tokens exceed the KV cache of {capacity}")
    return base, base + length * row_bytes


def engine_precision(requested: str) -> str:
    """The runtime's --precision (bundle graph precisions fp32/int8/int4) -> the engine precision to load."""
    if requested in ("fp32", "fp16"):
        return "fp16"
    if requested == "int8":
        return "int8"
    raise EngineError(f"precision {requested!r} has no TensorRT engine: INT4 decoders are onnxruntime MatMulNBits graphs; "
                      "use --precision fp32 (fp16 engines) or int8 with --backend tensorrt")


def trt_version_int(version: str | int) -> int:
    """The integer TensorRT writes in calibration-cache headers (TRT-<int>-<algorithm>):
    '10.3.0' -> 100300, '10.13.3' -> 101303, '8.6.1' -> 8601; an int is returned as is."""
    if isinstance(version, int):
        return version
    parts = str(version).strip().split(".")
    try:
        nums = [int(p) for p in parts[:3]] + [0] * (3 - len(parts[:3]))
    except ValueError:
        raise MolmoEdgeError(f"TensorRT version {version!r} is not like 10.3.0; pass --trt-version MAJOR.MINOR.PATCH") from None
    major, minor, patch = nums
    if not (5 <= major <= 99 and 0 <= minor <= 99 and 0 <= patch <= 99):
        raise MolmoEdgeError(f"TensorRT version {version!r} is out of range; pass --trt-version like 10.3.0")
    return major * (10000 if major >= 10 else 1000) + minor * 100 + patch


def trt_version_str(code: int) -> str:
    """Inverse of trt_version_int: 100300 -> '10.3.0', 8601 -> '8.6.1'."""
    if code >= 100000:
        return f"{code // 10000}.{code // 100 % 100}.{code % 100}"
    return f"{code // 1000}.{code // 100 % 10}.{code % 100}"


def default_workspace_mb(total_memory_bytes: int | None) -> int:
    """Builder workspace: 1 GiB, or 1/16 of the machine's memory when that is smaller (Orin Nano: 512 MB)."""
    if not total_memory_bytes:
        return 1024
    return int(max(256, min(1024, total_memory_bytes / 16 / 2**20)))


# ---------------------------------------------------------------------------------------------
# Keys and stored engines
# ---------------------------------------------------------------------------------------------
def _sha256_file(path: str, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                return h.hexdigest()
            h.update(b)


def graph_hash(folder: str, manifest: dict[str, Any], key: str) -> str:
    """What identifies a bundle graph's content: the checkpoint weights hash, the export time, the graph's
    manifest entry (sizes, I/O, opset) and the bytes of its .onnx (structure, inline constants, Q/DQ scales).
    External weights are covered by the weights hash and their byte count, not re-hashed (GBs on Jetson)."""
    info = manifest["graphs"][key]
    h = hashlib.sha256()
    h.update(json.dumps({"weights": manifest.get("model", {}).get("weights_sha256"), "created": manifest.get("created"),
                         "graph": info}, sort_keys=True).encode())
    h.update(_sha256_file(os.path.join(folder, info["file"])).encode())
    return h.hexdigest()


@dataclass
class EngineKey:
    bundle: dict[str, str]             # role -> graph hash
    graphs: dict[str, str]             # role -> bundle graph key
    precision: str
    int8_mode: str | None
    profiles: dict[str, list[dict[str, Any]]]
    tensorrt: str
    gpu: str
    compute_capability: str
    l4t: str | None
    jetpack: str | None
    builder: dict[str, Any] = field(default_factory=dict)   # flags/typing per role (part of the key)
    plugins: list[str] = field(default_factory=list)        # plugin libraries (none yet)

    def fields(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.fields(), sort_keys=True).encode()).hexdigest()

    def dirname(self) -> str:
        env = TrtEnv(self.tensorrt, self.gpu, self.compute_capability, self.l4t, self.jetpack)
        return f"{env.tag()}-{self.precision}-{self.digest[:10]}"


def engine_key(folder: str, manifest: dict[str, Any], plan: Sequence[Any], profiles: dict[str, list[Profile]],
               env: TrtEnv, precision: str, int8_mode: str | None) -> EngineKey:
    return EngineKey(bundle={b.role: graph_hash(folder, manifest, b.graph) for b in plan},
                     graphs={b.role: b.graph for b in plan}, precision=precision,
                     int8_mode=int8_mode if precision == "int8" else None,
                     profiles={role: [p.to_dict() for p in ps] for role, ps in profiles.items()},
                     tensorrt=env.tensorrt, gpu=env.gpu, compute_capability=env.compute_capability, l4t=env.l4t,
                     jetpack=env.jetpack,
                     builder={b.role: {"strongly_typed": b.strongly_typed, "flags": list(b.flags),
                                       "calibration_cache": b.calibration_cache} for b in plan})


def timing_cache_path(folder: str, env: TrtEnv) -> str:
    """The default persistent timing cache: one per TensorRT version and GPU (it is valid for nothing else)."""
    return os.path.join(folder, ENGINES, f"timing-{env.tag()}.cache")


@dataclass
class EngineRecord:
    path: str                          # the engine folder
    key: dict[str, Any]
    files: dict[str, dict[str, Any]]   # role -> {"file", "bytes", "sha256"}
    built: str = ""
    build_seconds: dict[str, float] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)     # parity, host memory, precision islands

    def plan_path(self, role: str) -> str:
        return os.path.join(self.path, self.files[role]["file"])


def write_record(path: str, key: EngineKey, files: dict[str, dict[str, Any]], build_seconds: dict[str, float],
                 extra: dict[str, Any] | None = None) -> str:
    """engine.json; `extra` adds build facts outside the key (parity report, host memory, precision islands)."""
    rec = {"format": ENGINE_FORMAT, "key": key.fields(), "digest": key.digest, "files": files,
           "built": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "build_seconds": build_seconds,
           **(extra or {})}
    out = os.path.join(path, ENGINE_JSON)
    write_json_atomic(out, rec)
    return out


def read_record(path: str) -> EngineRecord:
    try:
        with open(os.path.join(path, ENGINE_JSON)) as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise EngineError(f"{path} has no readable {ENGINE_JSON} ({type(e).__name__}): it is not a finished engine; "
                          "delete it and run `molmo-edge build BUNDLE`") from None
    if d.get("format") != ENGINE_FORMAT or "key" not in d or "files" not in d:
        raise EngineError(f"{path}/{ENGINE_JSON} is from another molmo-edge version; rebuild with `molmo-edge build BUNDLE`")
    facts = {k: d[k] for k in ("parity", "host_memory", "fp32_layers") if k in d}
    return EngineRecord(path, d["key"], d["files"], d.get("built", ""), d.get("build_seconds", {}), facts)


_FOREIGN = ("tensorrt", "gpu", "compute_capability", "l4t")


def mismatches(stored: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Why a stored engine key is not the wanted one, in words; [] when it matches."""
    out = []
    for f in _FOREIGN:
        if stored.get(f) != want.get(f):
            out.append(f"{f.replace('_', ' ')} {stored.get(f)} (this machine: {want.get(f)})")
    for role, h in (want.get("bundle") or {}).items():
        if (stored.get("bundle") or {}).get(role) != h:
            out.append(f"the bundle's {role} graph changed since the build")
    for f in ("precision", "int8_mode", "graphs", "builder", "profiles", "plugins"):
        if stored.get(f) != want.get(f):
            out.append(f"{f.replace('_', ' ')} differ")
    return out


def classify(stored: dict[str, Any], env: TrtEnv, bundle_hashes: dict[str, str]) -> str:
    """'current' | 'stale' (bundle changed) | 'foreign' (other TensorRT/GPU/JetPack) for a stored key."""
    here = {"tensorrt": env.tensorrt, "gpu": env.gpu, "compute_capability": env.compute_capability, "l4t": env.l4t}
    if any(stored.get(f) != v for f, v in here.items()):
        return "foreign"
    stored_b = stored.get("bundle") or {}
    if any(stored_b.get(role) != h for role, h in bundle_hashes.items() if role in stored_b):
        return "stale"
    return "current"


def verify_files(rec: EngineRecord) -> list[str]:
    """Plan files present with their recorded sizes (a full hash would read GBs at every start)."""
    out = []
    for role, f in rec.files.items():
        p = os.path.join(rec.path, f["file"])
        if not os.path.isfile(p):
            out.append(f"{f['file']} is missing")
        elif os.path.getsize(p) != f["bytes"]:
            out.append(f"{f['file']} is {os.path.getsize(p)} bytes, recorded {f['bytes']}: truncated or replaced")
    return out


def list_engines(folder: str) -> list[str]:
    root = os.path.join(folder, ENGINES)
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if os.path.isdir(os.path.join(root, d))
                  and not d.startswith("."))


def find_engine(folder: str, manifest: dict[str, Any], env: TrtEnv, precision: str, engine: str | None = None) -> EngineRecord:
    """The newest current engine of `precision` for this machine, or one clear error naming each stored
    engine and why it cannot be used. A stale or foreign engine is never returned."""
    candidates = [engine] if engine else list_engines(folder)
    reasons = []
    usable: list[EngineRecord] = []
    hashes_cache: dict[tuple[str, str], str] = {}
    for path in candidates:
        try:
            rec = read_record(path)
        except EngineError as e:
            reasons.append(f"{os.path.basename(path)}: {e}")
            continue
        k = rec.key
        if k.get("precision") != precision:
            if engine:
                reasons.append(f"{os.path.basename(path)}: built for {k.get('precision')}, not {precision}")
            continue
        hashes = {}
        for role, g in (k.get("graphs") or {}).items():
            if g not in manifest["graphs"]:
                hashes[role] = "missing"
                continue
            if (role, g) not in hashes_cache:
                hashes_cache[(role, g)] = graph_hash(folder, manifest, g)
            hashes[role] = hashes_cache[(role, g)]
        verdict = classify(k, env, hashes)
        if verdict == "foreign":
            built = TrtEnv(k.get("tensorrt", "?"), k.get("gpu", "?"), k.get("compute_capability", "?"), k.get("l4t"),
                           k.get("jetpack"))
            reasons.append(f"{os.path.basename(path)}: built for {built.describe()}, this machine has {env.describe()}")
            continue
        if verdict == "stale":
            changed = [r for r, h in hashes.items() if (k.get("bundle") or {}).get(r) != h]
            reasons.append(f"{os.path.basename(path)}: stale, the bundle's {', '.join(changed)} graph changed since it was built")
            continue
        bad = verify_files(rec)
        if bad:
            reasons.append(f"{os.path.basename(path)}: {'; '.join(bad)}")
            continue
        usable.append(rec)
    if usable:
        return max(usable, key=lambda r: (r.built, os.path.getmtime(os.path.join(r.path, ENGINE_JSON)), r.path))
    why = ("; ".join(reasons)) if reasons else f"no engines under {os.path.join(folder, ENGINES)}"
    raise EngineError(f"no usable {precision} TensorRT engine for {env.describe()} ({why}): build one here with "
                      f"`molmo-edge build {folder} --precision {precision}`")
