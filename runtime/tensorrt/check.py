"""`molmo-edge check-trt`: will TensorRT's ONNX parser take this bundle's graphs?

Every node, value type and attribute of a graph is checked against the ONNX operator table of a
TensorRT release (onnx-tensorrt docs/operators.md, kept as data in runtime/tensorrt/ops/trt_ops_<ver>.json
with its provenance), plus the opset, IR-version and external-data rules. Runs anywhere: the ONNX
protobuf is read by runtime/onnx_reader.py (no onnx, no TensorRT, no GPU needed), and external
weights are never loaded, only their references checked.

Each problem names the graph, the node (its name, or `#index` when unnamed), the operator, the
rule and a fix. Problems of severity "error" make the parser fail or the engine wrong; "warning"s
parse but behave differently from onnxruntime (DOUBLE cast down, ...).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Any, Sequence

from molmo_edge.runtime.backends.trt_engines import TRT_VERSIONS
from molmo_edge.runtime.onnx_reader import ONNX_TYPES, Graph, Model, Node, OnnxReadError, Tensor, read_onnx  # noqa: F401

TrtCheckError = OnnxReadError  # what check-trt raises: a graph it cannot read or check (unknown TensorRT version...)

OPS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops")
PROTOBUF_LIMIT = 2 ** 31 - 1  # a .onnx file (graph + inline tensors) must stay below 2 GiB


# ---------------------------------------------------------------------------------------------
# The operator tables
# ---------------------------------------------------------------------------------------------
@dataclass
class OpTable:
    tensorrt: str
    opset_min: int
    opset_max: int
    ir_version_max: int
    types: set[str]
    ops: dict[str, dict[str, Any]]
    rules: dict[str, list[dict[str, Any]]]
    source: str


def normalize_trt_version(version: str) -> str:
    """'10.3.0.30' / '10.3' -> '10.3'; raises for releases without a table."""
    parts = str(version).strip().split(".")
    short = ".".join(parts[:2])
    if short not in TRT_VERSIONS:
        raise TrtCheckError(f"no ONNX operator table for TensorRT {version}; check-trt knows {', '.join(TRT_VERSIONS)} "
                            "(JetPack 6.x ships 10.3, JetPack 7.0/7.1 ship 10.13): pass --trt 10.3 or --trt 10.13")
    return short


def load_table(version: str = "10.3") -> OpTable:
    v = normalize_trt_version(version)
    path = os.path.join(OPS, f"trt_ops_{v}.json")
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise TrtCheckError(f"{path} is missing or damaged ({e}); reinstall molmo-edge") from None
    return OpTable(d["tensorrt"], d["opset_min"], d["opset_max"], d["ir_version_max"], set(d["onnx_types_supported"]),
                   d["ops"], d["rules"], d["source"])


# ---------------------------------------------------------------------------------------------
# Type inference (enough for the ops of our graphs and the common standard ops)
# ---------------------------------------------------------------------------------------------
_BOOL_OUT = {"Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf"}
_INT64_OUT = {"Shape", "Size", "NonZero", "ArgMax", "ArgMin"}


def _node_output_types(node: Node, types: dict[str, str | None]) -> list[str | None]:
    ins = [types.get(i) if i else None for i in node.inputs]
    first = next((t for t in ins if t), None)
    op = node.op_type
    n = len(node.outputs)
    if op == "Cast":
        return [ONNX_TYPES.get(node.attr("to", 0))] * n
    if op == "CastLike":
        return [ins[1] if len(ins) > 1 else None] * n
    if op in _BOOL_OUT:
        return ["BOOL"] * n
    if op in _INT64_OUT:
        return ["INT64"] * n
    if op == "TopK":
        return [ins[0] if ins else None, "INT64"][:n]
    if op == "MaxPool":
        return [ins[0] if ins else None, "INT64"][:n]
    if op == "Constant":
        for key, dt in (("value", None), ("value_float", "FP32"), ("value_floats", "FP32"), ("value_int", "INT64"),
                        ("value_ints", "INT64")):
            if key in node.attrs:
                return [node.attrs[key].value.dtype if dt is None else dt]
        return [None]
    if op == "ConstantOfShape":
        t = node.attr("value")
        return [t.dtype if isinstance(t, Tensor) else "FP32"]
    if op == "Where":
        return [ins[1] if len(ins) > 1 else None] * n
    if op == "QuantizeLinear":
        zp = ins[2] if len(ins) > 2 else None
        return [zp or ONNX_TYPES.get(node.attr("output_dtype", 0)) or "UINT8"] * n
    if op == "DequantizeLinear":
        return [ins[1] if len(ins) > 1 else "FP32"] * n
    if op in ("RandomNormal", "RandomUniform", "EyeLike", "RandomNormalLike", "RandomUniformLike"):
        dt = node.attr("dtype")
        return [ONNX_TYPES.get(dt) if dt is not None else (first or "FP32")] * n
    if op in ("If", "Loop", "Scan"):
        return [None] * n
    return [first] * n


def infer_types(graph: Graph, outer: dict[str, str | None] | None = None) -> dict[str, str | None]:
    types: dict[str, str | None] = dict(outer or {})
    types.update({v.name: v.dtype for v in graph.inputs})
    types.update({t.name: t.dtype for t in graph.initializers.values()})
    types.update({v.name: v.dtype for v in graph.value_info if v.dtype})
    for node in graph.nodes:
        for name, t in zip(node.outputs, _node_output_types(node, types)):
            if name and types.get(name) is None:
                types[name] = t
    return types


def constant_values(graph: Graph, foldable: bool) -> set[str]:
    """Names whose values are known at build time: initializers and Constant outputs (strict), plus, when
    `foldable`, outputs of deterministic nodes whose inputs are all known (what TensorRT folds)."""
    known = set(graph.initializers)
    for node in graph.nodes:
        if node.op_type == "Constant":
            known.update(node.outputs)
        elif foldable and node.inputs and node.op_type not in ("RandomNormal", "RandomUniform", "RandomNormalLike",
                                                                "RandomUniformLike", "Multinomial", "Bernoulli") \
                and all((not i) or i in known for i in node.inputs):
            known.update(node.outputs)
    return known


# ---------------------------------------------------------------------------------------------
# The checks
# ---------------------------------------------------------------------------------------------
@dataclass
class Problem:
    graph: str          # bundle graph key ("decoder") or file name
    node: str           # node name, "#<index>" when unnamed, or "" for graph-level problems
    op: str
    rule: str           # opset | ir_version | unsupported_op | custom_op | dtype | attribute | const_input | outputs |
                        # zero_point | external_data | file_size
    message: str
    fix: str = ""
    severity: str = "error"

    def line(self) -> str:
        where = f"node {self.node} ({self.op})" if self.node else (self.op or "graph")
        fix = f"; fix: {self.fix}" if self.fix else ""
        return f"{self.graph}: {where}: {self.message}{fix}"

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _typed_inputs(op: str, n_inputs: int) -> list[int]:
    """Which inputs carry the type the table's 'Supported Types' column refers to."""
    if op in ("Where",):
        return [1, 2][: max(0, n_inputs - 1)]
    if op in ("Concat", "Sum", "Max", "Min", "Mean", "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual",
              "And", "Or", "Xor", "Add", "Sub", "Mul", "Div"):
        return list(range(n_inputs))
    if op in ("Constant", "ConstantOfShape", "RandomNormal", "RandomUniform", "BlackmanWindow", "HammingWindow",
              "HannWindow"):
        return []  # typed by their output (checked below)
    return [0] if n_inputs else []


