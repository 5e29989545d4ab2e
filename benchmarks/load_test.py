"""Load test of `molmo-edge serve` on loopback: concurrent clients for a fixed time, then the verdict.

    python benchmarks/load_test.py                              # tiny random bundle (torch builds it), 8 clients, 60 s
    python benchmarks/load_test.py --bundle B --clients 16 --seconds 120 --queue-size 4

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
from bench_runtime import machine  # noqa: E402
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
    a = ap.parse_args()
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


if __name__ == "__main__":
    sys.exit(main())
