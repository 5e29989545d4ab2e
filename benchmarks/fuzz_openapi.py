"""Fuzz `molmo-edge serve` from its own OpenAPI document: no request may get a 5xx other than 503.

    python benchmarks/fuzz_openapi.py                       # starts a server on a tiny bundle (needs torch to build it)
    python benchmarks/fuzz_openapi.py --bundle B --cases 3000 --seconds 120
    python benchmarks/fuzz_openapi.py --url http://127.0.0.1:8000   # a server you started (loopback only)

Cases are drawn from GET /openapi.json: for every operation, bodies built from its schemas with
each field valid, of the wrong type, at or past its bounds, or missing, plus unknown fields,
junk images (truncated, huge, tiny, not images), broken base64 and data: URIs, wrong content
types, random query strings, methods and paths, and a few malformed requests below HTTP (bad
Content-Length, chunked, garbage). Bounded by --cases and --seconds; loopback only.
"""
from __future__ import annotations

import argparse
import base64
import http.client
import ipaddress
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from typing import Any
from urllib.parse import quote, urlsplit


def loopback_only(url: str) -> tuple[str, int]:
    """(host, port) of `url`, refusing anything but this machine."""
    u = urlsplit(url)
    host = u.hostname or ""
    ok = host == "localhost"
    try:
        ok = ok or ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    if not ok or u.scheme != "http":
        raise SystemExit(f"refusing {url}: this tool only talks to http:// on loopback (127.0.0.0/8, ::1, localhost)")
    return host, u.port or 80


# --- images to throw -----------------------------------------------------------------------------

def _png(w: int, h: int, seed: int = 0) -> bytes:
    import cv2
    import numpy as np
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


