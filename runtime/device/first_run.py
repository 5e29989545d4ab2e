"""`molmo-edge doctor BUNDLE --verify` (jetson/first-run.sh): the first run on a real device, in one go.

Steps, each a `molmo-edge` command in its own process with its own time limit, so a crash or an
out-of-memory kill in one (a TensorRT build on an 8 GB module) is recorded and the rest still runs:

  1. doctor --json          what the machine has; the install checks
  2. plan --json            memory fit and floors for the matched Jetson module (skipped off Jetson)
  3. build --precision fp16 the engines, with the parity check against onnxruntime (refused engines are
                            reported with the first output that differs)
  4. bench onnxruntime      vision / prefill / decode, 3 runs, 16 decode tokens
  5. bench tensorrt         the same on the engines (only when step 3 registered them)

Everything lands in one JSON file, rewritten after every step (a killed run still leaves what it had),
for the owner to send back. Default limits add up to 15 minutes (STEP_LIMITS), what an Orin Nano gets.
"""
from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

from molmo_edge.runtime.files import write_json_atomic

FORMAT = "molmo-edge-first-run"
FORMAT_VERSION = 1
# seconds per step; 900 in all
STEP_LIMITS = {"doctor": 60, "plan": 30, "build": 480, "bench onnxruntime": 165, "bench tensorrt": 165}
BENCH_ARGS = ["--runs", "3", "--decode-tokens", "16", "--reduced-crops", "0", "--json"]


@dataclass
class StepResult:
    rc: int | None           # None: not run (dry run) or timed out
    stdout: str
    stderr: str
    seconds: float
    timed_out: bool = False


Runner = Callable[[list[str], int], StepResult]


def subprocess_runner(argv: list[str], timeout: int) -> StepResult:
    """`python -m molmo_edge.runtime.cli ARGV` with a time limit (the default on a device)."""
    t0 = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", "molmo_edge.runtime.cli", *argv], capture_output=True, text=True,
                           timeout=timeout)
        return StepResult(p.returncode, p.stdout, p.stderr, round(time.perf_counter() - t0, 1))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        return StepResult(None, out, err, round(time.perf_counter() - t0, 1), timed_out=True)


def _last_json(text: str) -> Any:
    """The JSON document a command printed: the whole stdout, or its last line that parses."""
    try:
        return json.loads(text)
    except ValueError:
        pass
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return None


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def steps_for(bundle: str, device: str | None, build: bool = True, ort_precision: str = "fp32") -> list[tuple[str, list[str]]]:
    """The commands, in order. `ort_precision`: the graphs the onnxruntime bench runs (int4 is what fits an
    8 GB module for MolmoE; `plan` says which)."""
    out: list[tuple[str, list[str]]] = [("doctor", ["doctor", bundle, "--json"])]
    if device:
        out.append(("plan", ["plan", bundle, "--device", device, "--json"]))
    if build:
        out.append(("build", ["build", bundle, "--precision", "fp16"]))
    out.append(("bench onnxruntime", ["bench", bundle, "--backend", "onnxruntime", "--precision", ort_precision, *BENCH_ARGS]))
    if build:
        out.append(("bench tensorrt", ["bench", bundle, "--backend", "tensorrt", *BENCH_ARGS]))
    return out


def _engine_facts(engine: str) -> dict[str, Any]:
    from molmo_edge.runtime.backends.trt_engines import EngineError, read_record
    try:
        rec = read_record(engine)
    except EngineError as e:
        return {"path": engine, "error": str(e)}
    return {"path": engine, "key": {k: rec.key.get(k) for k in ("tensorrt", "gpu", "compute_capability", "l4t", "jetpack",
                                                              "precision", "builder")},
            "build_seconds": rec.build_seconds, "bytes": {r: f["bytes"] for r, f in rec.files.items()}, **rec.facts}


def _parity_reports(bundle: str, since: float) -> list[dict[str, Any]]:
    out = []
    for path in sorted(glob.glob(os.path.join(bundle, "engines", "parity-*.json"))):
        if os.path.getmtime(path) >= since:
            try:
                with open(path) as f:
                    out.append({"file": os.path.basename(path), **json.load(f)})
            except (OSError, ValueError):
                pass
    return out


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    """The figures the README's claims wait for, side by side per backend."""
    s: dict[str, Any] = {}
    for backend, res in (report.get("bench") or {}).items():
        st = (res or {}).get("stages") or {}
        if not st:
            continue
        s[backend] = {"graphs": res.get("graphs"), "precision": res.get("precision"), "device": res.get("device"),
                      "vision_ms_per_frame": st.get("vision_ms_per_frame", {}).get("median"), "crops": st.get("crops"),
                      "prefill_ms": st.get("prefill_ms", {}).get("median"), "prefill_tokens": st.get("prefill_tokens"),
                      "decode_tokens_per_s": st.get("decode_tokens_per_s", {}).get("median"),
                      "end_to_end_ms": st.get("end_to_end_ms", {}).get("median"), "peak_rss_mib": res.get("peak_rss_mib")}
    build = report.get("build") or {}
    parity = build.get("parity") or {}
    if parity.get("skipped"):
        s["parity"] = "skipped"
    elif parity:
        s["parity"] = "ok" if all(parity.get(r, {}).get("ok") for r in ("vision", "decoder")) else "failed"
    elif report.get("parity_reports"):
        last = report["parity_reports"][-1]
        s["parity"] = "refused: " + next((f"{r} {last[r]['first_failure']['output']}" for r in ("vision", "decoder")
                                          if last.get(r) and not last[r]["ok"]), "see parity_reports")
    else:
        s["parity"] = "not run"
    return s


