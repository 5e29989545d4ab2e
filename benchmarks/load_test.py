"""Load test of `molmo-edge serve` on loopback: concurrent clients for a fixed time, then the verdict.

    python benchmarks/load_test.py                              # tiny random bundle (torch builds it), 8 clients, 60 s
    python benchmarks/load_test.py --bundle B --clients 16 --seconds 120 --queue-size 4
    python benchmarks/load_test.py --compare-old                # old (http.server) vs new (uvicorn) side by side

--compare-old checks the last http.server version of runtime/serve/server.py out of git into a temp
folder (only for this comparison: it is not part of the product) and runs both servers, one after
the other, on the same bundle: requests/s and p50/p99 at 1, 8 and 32 clients (model requests and light
GETs), what a normal client sees while 64 slow clients drip bytes, and server memory.

The server runs as a subprocess on 127.0.0.1 (the only address this tool talks to) with a looping
video as its camera. Each client keeps one connection and sends a mix of requests: multipart
uploads of 640x480 JPEGs (16 distinct images, so most need a vision pass), base64 JSON queries,
camera-frame queries, streamed chat completions, and cheap GETs. A 503 is counted and retried
after a short pause, like a well-behaved client. Bounded by --seconds and --max-requests.

Pass: no 5xx but 503, no dropped connections, and the server's resident memory in the last 10 s
within --max-growth of what it was after the warm-up. Prints JSON and a markdown summary.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_int8 import machine  # noqa: E402 (the one description of the machine a benchmark ran on)
from fuzz_openapi import camera_video, loopback_only, multipart, start_server, tiny_bundle  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def pct(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q / 100 * len(xs)))], 1)


def requests_mix(seed: int = 0) -> list[tuple[str, str, str, bytes, dict[str, str], float]]:
    """(kind, method, path, body, headers, weight) for the clients to draw from."""
    import cv2
    import numpy as np
    rng = np.random.default_rng(seed)
    jpegs = []
    for _ in range(16):
        img = rng.integers(0, 60, (480, 640, 3), dtype=np.uint8)
        cv2.circle(img, (int(rng.integers(60, 580)), int(rng.integers(60, 420))), 40, (0, 0, 230), -1)
        jpegs.append(cv2.imencode(".jpg", img)[1].tobytes())
    mix = []
    for i, jpg in enumerate(jpegs):
        body, ctype = multipart([("image", jpg, f"{i}.jpg"), ("prompt", b"Point to the red ball.", None),
                                 ("max_new_tokens", b"24", None)])
        mix.append(("upload", "POST", "/v1/query", body, {"Content-Type": ctype}, 0.45 / len(jpegs)))
        js = json.dumps({"prompts": ["How many balls?", "Point to the ball."], "image": base64.b64encode(jpg).decode(),
                         "max_new_tokens": 16}).encode()
        mix.append(("base64", "POST", "/v1/query", js, {"Content-Type": "application/json"}, 0.15 / len(jpegs)))
        chat = json.dumps({"stream": True, "max_tokens": 24, "messages": [{"role": "user", "content": [
            {"type": "text", "text": "Point to the ball."},
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(jpg).decode()}}]}]}).encode()
        mix.append(("chat-stream", "POST", "/v1/chat/completions", chat, {"Content-Type": "application/json"}, 0.15 / len(jpegs)))
    mix.append(("camera", "POST", "/v1/query", json.dumps({"prompt": "Where is the ball?", "max_new_tokens": 16}).encode(),
                {"Content-Type": "application/json"}, 0.15))
    mix.append(("frame", "GET", "/v1/frame", b"", {}, 0.05))
    mix.append(("healthz", "GET", "/healthz", b"", {}, 0.05))
    return mix


class Client(threading.Thread):
    def __init__(self, host: str, port: int, mix: list, deadline: float, budget: "Budget", seed: int, honor_retry: bool):
        super().__init__(daemon=True)
        self.host, self.port, self.mix, self.deadline, self.budget = host, port, mix, deadline, budget
        self.rng, self.honor_retry = random.Random(seed), honor_retry
        self.results: list[tuple[str, int, float, float]] = []   # (kind, status, seconds, finished at)
        self.errors: list[str] = []
        self.conn: http.client.HTTPConnection | None = None

    def run(self) -> None:
        weights = [m[5] for m in self.mix]
        while time.monotonic() < self.deadline and self.budget.take():
            kind, method, path, body, headers, _ = self.rng.choices(self.mix, weights)[0]
            t = time.monotonic()
            try:
                if self.conn is None:
                    self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
                self.conn.request(method, path, body=body or None, headers=headers)
                r = self.conn.getresponse()
                r.read()
                status, retry = r.status, r.getheader("Retry-After")
                if r.getheader("Connection", "").lower() == "close":
                    self.conn.close()
                    self.conn = None
            except (OSError, http.client.HTTPException) as e:
                self.errors.append(f"{kind}: {type(e).__name__}: {e}")
                if self.conn:
                    self.conn.close()
                self.conn = None
                continue
            self.results.append((kind, status, time.monotonic() - t, time.monotonic()))
            if status == 503:
                time.sleep(float(retry or 1) if self.honor_retry else self.rng.uniform(0.05, 0.2))
        if self.conn:
            self.conn.close()


class Budget:
    def __init__(self, n: int):
        self.n, self.lock = n, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            self.n -= 1
            return self.n >= 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", help="bundle to serve (default: a tiny random MolmoE bundle, built once in --workdir)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "molmo-load"))
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--max-requests", type=int, default=50_000, help="stop after this many requests in all")
    ap.add_argument("--queue-size", type=int, default=4)
    ap.add_argument("--warmup", type=float, default=20,
                    help="seconds before the memory baseline (onnxruntime's arena and malloc's per-thread arenas fill up first)")
    ap.add_argument("--max-growth", type=float, default=0.10, help="allowed RSS growth, warm-up to end (fraction)")
    ap.add_argument("--honor-retry-after", action="store_true", help="clients wait Retry-After seconds after a 503")
    ap.add_argument("--json", metavar="FILE", help="also write the report here")
    ap.add_argument("--compare-old", action="store_true", help="old vs new server side by side (see the docstring)")
    ap.add_argument("--level-seconds", type=float, default=10, help="--compare-old: seconds per concurrency level")
    ap.add_argument("--levels", default="1,8,32", help="--compare-old: concurrent clients to measure (default 1,8,32)")
    a = ap.parse_args()
    if a.compare_old:
        os.makedirs(a.workdir, exist_ok=True)
        return compare(a.bundle or tiny_bundle(a.workdir), a.workdir, a.level_seconds, a.queue_size, a.json,
                       tuple(int(x) for x in a.levels.split(",")))
    if not (0 < a.seconds <= 3600 and 0 < a.clients <= 256):
        raise SystemExit("--seconds must be in (0, 3600] and --clients in (0, 256]: this is a bounded test")
    if a.seconds < a.warmup + 20:
        raise SystemExit(f"--seconds must be at least --warmup + 20 ({a.warmup + 20:g}) to compare memory before and after")
    os.makedirs(a.workdir, exist_ok=True)
    bundle = a.bundle or tiny_bundle(a.workdir)
    proc, url = start_server(bundle, "--queue-size", str(a.queue_size), "--timeout", "60",
                             source=camera_video(os.path.join(a.workdir, "cam.mp4")))
    host, port = loopback_only(url)
    mix = requests_mix()
    rss: list[tuple[float, float]] = []
    try:
        t0 = time.monotonic()
        deadline = t0 + a.seconds
        budget = Budget(a.max_requests)
        clients = [Client(host, port, mix, deadline, budget, i, a.honor_retry_after) for i in range(a.clients)]
        for c in clients:
            c.start()
        while any(c.is_alive() for c in clients):
            rss.append((time.monotonic() - t0, rss_mb(proc.pid)))
            time.sleep(1.0)
        for c in clients:
            c.join()
        elapsed = time.monotonic() - t0
        metrics = http.client.HTTPConnection(host, port, timeout=10)
        metrics.request("GET", "/metrics")
        server_metrics = metrics.getresponse().read().decode()
        metrics.close()
    finally:
        proc.terminate()
        proc.wait(timeout=15)

    results = [r for c in clients for r in c.results]
    errors = [e for c in clients for e in c.errors]
    by_status: dict[int, int] = {}
    for _, st, _, _ in results:
        by_status[st] = by_status.get(st, 0) + 1
    kinds = sorted({r[0] for r in results})
    lat = {k: [r[2] * 1e3 for r in results if r[0] == k and r[1] == 200] for k in kinds}
    model_ok = [r[2] * 1e3 for r in results if r[1] == 200 and r[0] not in ("frame", "healthz")]
    early = [m for t, m in rss if a.warmup <= t <= a.warmup + 10] or [rss[0][1]]
    late = [m for t, m in rss if t >= elapsed - 10] or [rss[-1][1]]
    growth = statistics.median(late) / statistics.median(early) - 1
    steady = [(t, m) for t, m in rss if t >= a.warmup]
    slope = statistics.linear_regression([t for t, _ in steady], [m for _, m in steady]).slope * 60 if len(steady) > 2 else 0.0
    bad = {st: n for st, n in by_status.items() if st >= 500 and st != 503}
    report: dict[str, Any] = {
        "machine": machine(), "bundle": bundle, "clients": a.clients, "queue_size": a.queue_size,
        "seconds": round(elapsed, 1), "requests": len(results), "by_status": dict(sorted(by_status.items())),
        "connection_errors": len(errors), "errors_sample": errors[:5],
        "model_answers_per_s": round(sum(1 for r in results if r[1] == 200 and r[0] not in ("frame", "healthz")) / elapsed, 2),
        "latency_ms_200": {"all model requests": {"p50": pct(model_ok, 50), "p99": pct(model_ok, 99), "n": len(model_ok)},
                           **{k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in lat.items()}},
        "latency_ms_503": {"p50": pct([r[2] * 1e3 for r in results if r[1] == 503], 50),
                           "p99": pct([r[2] * 1e3 for r in results if r[1] == 503], 99)},
        "rss_mb": {"after_warmup": round(statistics.median(early), 1), "last_10s": round(statistics.median(late), 1),
                   "max": round(max(m for _, m in rss), 1), "growth": round(growth, 4),
                   "slope_mb_per_min_after_warmup": round(slope, 2),
                   "every_5s": [round(m, 1) for t, m in rss[::5]]},
        "server_rejected_total": next((ln.split()[-1] for ln in server_metrics.splitlines()
                                       if ln.startswith("molmo_rejected_total")), None),
    }
    report["pass"] = not bad and not errors and growth <= a.max_growth
    print(json.dumps(report, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(report, f, indent=1)
    print("\n| request | n (200) | p50 ms | p99 ms |\n|---|---|---|---|")
    for k, v in report["latency_ms_200"].items():
        print(f"| {k} | {v['n']} | {v['p50']} | {v['p99']} |")
    print(f"\nstatus counts {report['by_status']}, connection errors {len(errors)}, RSS {report['rss_mb']}, "
          f"{'PASS' if report['pass'] else 'FAIL'}")
    return 0 if report["pass"] else 1


# --- old vs new, side by side (--compare-old) ------------------------------------------------------

OLD_LAUNCHER = """
import sys, threading
sys.path.insert(0, sys.argv[1])
import old_server
from molmo_edge.runtime.session import Molmo
lim = old_server.Limits(queue_size=int(sys.argv[3]), timeout_s=60)
app = old_server.App(Molmo.load(sys.argv[2]), limits=lim)
srv = old_server.make_server(app, "127.0.0.1", 0)
print(f"serving on http://127.0.0.1:{srv.server_address[1]}", file=sys.stderr, flush=True)
srv.serve_forever(poll_interval=0.2)
"""


def old_server_dir(workdir: str) -> str:
    """The newest git revision of runtime/serve/server.py still on http.server, written to workdir/old/."""
    import subprocess
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    revs = subprocess.run(["git", "-C", repo, "log", "--format=%H", "--", "runtime/serve/server.py", "runtime/server.py"],
                          capture_output=True, text=True, check=True).stdout.split()
    for rev in revs:
        for path in ("runtime/serve/server.py", "runtime/server.py"):
            src = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path}"], capture_output=True, text=True).stdout
            if "ThreadingHTTPServer" in src:
                api = subprocess.run(["git", "-C", repo, "show", f"{rev}:{path.replace('server.py', 'openapi.py')}"],
                                     capture_output=True, text=True, check=True).stdout
                out = os.path.join(workdir, "old")
                os.makedirs(out, exist_ok=True)
                src = src.replace("from molmo_edge.runtime.serve.openapi import openapi", "from old_openapi import openapi")
                src = src.replace("from molmo_edge.runtime.openapi import openapi", "from old_openapi import openapi")
                for name, text in (("old_server.py", src), ("old_openapi.py", api), ("launch.py", OLD_LAUNCHER)):
                    with open(os.path.join(out, name), "w") as f:
                        f.write(text)
                # the old server reads its kiosk page from a static/ folder next to it
                os.makedirs(os.path.join(out, "static"), exist_ok=True)
                import shutil
                here = os.path.join(repo, "runtime", "serve", "static", "kiosk.html")
                shutil.copy(here, os.path.join(out, "static", "kiosk.html"))
                print(f"old server: {path} at {rev[:10]}", file=sys.stderr)
                return out
    raise SystemExit("no http.server version of the server in this repository's history")


def start_old(folder: str, bundle: str, queue_size: int):
    import subprocess
    p = subprocess.Popen([sys.executable, os.path.join(folder, "launch.py"), folder, bundle, str(queue_size)],
                         stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    while True:
        line = p.stderr.readline()
        if "serving on " in line:
            return p, line.split("serving on ", 1)[1].split()[0]
        if not line and p.poll() is not None:
            raise SystemExit("the old server did not start")


def closed_loop(host: str, port: int, clients: int, seconds: float, req: tuple[str, str, bytes, dict],
                honor_retry: bool = False) -> dict[str, Any]:
    """`clients` threads, each one request at a time on its own keep-alive connection, for `seconds`; after a
    503 a client pauses 0.1 s (or Retry-After seconds, as the OpenAI SDK does, with honor_retry)."""
    method, path, body, headers = req
    lat: list[float] = []
    codes: dict[int, int] = {}
    errors = [0]
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def run() -> None:
        conn = None
        while time.monotonic() < deadline:
            t = time.monotonic()
            try:
                conn = conn or http.client.HTTPConnection(host, port, timeout=120)
                conn.request(method, path, body=body or None, headers=headers)
                r = conn.getresponse()
                r.read()
                if r.getheader("Connection", "").lower() == "close":
                    conn.close()
                    conn = None
            except (OSError, http.client.HTTPException):
                with lock:
                    errors[0] += 1
                conn = None
                continue
            with lock:
                codes[r.status] = codes.get(r.status, 0) + 1
                if r.status == 200:
                    lat.append((time.monotonic() - t) * 1e3)
            if r.status == 503:
                time.sleep(min(float(r.getheader("Retry-After") or 1), 10) if honor_retry else 0.1)
    threads = [threading.Thread(target=run, daemon=True) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    el = time.monotonic() - t0
    return {"ok_per_s": round(len(lat) / el, 1), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99), "codes": codes,
            "errors": errors[0]}


def slow_clients(host: str, port: int, n: int = 64, seconds: float = 12) -> dict[str, Any]:
    """n sockets drip a request's headers a byte a second; meanwhile a normal client asks /healthz and /v1/models."""
    import socket
    socks = []
    for _ in range(n):
        try:
            s = socket.create_connection((host, port), timeout=5)
            s.sendall(b"G")
            socks.append(s)
        except OSError:
            pass
    stop = threading.Event()

    def drip() -> None:
        while not stop.wait(1.0):
            for s in socks:
                try:
                    s.sendall(b"E")
                except OSError:
                    pass
    threading.Thread(target=drip, daemon=True).start()
    time.sleep(1.0)
    codes: dict[str, int] = {}
    lat: list[float] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path in ("/healthz", "/v1/models"):
            t = time.monotonic()
            try:
                c = http.client.HTTPConnection(host, port, timeout=5)
                c.request("GET", path)
                r = c.getresponse()
                r.read()
                c.close()
                key = str(r.status)
                if r.status == 200:
                    lat.append((time.monotonic() - t) * 1e3)
            except (OSError, http.client.HTTPException) as e:
                key = type(e).__name__
            codes[key] = codes.get(key, 0) + 1
        time.sleep(0.2)
    stop.set()
    for s in socks:
        s.close()
    return {"slow_sockets": len(socks), "normal_client": codes, "ok_p50_ms": pct(lat, 50), "ok_p99_ms": pct(lat, 99)}


