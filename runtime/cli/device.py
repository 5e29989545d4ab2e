"""TensorRT and Jetson commands: build, check-trt, doctor, plan (picked up by cli.COMMAND_MODULES).

Heavy imports (TensorRT, CUDA bindings) happen inside the command functions only.
"""
from __future__ import annotations

import argparse
import json

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.files import say


def cmd_check_trt(a: argparse.Namespace) -> int:
    from molmo_edge.runtime.tensorrt.check import TRT_VERSIONS, check_bundle
    versions = [a.trt] if a.trt else list(TRT_VERSIONS)
    ok = True
    results = {}
    for v in versions:
        rep = check_bundle(a.bundle, v, a.graph)
        ok &= rep.ok
        if a.json:
            results[v] = {**rep.summary(), "problems": [p.to_dict() for ps in rep.graphs.values() for p in ps]}
            continue
        print(f"TensorRT {rep.tensorrt}:")
        for key, probs in rep.graphs.items():
            errs = [p for p in probs if p.severity == "error"]
            warns = [p for p in probs if p.severity == "warning"]
            print(f"  {key}: {'ok' if not errs else f'{len(errs)} problem(s)'}" + (f", {len(warns)} warning(s)" if warns else ""))
            shown = probs if a.all else _dedupe(probs)
            for p in shown:
                print(f"    {'error' if p.severity == 'error' else 'warning'}: {p.line()}")
            if len(shown) < len(probs):
                print(f"    ... {len(probs) - len(shown)} more of the same kinds (--all lists every node)")
        for key, why in rep.skipped.items():
            print(f"  {key}: skipped, not meant for TensorRT ({why}); --graph {key} checks it anyway")
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print("all graphs meant for TensorRT pass" if ok else "some graphs will not parse on TensorRT (see above)")
    return 0 if ok else 1


def _dedupe(probs: list) -> list:
    """The first problem of each (op, rule, message shape), so a rule broken 1,000 times prints once."""
    seen, out = set(), []
    for p in probs:
        k = (p.op, p.rule, p.severity)
        if k not in seen:
            seen.add(k)
            out.append(p)
    return out


def cmd_build(a: argparse.Namespace) -> int:
    from molmo_edge.runtime.tensorrt.build import build_engines
    out = build_engines(a.bundle, precision=a.precision, int8_mode=a.int8_mode, max_crops=a.max_crops, max_seq=a.max_seq,
                        workspace_mb=a.workspace, timing_cache=a.timing_cache, force=a.force, max_extend=a.max_extend,
                        max_logits=a.max_logits, verify=not a.no_verify, progress=say)
    print(out)
    return 0


def cmd_doctor(a: argparse.Namespace) -> int:
    if a.verify:
        if not a.bundle:
            raise MolmoEdgeError("doctor --verify needs a bundle: molmo-edge doctor BUNDLE --verify")
        from molmo_edge.runtime.device.first_run import first_run
        path, report = first_run(a.bundle, a.out, dry_run=a.dry_run, build=not a.no_build, ort_precision=a.ort_precision)
        print(path)
        return 0 if a.dry_run or all(s.get("rc") in (0, None) for s in report["steps"]) else 1
    from molmo_edge.runtime.device.doctor import diagnose, exit_code, format_findings, gather_facts
    from molmo_edge.runtime.tensorrt.check import check_bundle
    facts = gather_facts(a.source)
    findings = diagnose(facts, a.bundle, check_bundle)
    if a.json:
        print(json.dumps({"facts": facts.to_dict(), "findings": [f.__dict__ for f in findings]}, indent=2))
    else:
        print(format_findings(findings))
    return exit_code(findings)


def cmd_plan(a: argparse.Namespace) -> int:
    from molmo_edge.runtime.device.targets import get_device
    from molmo_edge.runtime.backends.trt_engines import default_workspace_mb
    from molmo_edge.runtime.device.plan import PlanSettings, format_plan, make_plan
    if a.device == "cpu":
        return _plan_here(a)
    cfg = _config_for(a.bundle)
    manifest = _manifest_for(a.bundle)
    dev = get_device(a.device)
    s = PlanSettings(precision=a.precision, max_crops=a.max_crops or cfg.preprocess.max_crops,
                     max_seq=a.max_seq or cfg.max_sequence_length,
                     workspace_mb=a.workspace or default_workspace_mb(int(dev.memory_gb * 2**30)), super_mode=a.super)
    graph_bytes, measured = _build_facts(a.bundle, s.precision)
    p = make_plan(cfg, dev, s, graph_bytes, measured, manifest)
    print(json.dumps(p.to_dict(), indent=2) if a.json else format_plan(p))
    return 0 if p.fits else 1