def first_run(bundle: str, out: str | None = None, dry_run: bool = False, build: bool = True, ort_precision: str = "fp32",
              runner: Runner = subprocess_runner, limits: dict[str, int] | None = None,
              progress: Callable[[str], None] = lambda m: print(m, file=sys.stderr, flush=True)) -> tuple[str, dict[str, Any]]:
    """Run the steps and write the report; returns (report path, report)."""
    from molmo_edge.runtime import machine
    from molmo_edge.runtime.device.targets import match_device
    limits = {**STEP_LIMITS, **(limits or {})}
    started = time.time()
    info = machine.read_info()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    device = match_device(info.model, mem)
    host = platform.node() or "device"
    out = out or f"first-run-{host}-{_dt.datetime.now(_dt.timezone.utc).strftime('%Y%m%dT%H%M%SZ')}.json"
    report: dict[str, Any] = {"format": FORMAT, "format_version": FORMAT_VERSION, "dry_run": dry_run,
                              "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                              "bundle": os.path.abspath(bundle), "jetson_module": device, "l4t": info.l4t,
                              "jetpack": info.jetpack, "model": info.model, "power_mode": info.power_mode,
                              "limits_s": limits, "steps": [], "bench": {}}
    plan = steps_for(bundle, device, build, ort_precision)
    for name, argv in plan:
        if dry_run:
            report["steps"].append({"name": name, "argv": ["molmo-edge", *argv], "limit_s": limits[name], "rc": None})
            progress(f"[first-run] would run: molmo-edge {' '.join(argv)}   (limit {limits[name]} s)")
            continue
        if name == "bench tensorrt" and not (report.get("build") or {}).get("path"):
            report["steps"].append({"name": name, "skipped": "no engine was registered by the build step"})
            write_json_atomic(out, report)
            continue
        progress(f"[first-run] {name}: molmo-edge {' '.join(argv)} (limit {limits[name]} s) ...")
        res = runner(argv, limits[name])
        step = {"name": name, "argv": ["molmo-edge", *argv], "rc": res.rc, "seconds": res.seconds,
                "timed_out": res.timed_out}
        if res.rc != 0:
            step["stderr_tail"] = _tail(res.stderr)
        report["steps"].append(step)
        doc = _last_json(res.stdout)
        if name == "doctor" and isinstance(doc, dict):
            report["machine"], report["findings"] = doc.get("facts"), doc.get("findings")
        elif name == "plan" and isinstance(doc, dict):
            report["plan"] = doc
        elif name == "build":
            engine = res.stdout.strip().splitlines()[-1] if res.rc == 0 and res.stdout.strip() else None
            report["build"] = _engine_facts(engine) if engine else {"error": _tail(res.stderr, 5) or "no output",
                                                                     "timed_out": res.timed_out}
            report["parity_reports"] = _parity_reports(bundle, started)
        elif name.startswith("bench") and isinstance(doc, dict):
            report["bench"][name.split()[1]] = doc
        report["summary"] = summarize(report)
        write_json_atomic(out, report)
        progress(f"[first-run] {name}: {'ok' if res.rc == 0 else 'FAILED' if not res.timed_out else 'TIMED OUT'} "
                 f"in {res.seconds} s")
    report["summary"] = summarize(report)
    report["seconds"] = round(time.time() - started, 1)
    write_json_atomic(out, report)
    progress(f"[first-run] report: {os.path.abspath(out)} — please send this file back (see jetson/README.md)")
    return out, report


def in_process_runner(main: Callable[[list[str]], int]) -> Runner:
    """A runner calling the CLI's main() in this process (for tests with stand-ins; a device uses processes)."""
    import contextlib
    import io

    def run(argv: list[str], timeout: int) -> StepResult:
        out, err = io.StringIO(), io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(argv)
            except SystemExit as e:
                rc = int(e.code or 0)
        return StepResult(rc, out.getvalue(), err.getvalue(), round(time.perf_counter() - t0, 2))
    return run