def compare(bundle: str, workdir: str, level_seconds: float, queue_size: int, json_out: str | None,
            levels: tuple[int, ...] = (1, 8, 32)) -> int:
    import cv2
    import numpy as np
    img = np.random.default_rng(0).integers(0, 60, (480, 640, 3), dtype=np.uint8)
    cv2.circle(img, (300, 200), 40, (0, 0, 230), -1)
    body, ctype = multipart([("image", cv2.imencode(".jpg", img)[1].tobytes(), "a.jpg"),
                             ("prompt", b"Point to the red ball.", None), ("max_new_tokens", b"16", None)])
    workloads = {"model (multipart JPEG upload, 16 tokens)": ("POST", "/v1/query", body, {"Content-Type": ctype}),
                 "light (GET /v1/models)": ("GET", "/v1/models", b"", {})}
    old_dir = old_server_dir(workdir)
    report: dict[str, Any] = {"machine": machine(), "bundle": bundle, "queue_size": queue_size,
                              "level_seconds": level_seconds, "servers": {}}
    for name in ("old (http.server)", "new (uvicorn + Starlette)"):
        if name.startswith("old"):
            proc, url = start_old(old_dir, bundle, queue_size)
        else:
            proc, url = start_server(bundle, "--queue-size", str(queue_size), "--timeout", "60")
        host, port = loopback_only(url)
        res: dict[str, Any] = {"rss_mb_idle": round(rss_mb(proc.pid), 1)}
        peak = [0.0]
        sampling = threading.Event()

        def sample() -> None:
            while not sampling.wait(0.5):
                peak[0] = max(peak[0], rss_mb(proc.pid))
        threading.Thread(target=sample, daemon=True).start()
        try:
            closed_loop(host, port, 2, 3, workloads["model (multipart JPEG upload, 16 tokens)"])   # warm-up
            for wname, req in workloads.items():
                for clients in levels:
                    res[f"{wname} @ {clients}"] = closed_loop(host, port, clients, level_seconds, req)
                    print(name, wname, clients, res[f"{wname} @ {clients}"], file=sys.stderr)
                    if wname.startswith("model") and clients == max(levels):
                        key = f"{wname} @ {clients}, Retry-After honoured"
                        res[key] = closed_loop(host, port, clients, level_seconds * 2, req, honor_retry=True)
                        print(name, key, res[key], file=sys.stderr)
            res["64 slow clients"] = slow_clients(host, port)
            print(name, "slow", res["64 slow clients"], file=sys.stderr)
            res["rss_mb_peak"] = round(peak[0], 1)
            res["rss_mb_after"] = round(rss_mb(proc.pid), 1)
        finally:
            sampling.set()
            proc.terminate()
            proc.wait(timeout=40)
        report["servers"][name] = res
    print(json.dumps(report, indent=1))
    if json_out:
        with open(json_out, "w") as f:
            json.dump(report, f, indent=1)
    names = list(report["servers"])
    print("\n| workload @ clients | " + " | ".join(f"{n}: ok/s, p50, p99 ms, codes" for n in names) + " |")
    print("|---|" + "---|" * len(names))
    for key in report["servers"][names[0]]:
        if "@" in key:
            cells = [report["servers"][n][key] for n in names]
            print(f"| {key} | " + " | ".join(f"{c['ok_per_s']}, {c['p50_ms']}, {c['p99_ms']}, {c['codes']}"
                                            + (f", {c['errors']} conn errors" if c["errors"] else "") for c in cells) + " |")
    for n in names:
        r = report["servers"][n]
        print(f"\n{n}: 64 slow clients -> {r['64 slow clients']}; RSS MB idle {r['rss_mb_idle']}, peak {r['rss_mb_peak']}, "
              f"after {r['rss_mb_after']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