def _build_facts(path: str, precision: str) -> tuple[dict[str, int] | None, dict | None]:
    """A bundle's ONNX weight bytes per role (what the build's parser holds) and the host memory measured by
    its newest engine build of this precision, when there is one."""
    from molmo_edge.runtime.bundle import is_bundle, load_bundle
    if not is_bundle(path):
        return None, None
    from molmo_edge.runtime.backends.trt_engines import EngineError, list_engines, read_record
    bundle = load_bundle(path)
    graphs = bundle.manifest["graphs"]
    vision = "vision.int8" if precision != "fp16" and "vision.int8" in graphs else "vision"
    sizes = {role: int(graphs[g].get("data_bytes") or 0) + int(graphs[g].get("file_bytes") or 0)
             for role, g in (("vision", vision), ("decoder", "decoder")) if g in graphs}
    measured = None
    for eng in reversed(list_engines(path)):
        try:
            rec = read_record(eng)
        except EngineError:
            continue
        if rec.key.get("precision") == ("fp16" if precision == "fp16" else "int8") and rec.facts.get("host_memory"):
            measured = rec.facts["host_memory"]
            break
    return sizes or None, measured


def _manifest_for(path: str):
    from molmo_edge.runtime.bundle import is_bundle, load_bundle
    return load_bundle(path).manifest if is_bundle(path) else None


def _plan_here(a: argparse.Namespace) -> int:
    """`plan BUNDLE --device cpu`: what loading it with onnxruntime on this machine needs (the runtime's own
    estimate, the one its memory guard uses) against MemAvailable."""
    from molmo_edge.runtime.bundle import choose_graphs, load_bundle
    from molmo_edge.runtime.machine import mem_available
    from molmo_edge.runtime.memory import GiB, estimate_load
    b = load_bundle(a.bundle)
    # plan's own default (fp16, a TensorRT engine precision) means "what ask would run": auto
    precision = {"fp16": "auto"}.get(a.precision, a.precision)
    c = choose_graphs(b.manifest, precision)
    est = estimate_load(b.manifest, b.config, {"vision": c.vision, "decoder": c.decoder})
    avail = mem_available()
    d = {"device": "cpu (this machine, onnxruntime)", "graphs": {"vision": c.vision, "decoder": c.decoder},
         "estimate": est.to_dict(), "available_gib": round(avail / GiB, 2), "fits": est.fits(avail)}
    if a.json:
        print(json.dumps(d, indent=2))
    else:
        lines = [f"this machine (onnxruntime CPU): vision {c.vision}, decoder {c.decoder}"]
        lines += [f"  {k:<40} {v:8.2f} GiB" for k, v in d["estimate"]["graphs_gib"].items()]
        lines += [f"  {k + ' (working memory)':<40} {v:8.2f} GiB" for k, v in d["estimate"]["activations_gib"].items()]
        e = d["estimate"]
        lines += [f"  {'python + onnxruntime':<40} {e['runtime_gib']:8.2f} GiB",
                  f"  {'file pages while loading':<40} {e['mapped_file_gib']:8.2f} GiB",
                  f"  {'expected peak RSS':<40} {e['total_gib']:8.2f} GiB (file pages are reclaimable: "
                  f"{est.working / GiB:.2f} GiB must fit)",
                  ("FITS" if d["fits"] else "DOES NOT FIT") + f": {d['available_gib']:.2f} GiB available"]
        print("\n".join(lines + [f"note: {n}" for n in d["estimate"]["notes"]]))
    return 0 if d["fits"] else 1


def _config_for(path: str):
    from molmo_edge.runtime.bundle import is_bundle, load_bundle
    if is_bundle(path):
        return load_bundle(path).config
    from molmo_edge.runtime.config import load_config
    try:
        return load_config(path)
    except MolmoEdgeError:
        raise MolmoEdgeError(f"{path} is neither a bundle nor a checkpoint folder with config.json; "
                             "pass a bundle made by `molmo-edge export`") from None