_FIX_OP = {
    "ScatterND": "express the scatter-add without `reduction` (e.g. a dense masked matmul over experts, or a "
                 "Concat/Gather of per-expert rows), or run this graph on onnxruntime / an IPluginV3 plugin",
    "NonZero": "avoid data-dependent shapes on TensorRT (dense routing with a mask), or use a plugin",
    "Attention": "export at opset <= 20 so attention is MatMul/Softmax/MatMul (TensorRT < 10.14 has no Attention op)",
    "RotaryEmbedding": "export RoPE as Mul/Add/Concat primitives (no RotaryEmbedding before TensorRT 10.15)",
    "RMSNormalization": "export RMSNorm as ReduceMean/Sqrt/Mul primitives (no RMSNormalization before TensorRT 10.15)",
}


def _check_node(node: Node, idx: int, graph_key: str, table: OpTable, types: dict[str, str | None],
                consts_strict: set[str], consts_fold: set[str], inits: dict[str, Tensor], out: list[Problem]) -> None:
    nid = node.name or f"#{idx}"
    op = node.op_type

    def add(rule: str, msg: str, fix: str = "", severity: str = "error") -> None:
        out.append(Problem(graph_key, nid, op, rule, msg, fix, severity))

    if node.domain not in ("", "ai.onnx"):
        add("custom_op", f"operator from domain {node.domain!r} is not a standard ONNX op: TensorRT {table.tensorrt} "
            f"parses it only as a plugin named {op!r}, and none is registered",
            "export this graph with standard ONNX ops only (the onnxruntime-only flavours such as decoder.fused are "
            "not meant for TensorRT)")
        return
    row = table.ops.get(op)
    if row is None or not row["supported"]:
        why = row["restrictions"] if row and row.get("restrictions") else "not in the operator table"
        add("unsupported_op", f"{op} is not supported by TensorRT {table.tensorrt}'s ONNX parser ({why})",
            _FIX_OP.get(op, "rewrite it with supported ops or provide an IPluginV3 plugin"))
        return
    # data types
    allowed = set(row.get("types") or [])
    if allowed:
        checked: list[tuple[str, str | None]] = [(node.inputs[i], types.get(node.inputs[i]))
                                                 for i in _typed_inputs(op, len(node.inputs))
                                                 if i < len(node.inputs) and node.inputs[i]]
        if op in ("Cast", "CastLike", "Constant", "ConstantOfShape"):
            checked += [(o, types.get(o)) for o in node.outputs[:1]]
        for name, t in checked:
            if t is not None and t not in allowed:
                add("dtype", f"{name} is {t}, but TensorRT {table.tensorrt} supports {op} only for "
                    f"{', '.join(sorted(allowed))}",
                    f"cast {name} to one of {', '.join(sorted(allowed))} before the {op}")
    # structured restrictions
    for rule in table.rules.get(op, []):
        kind = rule["kind"]
        if kind == "attr_absent" and rule["attr"] in node.attrs:
            val = node.attr(rule["attr"])
            shown = val if isinstance(val, (int, float, str)) else type(val).__name__
            add("attribute", f"attribute {rule['attr']}={shown!r} is not supported by TensorRT {table.tensorrt} "
                f"({row.get('restrictions') or 'parser rejects it'})", _FIX_OP.get(op, f"remove the {rule['attr']} attribute"))
        elif kind == "attr_in":
            val = node.attr(rule["attr"], rule.get("default"))
            if isinstance(val, bytes):
                val = val.decode()
            if val not in rule["values"]:
                add("attribute", f"attribute {rule['attr']}={val!r} is not supported by TensorRT {table.tensorrt} "
                    f"(allowed: {', '.join(map(repr, rule['values']))})",
                    _FIX_OP.get(op, f"set {rule['attr']} to one of {', '.join(map(repr, rule['values']))}"))
        elif kind == "attr_all_ones":
            val = node.attr(rule["attr"])
            if val and any(v != 1 for v in val):
                add("attribute", f"attribute {rule['attr']}={list(val)} must be empty or all ones for TensorRT "
                    f"{table.tensorrt}", f"remove the {rule['attr']} or rewrite the op")
        elif kind in ("const_input", "const_input_below"):
            i = rule["index"]
            if i < len(node.inputs) and node.inputs[i]:
                name = node.inputs[i]
                known = consts_strict if rule.get("strict", True) or kind == "const_input_below" else consts_fold
                if kind == "const_input" and name not in known:
                    what = "an initializer" if rule.get("strict", True) else "a build-time constant"
                    add("const_input", f"input {i} ({name}) must be {what} for TensorRT {table.tensorrt}",
                        f"make {name} {what} (fold it, e.g. `polygraphy surgeon sanitize --fold-constants`)")
                elif kind == "const_input_below" and name in inits:
                    vals = inits[name].values() or []
                    if any(v >= rule["limit"] for v in vals):
                        add("const_input", f"input {i} ({name}) = {vals} must be below {rule['limit']} for TensorRT "
                            f"{table.tensorrt}", f"use K < {rule['limit']}")
        elif kind == "max_outputs":
            used = [o for o in node.outputs[rule["count"]:] if o]
            if used:
                add("outputs", f"outputs {', '.join(used)} are not supported (TensorRT {table.tensorrt} produces only "
                    f"the first {rule['count']})", "drop the extra outputs from the node")
        elif kind == "zero_point_zero":
            i = rule["index"]
            if i < len(node.inputs) and node.inputs[i]:
                zp = inits.get(node.inputs[i])
                vals = zp.values() if zp is not None else None
                if zp is None:
                    add("zero_point", f"zero point {node.inputs[i]} must be a constant 0 (symmetric quantization)",
                        "quantize symmetrically with an initializer zero point of 0")
                elif vals and any(v != 0 for v in vals):
                    add("zero_point", f"zero point {node.inputs[i]} has non-zero values: TensorRT quantization is "
                        "symmetric", "re-quantize with symmetric activations and weights (zero point 0)")


