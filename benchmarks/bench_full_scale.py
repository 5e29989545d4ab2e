"""The user's path at the released size, on this machine: random weights in the real shapes and file formats.

    python benchmarks/bench_full_scale.py --family molmoe-1b|molmo-7b-d|molmo2-4b --workdir /work/big [--layers N] [--keep]

MolmoE-1B is written as one fp32 `pytorch_model.bin` (torch's zip format, one tensor at a time),
Molmo-7B-D as fp32 safetensors shards with an index, Molmo2-4B in the hub layout as bf16 safetensors
shards with an index (the dtype of the hub layout the golden tiny checkpoints reproduce). Then, each in a fresh process with the defaults a
user would use: `export` (fp16 weights; for 7B-D `--weights int4`, which writes no float decoder, so the
run fits the disk), `quantize --weights int4` (MolmoE), `ask` (load, a first and a second question
about one 640x480 frame), one `serve` request, `bench`, `plan`, and `ask --precision fp32` to show
the memory guard's answer. For every step: wall time, peak anonymous and total RSS (sampled every
50 ms from /proc), and the disk used in the work folder. Everything made is deleted at the end
unless --keep. Molmo2-4B also asks about a 16-frame clip (`ask --video clip.npz`, frames at 2 fps), and its
`plan` runs for every Jetson in the table; it has no `serve` step by default (run with --with-serve).

Free disk needed (work folder): MolmoE-1B about 50 GiB (29 GB checkpoint + 14.6 GiB fp16 bundle +
4.2 GiB INT4 decoder + one check layer); Molmo-7B-D about 44 GiB (32 GB checkpoint + 5.6 GiB bundle + the Orin-size bundle);
Molmo2-4B about 28 GiB (9.7 GB bf16 checkpoint + 9.6 GiB fp16 bundle + 3.7 GiB INT4 decoder + the
self-check's short bundle). Peak memory of any step stays under ~8 GiB (Molmo2-4B: see RESULTS.md).
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

GiB = 2 ** 30
NEEDS_GIB = {"molmoe-1b": 50, "molmo-7b-d": 44, "molmo2-4b": 28}
VOCAB = {"molmoe-1b": 50280, "molmo-7b-d": 152064, "molmo2-4b": None}  # Molmo2: config.json's (151936)
CHECKPOINT = {"molmoe-1b": ("bin", "float32"), "molmo-7b-d": ("safetensors", "float32"),
              "molmo2-4b": ("safetensors", "bfloat16")}
JETSONS = ("orin-nano-8gb", "orin-nx-16gb", "agx-orin-64gb", "thor")


def write_clip(path: str, frame, frames: int = 16, fps: float = 2.0) -> None:
    """A clip for `ask --video`: the frame panning right a few pixels per frame (uint8 [T, H, W, 3] RGB + fps)."""
    import numpy as np
    np.savez(path, frames=np.stack([np.roll(frame, 8 * t, axis=1) for t in range(frames)]), fps=np.float32(fps))


def _status(pid: int) -> dict[str, int]:
    try:
        with open(f"/proc/{pid}/status") as f:
            return {k: int(v.split()[0]) * 1024 for k, v in (line.split(":", 1) for line in f)
                    if k in ("RssAnon", "VmRSS", "VmHWM")}
    except (OSError, ValueError):
        return {}


def du(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


def run_step(name: str, cmd: list[str], workdir: str, log, stdin_wait=None) -> dict:
    """Run `cmd`, sampling its memory; returns wall time, peaks, exit code, stdout and the stderr tail."""
    print(f"[full-scale] {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_rss = 0
    import threading
    out: dict[str, str] = {}
    readers = [threading.Thread(target=lambda k, s: out.__setitem__(k, s.read()), args=(k, s))
               for k, s in (("stdout", p.stdout), ("stderr", p.stderr))]
    for r in readers:
        r.start()
    while p.poll() is None:
        st = _status(p.pid)
        peak_anon = max(peak_anon, st.get("RssAnon", 0))
        peak_rss = max(peak_rss, st.get("VmHWM", 0), st.get("VmRSS", 0))
        time.sleep(0.05)
    for r in readers:
        r.join()
    rec = {"step": name, "cmd": cmd, "rc": p.returncode, "seconds": round(time.perf_counter() - t, 1),
           "peak_anon_gib": round(peak_anon / GiB, 3), "peak_rss_gib": round(peak_rss / GiB, 3),
           "disk_gib": round(du(workdir) / GiB, 2), "stdout": out.get("stdout", "")[-20000:],
           "stderr_tail": out.get("stderr", "")[-6000:]}
    log.write(json.dumps(rec) + "\n")
    log.flush()
    print(f"[full-scale] {name}: rc {p.returncode}, {rec['seconds']} s, peak anon {rec['peak_anon_gib']} GiB, "
          f"peak RSS {rec['peak_rss_gib']} GiB, disk {rec['disk_gib']} GiB", file=sys.stderr, flush=True)
    return rec


# bytes one decode step reads (dense weights, top-k of the experts, the head, the KV cache) in the layout onnxruntime
# holds them, and this machine's read bandwidth (a step only reads); the copy figure (read + write) for older tables
ROOFLINE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from bench_cpu import decode_step_bytes, read_bandwidth, stream_bandwidth
from molmo_edge.runtime.bundle import load_bundle, choose_graphs
from molmo_edge.runtime.kv_cache import kv_dtype
b = load_bundle(sys.argv[1]); c = choose_graphs(b.manifest, 'auto')
past = int(sys.argv[3])
n = decode_step_bytes(b.graph_path(c.decoder), b.config, past, kv_dtype(b.manifest['graphs'][c.decoder]).itemsize)
read, copy = read_bandwidth(), stream_bandwidth()
print(json.dumps({'decoder': c.decoder, 'decode_step_bytes': n['total'], 'kv_bytes_at_past': n['kv'], 'past': past,
                  'read_bandwidth_gbs': round(read / 1e9, 1), 'copy_bandwidth_gbs': round(copy / 1e9, 1),
                  'roofline_tokens_per_s': round(read / n['total'], 1), 'copy_roofline_tokens_per_s': round(copy / n['total'], 1)}))
"""
# the KV a bench decode step reads: a 640x480 frame's 763 prompt tokens + half of bench's 32 decoded
ROOFLINE_PAST = 780