def add_commands(sub) -> None:
    s = sub.add_parser("build", help="build TensorRT engines for this machine from a bundle (on the Jetson itself)",
                       description="Parse the bundle's ONNX graphs (with external weights) and build TensorRT engines: "
                                   "one optimization profile over crop counts for vision; prefill, extend and decode "
                                   "profiles for the decoder. INT8 from the calibrated Q/DQ vision graph (strongly typed) "
                                   "or from the calibration cache (implicit, TensorRT 10.x); fp16 keeps norms, softmax, the MoE router "
                                   "and RoPE in fp32. Each new engine must match onnxruntime on a sample frame and a "
                                   "prefill + 3 decode steps (fp16: max relative error 2e-2, cosine 0.999) or it is not "
                                   "registered. Engines go to "
                                   "BUNDLE/engines/<gpu>-<sm>-<trt>-<l4t>-<precision>-<hash>/ with engine.json; the "
                                   "timing cache persists next to them. An up-to-date engine is not rebuilt.")
    s.add_argument("bundle", metavar="BUNDLE")
    s.add_argument("--precision", choices=["fp16", "int8"], default="fp16")
    s.add_argument("--int8-mode", choices=["qdq", "cache"], default="qdq",
                   help="qdq: the calibrated Q/DQ vision graph, strongly typed (default); cache: the fp32 graph with "
                        "calibration/vision.cache (implicit INT8, deprecated by TensorRT)")
    s.add_argument("--max-crops", type=int, default=None, help="most crops per image the engine accepts (default: the bundle's)")
    s.add_argument("--max-seq", type=int, default=None, help="longest context (default: the model's; less = less KV memory)")
    s.add_argument("--max-extend", type=int, default=512, help="most prompt tokens prefilled on a cached image prefix")
    s.add_argument("--max-logits", type=int, default=64, help="most logit rows per call (ask needs 1; forward one per token)")
    s.add_argument("--workspace", type=int, default=None, metavar="MB", help="builder workspace (default: min(1024, RAM/16))")
    s.add_argument("--timing-cache", default=None, metavar="PATH",
                   help="persistent timing cache (default BUNDLE/engines/timing-<gpu>-<trt>.cache)")
    s.add_argument("--force", action="store_true", help="rebuild even when an up-to-date engine exists")
    s.add_argument("--no-verify", action="store_true",
                   help="register the engines without the parity check against onnxruntime (for models whose "
                        "onnxruntime reference does not fit in memory next to the build; recorded in engine.json)")
    s.set_defaults(fn=cmd_build)

    s = sub.add_parser("check-trt", help="check a bundle's graphs against TensorRT's ONNX parser (runs anywhere)",
                       description="Every node, data type and attribute of the bundle's graphs against the ONNX operator "
                                   "table of a TensorRT release (onnx-tensorrt operators.md), plus opset, IR-version and "
                                   "external-data rules. Exit status 1 when a graph meant for TensorRT will not parse.")
    s.add_argument("bundle", metavar="BUNDLE", help="bundle folder or a single .onnx file")
    s.add_argument("--trt", choices=["10.3", "10.13"], default=None, help="TensorRT release (default: both)")
    s.add_argument("--graph", action="append", metavar="KEY", help="check only this bundle graph (repeatable); "
                                                                   "also checks graphs not meant for TensorRT")
    s.add_argument("--all", action="store_true", help="list every offending node, not one per kind")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_check_trt)

    s = sub.add_parser("doctor", help="what this machine has (GPU, CUDA, TensorRT, JetPack, cameras), and can a bundle run here",
                       description="Probe the machine (GPU, CUDA, TensorRT, JetPack/L4T, power mode, onnxruntime providers, "
                                   "cameras) and, given a bundle, check its graphs for this TensorRT, its engines for this "
                                   "machine, and its memory fit; each problem comes with a fix. Exit status 1 on a failure.")
    s.add_argument("bundle", metavar="BUNDLE", nargs="?")
    s.add_argument("--source", action="append", metavar="URI",
                   help="a camera source to check for (repeatable; csi:// needs OpenCV with GStreamer); the services' "
                        "MOLMO_EDGE_SOURCE/--source in the environment and /etc/default/molmo-edge* are read too")
    s.add_argument("--json", action="store_true")
    s.add_argument("--verify", action="store_true",
                   help="first run on a device (jetson/first-run.sh): doctor, plan, build with the parity check, bench on "
                        "onnxruntime and TensorRT, all into one JSON file to send back (about 15 minutes at most)")
    s.add_argument("--out", metavar="FILE", help="--verify report path (default first-run-<host>-<time>.json)")
    s.add_argument("--dry-run", action="store_true", help="--verify: list the steps and their limits, run nothing")
    s.add_argument("--no-build", action="store_true", help="--verify: skip the TensorRT build and its bench")
    s.add_argument("--ort-precision", choices=["fp32", "int8", "int4"], default="fp32",
                   help="--verify: graphs the onnxruntime bench runs (int4 when only that fits, see `plan`)")
    s.set_defaults(fn=cmd_doctor)

    from molmo_edge.runtime.device.targets import DEVICES
    s = sub.add_parser("plan", help="will a bundle fit a Jetson, and its latency floors",
                       description="Memory fit (weights per precision, KV cache at max sequence, activations at max crops, "
                                   "workspace, OS reserve) and bandwidth/compute latency floors for vision, prefill and "
                                   "decode on a Jetson module; says which knob makes it fit. Exit status 1 when it does not fit.")
    s.add_argument("bundle", metavar="BUNDLE", help="bundle folder (or checkpoint folder with config.json)")
    s.add_argument("--device", required=True, choices=list(DEVICES) + ["cpu"],
                   help="a Jetson, or cpu: this machine on onnxruntime (the runtime's load estimate)")
    s.add_argument("--precision", choices=["fp16", "int8", "int4"], default="fp16",
                   help="fp16: vision+decoder fp16; int8: INT8 vision + INT8 decoder weights; int4: INT8 vision + INT4 decoder")
    s.add_argument("--max-crops", type=int, default=None)
    s.add_argument("--max-seq", type=int, default=None)
    s.add_argument("--workspace", type=int, default=None, metavar="MB")
    s.add_argument("--super", action="store_true", help="JetPack 6.2 MAXN SUPER mode (Orin Nano/NX)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_plan)