def check_graph(model: Model, table: OpTable, graph_key: str = "") -> list[Problem]:
    """Every TensorRT parser rule this model breaks; an empty list means it should parse."""
    key = graph_key or os.path.basename(model.path) or model.graph.name
    out: list[Problem] = []
    # opset and IR version
    for dom, ver in model.opsets.items():
        if dom in ("", "ai.onnx"):
            if not table.opset_min <= ver <= table.opset_max:
                out.append(Problem(key, "", "", "opset", f"default-domain opset {ver} is outside TensorRT "
                                   f"{table.tensorrt}'s {table.opset_min}..{table.opset_max}",
                                   f"re-export with --opset {min(max(ver, 17), table.opset_max)}"))
        elif dom == "ai.onnx.ml":
            out.append(Problem(key, "", "", "opset", "the ai.onnx.ml domain is imported: TensorRT parses none of its ops",
                               "export without ai.onnx.ml ops"))
    if model.ir_version > table.ir_version_max:
        out.append(Problem(key, "", "", "ir_version", f"IR version {model.ir_version} is newer than TensorRT "
                           f"{table.tensorrt}'s parser reads (<= {table.ir_version_max})",
                           f"set model.ir_version = {table.ir_version_max} when saving"))
    if model.file_bytes >= PROTOBUF_LIMIT:
        out.append(Problem(key, "", "", "file_size", f"{os.path.basename(model.path)} is {model.file_bytes} bytes: "
                           "protobuf cannot hold 2 GiB", "store the weights as external data"))
    # graph I/O types
    for v in model.graph.inputs + model.graph.outputs:
        if v.dtype and v.dtype not in table.types:
            out.append(Problem(key, "", v.name, "dtype", f"graph input/output {v.name} is {v.dtype}, which TensorRT "
                               f"{table.tensorrt} has no type for", "cast it to FP32/FP16/INT32/INT64/BOOL"))
        elif v.dtype == "DOUBLE":
            out.append(Problem(key, "", v.name, "dtype", f"{v.name} is DOUBLE: TensorRT casts it down to FLOAT",
                               "export it as float32", "warning"))
    _check_nodes(model.graph, key, table, None, out)
    if model.path:
        out += check_external_data(model, key)
    return out