def roofline_cmd(py: list[str], bundle: str) -> list[str]:
    return py + [ROOFLINE, bundle, os.path.dirname(os.path.abspath(__file__)), str(ROOFLINE_PAST)]



# where a question's memory goes: RssAnon/RssFile after load, after vision, after the prefill, after decoding
MEMORY_PROFILE = """
import json, sys
from molmo_edge.runtime.session import Molmo
def st():
    d = {l.split(':')[0]: int(l.split()[1]) / 2**20 for l in open('/proc/self/status') if l.startswith(('RssAnon', 'RssFile', 'VmHWM'))}
    return {k: round(v, 3) for k, v in d.items()}
out = {'start': st()}
m = Molmo.load(sys.argv[1]); out['loaded'] = st(); out['estimate'] = m.estimate.to_dict()
key, entry, _, _ = m.image_entry(sys.argv[2]); out['after_vision'] = st()
a = m.ask('Point to the cups.', sys.argv[2], max_new_tokens=1); out['after_prefill'] = st()
a = m.ask('Point to the cups.', sys.argv[2], max_new_tokens=16); out['after_decode'] = st()
print(json.dumps(out))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_once(bundle: str, image: str, workdir: str, log) -> dict:
    """Start `serve`, wait for /healthz, time one /v1/query with the frame, stop it; memory sampled throughout."""
    port = _free_port()
    cmd = [sys.executable, "-m", "molmo_edge.runtime.cli", "serve", bundle, "--port", str(port), "--timeout", "600"]
    print(f"[full-scale] serve: {' '.join(cmd)}", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak_anon = peak_rss = 0
    ready = None
    rec: dict = {"step": "serve"}
    try:
        while time.perf_counter() - t0 < 900 and p.poll() is None:
            st = _status(p.pid)
            peak_anon, peak_rss = max(peak_anon, st.get("RssAnon", 0)), max(peak_rss, st.get("VmHWM", 0))
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1).read()
                ready = time.perf_counter() - t0
                break
            except OSError:
                time.sleep(0.5)
        if ready is None:
            raise RuntimeError(f"serve did not come up (rc {p.poll()})")
        body = json.dumps({"prompt": "Point to the cups.", "image": base64.b64encode(open(image, "rb").read()).decode(),
                           "max_new_tokens": 32}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/query", data=body, headers={"Content-Type": "application/json"})
        t1 = time.perf_counter()
        import threading
        box: dict = {}
        th = threading.Thread(target=lambda: box.__setitem__("r", urllib.request.urlopen(req, timeout=900).read()))
        th.start()
        while th.is_alive():
            st = _status(p.pid)
            peak_anon, peak_rss = max(peak_anon, st.get("RssAnon", 0)), max(peak_rss, st.get("VmHWM", 0))
            time.sleep(0.05)
        th.join()
        answer = json.loads(box["r"])
        rec.update({"rc": 0, "ready_seconds": round(ready, 1), "request_seconds": round(time.perf_counter() - t1, 2),
                    "answer_timings": answer["answers"][0]["timings"]})
    except Exception as e:  # noqa: BLE001 - recorded, the run goes on
        rec.update({"rc": 1, "error": f"{type(e).__name__}: {e}"})
    finally:
        p.terminate()
        try:
            err = p.communicate(timeout=30)[1]
        except subprocess.TimeoutExpired:
            p.kill()
            err = p.communicate()[1]
    rec.update({"peak_anon_gib": round(peak_anon / GiB, 3), "peak_rss_gib": round(peak_rss / GiB, 3),
                "seconds": round(time.perf_counter() - t0, 1), "stderr_tail": (err or "")[-3000:]})
    log.write(json.dumps(rec) + "\n")
    log.flush()
    print(f"[full-scale] serve: {rec.get('request_seconds')} s per request, peak RSS {rec['peak_rss_gib']} GiB",
          file=sys.stderr, flush=True)
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", choices=list(NEEDS_GIB), default="molmoe-1b")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--layers", type=int, default=None, help="fewer decoder layers (a dry run of the script)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and bundle")
    ap.add_argument("--out", default=None, help="JSON lines of every step (default benchmarks/results/full_scale_FAMILY.jsonl)")
    ap.add_argument("--skip", action="append", default=[], help="step to skip (checkpoint: with a kept bundle, export, quantize, ask, ask_video, serve, "
                    "bench, plan, plan_devices, guard, plan_cpu, memory_profile, first_answer_2crops, roofline, orin, export_int4)")
    ap.add_argument("--tiny", action="store_true", help="the family's tiny test widths (a seconds-long check of this script)")
    ap.add_argument("--with-serve", action="store_true", help="Molmo2: run the serve step too")
    a = ap.parse_args()
    molmo2 = a.family.startswith("molmo2")
    if molmo2 and not a.with_serve:
        a.skip.append("serve")
    if molmo2:  # its script steps through the Molmo (v1) single-image cache
        a.skip.append("memory_profile")
    work = os.path.join(a.workdir, f"full-{a.family}")
    os.makedirs(work, exist_ok=True)
    free = shutil.disk_usage(work).free / GiB
    need = NEEDS_GIB[a.family] * (0 if a.tiny else 1 if a.layers is None else 0.25) - du(work) / GiB  # a kept checkpoint counts
    if free < need:
        print(f"[full-scale] {work}: {free:.0f} GiB free, this run needs about {need:.0f} GiB", file=sys.stderr)
        return 2
    out = a.out or os.path.join(os.path.dirname(__file__), "results", f"full_scale_{a.family}.jsonl")
    ck, bundle, image = os.path.join(work, "checkpoint"), os.path.join(work, "bundle"), os.path.join(work, "frame.jpg")
    clip = os.path.join(work, "clip.npz")
    py = [sys.executable, "-c"]
    cli = [sys.executable, "-m", "molmo_edge.runtime.cli"]
    try:
        with open(out, "w") as log:
            from molmo_edge.runtime.machine import machine_info
            log.write(json.dumps({"step": "machine", **machine_info(), "family": a.family, "layers": a.layers,
                                  "size": "tiny" if a.tiny else "full"}) + "\n")
            fmt, dtype = CHECKPOINT[a.family]
            vocab = f"vocab_size={VOCAB[a.family]}, " if VOCAB[a.family] else ""
            make = (f"from molmo_edge.export.synthetic import make_random_checkpoint; "
                    f"make_random_checkpoint({ck!r}, {a.family!r}, size={'tiny' if a.tiny else 'full'!r}, n_layers={a.layers!r}, "
                    f"{'' if a.tiny else vocab}fmt={fmt!r}, dtype={dtype!r}, shard_bytes=4 << 30)")
            if not os.path.exists(os.path.join(ck, "config.json")) and "checkpoint" not in a.skip:
                run_step("checkpoint", py + [make], work, log)
            import cv2

            from molmo_edge.runtime.device.bench import sample_frame
            cv2.imwrite(image, sample_frame()[:, :, ::-1])
            if molmo2:
                write_clip(clip, sample_frame())
            export = cli + ["export", ck, "-o", bundle, "--dtype", "fp16", "--force"]
            if a.family == "molmo-7b-d":
                export += ["--weights", "int4"]
            if "export" not in a.skip:
                run_step("export", export, work, log)
            if a.family != "molmo-7b-d" and "quantize" not in a.skip:
                run_step("quantize", cli + ["quantize", bundle, "--weights", "int4"], work, log)
            if "ask" not in a.skip:
                run_step("ask", cli + ["ask", bundle, "--image", image, "Point to the cups.", "--prompt",
                                       "How many cups are there?", "--json", "--max-new-tokens", "32"], work, log)
            if molmo2 and "ask_video" not in a.skip:  # a 16-frame clip: one vision pass, two questions
                run_step("ask_video", cli + ["ask", bundle, "--video", clip, "How many cups are there?", "--prompt",
                                             "Point to the cups.", "--json", "--max-new-tokens", "32"], work, log)
            if "serve" not in a.skip:
                serve_once(bundle, image, work, log)
            if "bench" not in a.skip:
                run_step("bench", cli + ["bench", bundle, "--image", image, "--runs", "1", "--json"], work, log)
            if "plan" not in a.skip:
                run_step("plan", cli + ["plan", bundle, "--device", "orin-nano-8gb", "--precision", "int4", "--json"], work, log)
            if molmo2 and "plan_devices" not in a.skip:  # issue 15: plan on every Jetson in the table
                for dev in JETSONS:
                    run_step(f"plan_{dev}", cli + ["plan", bundle, "--device", dev, "--precision", "int4", "--json"], work, log)
            if "guard" not in a.skip:
                run_step("guard", cli + ["ask", bundle, "--image", image, "hi", "--precision", "fp32"], work, log)
            if "plan_cpu" not in a.skip:  # the runtime's own estimate, to compare with ask's measured peak
                run_step("plan_cpu", cli + ["plan", bundle, "--device", "cpu", "--json"], work, log)
            if "memory_profile" not in a.skip:
                run_step("memory_profile", py + [MEMORY_PROFILE, bundle, image], work, log)
            if "first_answer_2crops" not in a.skip:
                run_step("first_answer_2crops", cli + ["ask", bundle, "--image", image, "Point to the cups.", "--max-crops", "2",
                                                       "--json", "--max-new-tokens", "16"], work, log)
            if "roofline" not in a.skip:
                run_step("roofline", roofline_cmd(py, bundle), work, log)
            # the Orin-size INT4 decoder: block 64, fp16 scales, int8 head. From the float decoder by `quantize`
            # (replacing decoder.int4), or for 7B-D, whose bundle has no float decoder, straight from the checkpoint
            orin = ["--weights", "int4", "--block-size", "64", "--scales", "fp16", "--head", "int8"]
            direct = export[:export.index(ck) + 1] + ["-o", bundle + "-int4", "--dtype", "fp16", *orin, "--force"]
            orin_bundle = bundle + "-int4" if a.family == "molmo-7b-d" else bundle
            if "orin" not in a.skip:
                if orin_bundle == bundle:
                    run_step("orin_quantize", cli + ["quantize", bundle, *orin], work, log)
                else:
                    run_step("export_int4", direct, work, log)
                run_step("orin_ask", cli + ["ask", orin_bundle, "--image", image, "Point to the cups.", "--json",
                                            "--max-new-tokens", "32"], work, log)
                run_step("orin_plan", cli + ["plan", orin_bundle, "--device", "orin-nano-8gb", "--precision", "int4", "--json"],
                         work, log)
                run_step("orin_roofline", roofline_cmd(py, orin_bundle), work, log)
            if "export_int4" not in a.skip and orin_bundle == bundle:  # straight to the quantized decoder, no float decoder
                run_step("export_int4", direct, work, log)
    finally:
        finish(work, a.keep, out, "full-scale")
    return 0


def finish(work: str, keep: bool, out: str, tag: str) -> None:
    """Delete what the run made (unless --keep) and say where its results went."""
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
        print(f"[{tag}] removed {work}", file=sys.stderr)
    print(f"[{tag}] wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