def _png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h pixels (a decompression bomb's header) with no pixel data."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d))  # noqa: E731
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def image_pool() -> list[bytes]:
    good = _png(64, 48)
    return [good, _png(200, 150, 1), _png(8, 8, 2), _png(2, 2, 3), _png(1, 500, 4), good[: len(good) // 2],
            b"", b"GIF89a\x00\x00", os.urandom(300), b"\xff\xd8\xff\xe0" + os.urandom(100),
            _png_header_only(100_000, 100_000), _png_header_only(6000, 5000), _png_header_only(0, 0),
            b"<svg xmlns='http://www.w3.org/2000/svg'/>", "é".encode() * 50]


# --- values from schemas -------------------------------------------------------------------------

WEIRD_STRINGS = ["", " ", "a", "Point to the cup.", "x" * 2001, "x" * 50_000, "\u0000", "\ud800", "🙂" * 10,
                 "<script>alert(1)</script>", "' OR 1=1 --", "%s%n", "../../etc/passwd", "\r\nX-Injected: 1",
                 "data:", "data:image/png;base64,", "data:image/png,abc", "http://169.254.169.254/", "null"]
WEIRD_VALUES: list[Any] = [None, True, False, 0, -1, 1, 2**31, 2**63, -2**63, 10**30, 1.5, -0.0, 1e308, float("nan"),
                           float("inf"), "", "1", [], [1, "a"], {}, {"a": {"b": [None]}}, [[[[[]]]]]]


def resolve(schema: Any, doc: dict) -> Any:
    while isinstance(schema, dict) and "$ref" in schema:
        node: Any = doc
        for part in schema["$ref"].lstrip("#/").split("/"):
            node = node[part]
        schema = node
    return schema


class Gen:
    def __init__(self, doc: dict, rng: random.Random, images: list[bytes]):
        self.doc, self.rng, self.images = doc, rng, images
        self.good_b64 = base64.b64encode(images[0]).decode()

    def image_string(self) -> str:
        r = self.rng.random()
        if r < 0.3:
            return "data:image/png;base64," + self.good_b64
        if r < 0.45:
            return self.good_b64
        img = base64.b64encode(self.rng.choice(self.images)).decode()
        return self.rng.choice([img, "data:image/png;base64," + img, "data:image/png;base64,!!" + img, img[:-3],
                                "data:text/plain;base64," + img, "data:;base64,", self.rng.choice(WEIRD_STRINGS)])

    def value(self, schema: Any, name: str = "", depth: int = 0) -> Any:
        """A value for `schema`: mostly valid, sometimes at or past its bounds, sometimes of another type."""
        rng = self.rng
        schema = resolve(schema, self.doc) or {}
        if depth > 6 or rng.random() < 0.12:
            return rng.choice(WEIRD_VALUES + WEIRD_STRINGS)
        if name in ("image", "url"):
            return self.image_string()
        if "oneOf" in schema:
            return self.value(rng.choice(schema["oneOf"]), name, depth + 1)
        if "const" in schema:
            return schema["const"] if rng.random() < 0.8 else rng.choice(WEIRD_VALUES)
        if "enum" in schema:
            return rng.choice(schema["enum"]) if rng.random() < 0.8 else rng.choice(WEIRD_STRINGS)
        t = schema.get("type")
        t = rng.choice(t) if isinstance(t, list) else t
        if t == "integer":
            lo, hi = schema.get("minimum", -1000), schema.get("maximum", 10**6)
            return rng.choice([lo, hi, lo - 1, hi + 1, rng.randint(lo, hi), rng.randint(lo, hi)])
        if t == "number":
            lo, hi = schema.get("minimum", schema.get("exclusiveMinimum", -10.0)), schema.get("maximum", 10.0)
            return rng.choice([lo, hi, lo - 0.5, hi + 0.5, rng.uniform(lo, hi), rng.uniform(lo, hi)])
        if t == "boolean":
            return rng.random() < 0.5
        if t == "string":
            n = schema.get("maxLength")
            return rng.choice(["Point to the cup.", "How many?", "What is this?"] * 3 + WEIRD_STRINGS +
                              (["y" * n, "y" * (n + 1)] if n else []))
        if t == "array":
            hi = schema.get("maxItems", 4)
            n = rng.choice([0, 1, 1, 2, hi, hi + 1])
            return [self.value(schema.get("items", {}), name, depth + 1) for _ in range(min(n, 40))]
        if t == "object" or "properties" in schema:
            return self.obj(schema, depth + 1)
        return rng.choice(WEIRD_VALUES)

    def obj(self, schema: dict, depth: int = 0) -> dict:
        rng, out = self.rng, {}
        props = schema.get("properties", {})
        required = set(schema.get("required", []))
        for k, sub in props.items():
            keep = 0.97 if k in required else 0.5
            if rng.random() < keep:
                out[k] = self.value(sub, k, depth)
        if rng.random() < 0.1:
            out[rng.choice(["extra", "__proto__", "prompt ", "", "💥"])] = rng.choice(WEIRD_VALUES)
        return out


# --- sending -------------------------------------------------------------------------------------

def multipart(fields: list[tuple[str, bytes, str | None]], boundary: str = "fuzzBoundary42") -> tuple[bytes, str]:
    out = b""
    for name, value, fname in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{fname}"' if fname else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n\r\n".encode() + value + b"\r\n"
    return out + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def send(host: str, port: int, method: str, path: str, body: bytes | None, headers: dict[str, str],
         timeout: float = 60) -> tuple[int, bytes]:
    c = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        c.request(method, path, body=body, headers=headers)
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def send_raw(host: str, port: int, data: bytes, timeout: float = 10) -> int:
    """Status of a hand-made request (0 when the server closed without answering)."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.sendall(data)
        try:
            head = s.recv(64)
        except (ConnectionResetError, socket.timeout):
            return 0
    parts = head.split(b" ", 2)
    return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0


RAW_CASES = [
    b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Length: 99999999999\r\n\r\n",
    b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Length: abc\r\n\r\n",
    b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Length: -1\r\n\r\n",
    b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Length: \xb2\r\n\r\n",
    b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 3\r\n\r\nabcGET / HTTP/1.1\r\n\r\n",
    b"GET /v1/frame HTTP/1.1\r\nHost: attacker.example\r\n\r\n",
    b"GET /\xb2\xff HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"\x00\x01\x02\x03\r\n\r\n",
    b"GET " + b"/a" * 3000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n",
    b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n" + b"X-A: b\r\n" * 150 + b"\r\n",
]


def fuzz(base_url: str, cases: int = 500, seconds: float = 60, seed: int = 0, api_key: str | None = None) -> dict[str, Any]:
    """Run up to `cases` requests for at most `seconds`; failures are 5xx other than 503, or no answer."""
    host, port = loopback_only(base_url)
    rng = random.Random(seed)
    auth = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    status, raw_doc = send(host, port, "GET", "/openapi.json", None, auth)
    if status != 200:
        raise SystemExit(f"GET /openapi.json answered {status}; is {base_url} a molmo-edge server?")
    doc = json.loads(raw_doc)
    gen = Gen(doc, rng, image_pool())
    ops = [(path, method.upper(), op) for path, item in doc["paths"].items() for method, op in item.items()]
    bodied = [o for o in ops if o[2].get("requestBody")]
    by_status: dict[int, int] = {}
    failures: list[dict[str, Any]] = []
    t_end, n = time.monotonic() + seconds, 0

    def record(st: int, what: str, body: bytes = b"") -> None:
        by_status[st] = by_status.get(st, 0) + 1
        if st == 0 or (st >= 500 and st != 503):
            failures.append({"status": st, "case": what[:300], "response": body[:300].decode("utf-8", "replace")})

    for data in RAW_CASES:
        st = send_raw(host, port, data)
        record(st if st else 400, f"raw {data[:80]!r}")  # a close without answer to garbage is fine; a 5xx is not
        n += 1
    while n < cases and time.monotonic() < t_end:
        n += 1
        path, method, op = rng.choice(bodied if rng.random() < 0.75 else ops)  # bodies are where the bugs hide
        headers = dict(auth)
        body: bytes | None = None
        r = rng.random()
        if r < 0.06:
            method = rng.choice(["PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "TRACE", "FOO", "GET", "POST"])
        elif r < 0.1:
            path = rng.choice(["/v2/query", "/v1/query/", "//v1/query", "/v1/../healthz", "/%00", "/static/../../etc/passwd",
                               "/" + "x" * 3000, "/v1/frame/1", "/openapi.yaml"])
        query = ""
        for p in op.get("parameters", []):
            if rng.random() < 0.6:
                v = gen.value(p.get("schema", {}), p["name"])
                v = v if isinstance(v, str) else json.dumps(v)
                query += ("&" if query else "?") + f"{p['name']}={quote(v.encode('utf-8', 'surrogatepass'), safe='')}"
        if rng.random() < 0.1:
            query += rng.choice(["?a=1&" * 30, "?key=%ff%fe", "?points=%00", "?prompt=" + "%" * 10])
        content = (op.get("requestBody") or {}).get("content", {})
        if content and method == "POST":
            ctype = rng.choice(list(content))
            schema = content[ctype].get("schema", {})
            if ctype == "application/json":
                v = gen.obj(resolve(schema, doc)) if rng.random() < 0.9 else rng.choice(WEIRD_VALUES)
                try:
                    body = json.dumps(v).encode()
                except (ValueError, TypeError):
                    body = b"{}"
                if rng.random() < 0.05:
                    body = body[: rng.randint(0, len(body))]  # truncated JSON
            elif ctype == "multipart/form-data":
                fields = []
                for k, sub in resolve(schema, doc).get("properties", {}).items():
                    if rng.random() < 0.7:
                        val = rng.choice(gen.images) if k == "image" else str(gen.value(sub, k)).encode("utf-8", "replace")
                        fields.append((k, val, "f.png" if k == "image" else None))
                body, ctype = multipart(fields)
                if rng.random() < 0.1:
                    ctype = rng.choice(["multipart/form-data", "multipart/form-data; boundary=other", "multipart/form-data; boundary="])
            else:
                body = rng.choice(gen.images)
            if rng.random() < 0.08:
                ctype = rng.choice(["text/plain", "application/xml", "", "application/json; charset=utf-16", "image/*"])
            headers["Content-Type"] = ctype
        elif rng.random() < 0.1:
            body = os.urandom(rng.randint(0, 200))
        case = f"{method} {path}{query[:100]} {headers.get('Content-Type', '')} {(body or b'')[:150]!r}"
        try:
            st, resp = send(host, port, method, path + query, body, headers)
        except (ConnectionError, http.client.HTTPException, socket.timeout) as e:
            st, resp = 0, f"{type(e).__name__}: {e}".encode()
        record(st, case, resp)
    healthy = send(host, port, "GET", "/healthz", None, {})[0] == 200
    if not healthy:
        failures.append({"status": 0, "case": "GET /healthz after the run", "response": "server unhealthy"})
    return {"cases": n, "by_status": dict(sorted(by_status.items())), "failures": failures, "healthy_after": healthy}


# --- a server to fuzz ----------------------------------------------------------------------------

def tiny_bundle(workdir: str) -> str:
    """A tiny random MolmoE bundle (made once per workdir; needs torch for the export)."""
    out = os.path.join(workdir, "bundle")
    if not os.path.exists(os.path.join(out, "manifest.json")):
        from molmo_edge.export.bundle import export_bundle
        from molmo_edge.export.synthetic import make_random_checkpoint
        ck = make_random_checkpoint(os.path.join(workdir, "ckpt"), "molmoe-1b")
        export_bundle(ck, out, progress=lambda *_: None)
    return out


def camera_video(path: str, n: int = 60) -> str:
    import cv2
    import numpy as np
    w = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), 15, (320, 240))
    for i in range(n):
        img = np.full((240, 320, 3), 50, np.uint8)
        cv2.circle(img, (10 + 5 * i, 120), 20, (0, 0, 230), -1)
        w.write(img)
    w.release()
    return path


def start_server(bundle: str, *extra: str, source: str | None = None) -> tuple[subprocess.Popen, str]:
    """`molmo-edge serve` on 127.0.0.1 and a free port; returns (process, base URL)."""
    cmd = [sys.executable, "-m", "molmo_edge.runtime.cli", "serve", bundle, "--host", "127.0.0.1", "--port", "0", *extra]
    if source:
        cmd += ["--source", source]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if "serving on " in line:
            url = line.split("serving on ", 1)[1].split()[0]
            loopback_only(url)
            return p, url
        if not line and p.poll() is not None:
            break
    p.kill()
    raise SystemExit(f"the server did not start: {p.stderr.read()[-2000:]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--url", help="fuzz this running server (loopback only) instead of starting one")
    ap.add_argument("--bundle", help="bundle for the server this tool starts (default: a tiny random one)")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "molmo-fuzz"))
    ap.add_argument("--cases", type=int, default=2000)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--api-key")
    a = ap.parse_args()
    proc = None
    url = a.url
    if not url:
        os.makedirs(a.workdir, exist_ok=True)
        bundle = a.bundle or tiny_bundle(a.workdir)
        proc, url = start_server(bundle, "--max-image-mp", "4", source=camera_video(os.path.join(a.workdir, "cam.mp4")))
    try:
        t = time.monotonic()
        report = fuzz(url, a.cases, a.seconds, a.seed, a.api_key)
        report["seconds"] = round(time.monotonic() - t, 1)
    finally:
        if proc:
            proc.terminate()
            proc.wait(timeout=10)
    print(json.dumps(report, indent=1))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