def _check_nodes(graph: Graph, key: str, table: OpTable, outer: dict[str, str | None] | None,
                 out: list[Problem], outer_inits: dict[str, Tensor] | None = None) -> None:
    types = infer_types(graph, outer)
    inits = {**(outer_inits or {}), **graph.initializers}
    strict = constant_values(graph, foldable=False) | set(outer_inits or {})
    fold = constant_values(graph, foldable=True) | set(outer_inits or {})
    for t in graph.initializers.values():
        if t.dtype and t.dtype not in table.types:
            out.append(Problem(key, "", t.name, "dtype", f"initializer {t.name} is {t.dtype}, which TensorRT "
                               f"{table.tensorrt} has no type for", "store it as FP32/FP16/INT32/INT64"))
        elif t.dtype == "DOUBLE":
            out.append(Problem(key, "", t.name, "dtype", f"initializer {t.name} is DOUBLE: TensorRT casts it down to "
                               "FLOAT", "store it as float32", "warning"))
    for i, node in enumerate(graph.nodes):
        _check_node(node, i, key, table, types, strict, fold, inits, out)
        for a in node.attrs.values():  # If/Loop/Scan bodies
            subs = [a.value] if a.kind == 5 else (a.value if a.kind == 10 else [])
            for sub in subs:
                if isinstance(sub, Graph):
                    _check_nodes(sub, key, table, types, out, inits)


def check_external_data(model: Model, key: str) -> list[Problem]:
    """External-data references must be relative, inside the model's folder, and within their files."""
    folder = os.path.dirname(os.path.abspath(model.path))
    out: list[Problem] = []
    sizes: dict[str, int | None] = {}
    for t in model.graph.initializers.values():
        if t.external is None:
            continue
        loc = t.external.get("location", "")

        def bad(msg: str, fix: str, name: str = t.name) -> None:
            out.append(Problem(key, "", name, "external_data", msg, fix))

        if not loc:
            bad(f"initializer {t.name} is external but names no location", "re-export the bundle")
            continue
        if os.path.isabs(loc) or os.path.normpath(loc).startswith(".."):
            bad(f"initializer {t.name} points outside the model folder ({loc}); TensorRT's parse_from_file resolves "
                "locations relative to the .onnx file", "save external data next to the .onnx with a relative location")
            continue
        path = os.path.join(folder, loc)
        if loc not in sizes:
            sizes[loc] = os.path.getsize(path) if os.path.isfile(path) else None
        size = sizes[loc]
        if size is None:
            bad(f"initializer {t.name}: external file {loc} is missing", "copy the whole bundle folder")
            continue
        try:
            offset = int(t.external.get("offset", "0") or 0)
            length = int(t.external["length"]) if t.external.get("length") else None
        except ValueError:
            bad(f"initializer {t.name} has a non-numeric offset/length", "re-export the bundle")
            continue
        want = t.nbytes
        if length is not None and want is not None and length != want:
            bad(f"initializer {t.name}: length {length} does not match its shape {t.dims} ({want} bytes)",
                "re-export the bundle")
        end = offset + (length if length is not None else (want or 0))
        if offset < 0 or end > size:
            bad(f"initializer {t.name}: bytes {offset}..{end} lie outside {loc} ({size} bytes): the file is truncated",
                "copy the bundle again or re-export it")
    return out


# ---------------------------------------------------------------------------------------------
# Bundles
# ---------------------------------------------------------------------------------------------
ORT_DOMAINS = ("com.microsoft", "com.microsoft.nchwc", "com.microsoft.experimental")


def meant_for_tensorrt(info: dict[str, Any], model: Model) -> tuple[bool, str]:
    """Whether a bundle graph is meant to be built by TensorRT, and why not: the manifest's `targets`
    when the graph has them, else every graph that does not import an onnxruntime contrib-op domain
    (decoder.fused: GroupQueryAttention/MoE; decoder.int4: MatMulNBits)."""
    targets = info.get("targets")
    if targets is not None:
        return ("tensorrt" in targets, f"manifest targets {', '.join(targets)}")
    ort = [d for d in model.opsets if d in ORT_DOMAINS]
    if ort:
        return False, f"imports the onnxruntime contrib domain {ort[0]} (an onnxruntime-only flavour)"
    return True, ""


@dataclass
class BundleReport:
    tensorrt: str
    graphs: dict[str, list[Problem]]          # key -> problems (graphs meant for TensorRT)
    skipped: dict[str, str]                   # graphs not meant for TensorRT -> why
    source: str

    @property
    def errors(self) -> list[Problem]:
        return [p for ps in self.graphs.values() for p in ps if p.severity == "error"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary(self) -> dict[str, Any]:
        return {"tensorrt": self.tensorrt, "ok": self.ok,
                "graphs": {k: {"ok": not any(p.severity == "error" for p in ps),
                               "errors": sum(p.severity == "error" for p in ps),
                               "warnings": sum(p.severity == "warning" for p in ps)} for k, ps in self.graphs.items()},
                "skipped": self.skipped}


def check_bundle(folder: str, trt: str = "10.3", graphs: Sequence[str] | None = None) -> BundleReport:
    """Check a bundle's graphs (or an .onnx file) against one TensorRT release's ONNX parser."""
    table = load_table(trt)
    if os.path.isfile(folder) and folder.endswith(".onnx"):
        model = read_onnx(folder)
        return BundleReport(table.tensorrt, {os.path.basename(folder): check_graph(model, table)}, {}, table.source)
    from molmo_edge.runtime.bundle import load_bundle
    bundle = load_bundle(folder)
    all_graphs = bundle.manifest["graphs"]
    if graphs:
        unknown = [g for g in graphs if g not in all_graphs]
        if unknown:
            raise TrtCheckError(f"bundle has no graph {', '.join(unknown)}; it has {', '.join(all_graphs)}")
    keys = list(graphs or all_graphs)
    report = BundleReport(table.tensorrt, {}, {}, table.source)
    for key in keys:
        model = read_onnx(bundle.graph_path(key))
        meant, why = meant_for_tensorrt(all_graphs[key], model)
        if not graphs and not meant:
            report.skipped[key] = why
            continue
        report.graphs[key] = check_graph(model, table, key)
    return report


def check_for_export(folder: str, versions: Sequence[str] = TRT_VERSIONS) -> dict[str, Any]:
    """What `export` records in the manifest for TensorRT targets: per release, ok and the first problems."""
    out: dict[str, Any] = {}
    for v in versions:
        rep = check_bundle(folder, v)
        out[v] = {**rep.summary(), "problems": [p.line() for p in rep.errors[:20]]}
    return out
