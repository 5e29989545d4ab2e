"""The HTTP server over real HTTP on loopback: every endpoint, the OpenAI-compatible chat (plain and
SSE), the camera frame, limits and malformed input (4xx, and the server keeps serving), the bounded
queue (503 + Retry-After), timeouts, the API key, connection caps, a short OpenAPI fuzz run and the
`serve` command itself.

The model is real: a tiny bundle run by onnxruntime. Its weights are set so that greedy decoding
always answers POINT_ANSWER (a point at 61 %, 42 %), which makes points checkable end to end."""
import base64
import http.client
import importlib.util
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

from molmo_edge.runtime.serve.server import App, Limits, make_server

POINT_ANSWER = "(61, 42)"
REPO = Path(__file__).resolve().parents[1]


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_openapi", REPO / "benchmarks" / "fuzz_openapi.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzzer()  # benchmarks/fuzz_openapi.py: the fuzzer, and the multipart encoder the tests share


def make_pointing_bundle(folder) -> str:
    """A tiny molmo-7b-d bundle whose greedy answer to any prompt is POINT_ANSWER.

    Every block's attention and MLP outputs are zeroed, so the residual stream at a position is that
    token's embedding and the next token depends on the current one only. Each token of the chain
    (last prompt token -> "(" -> "6" -> ... -> ")" -> EOS) gets its own embedding axis, and the LM
    head maps that axis to the next token of the chain. Export and inference are the real ones."""
    pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.config import load_config
    from molmo_edge.runtime.tokenizer import MolmoTokenizer

    folder = Path(folder)
    ck = make_random_checkpoint(str(folder / "ckpt"), "molmo-7b-d")
    tok = MolmoTokenizer(ck, load_config(ck))
    last = tok.encode_prompt("anything")[-1]
    assert tok.encode_prompt("Point to the cup.")[-1] == last  # every prompt ends in "Assistant:"
    chain = [last] + tok.encode(POINT_ANSWER) + [tok.eos_id]
    assert len(set(chain)) == len(chain), "the chain needs distinct tokens"
    w = load_file(f"{ck}/model.safetensors")
    for k in w:
        if ".blocks." in k and k.endswith(("attn_out.weight", "ff_out.weight")):
            w[k] = np.zeros_like(w[k])
    emb, head = w["model.transformer.wte.embedding"], w["model.transformer.ff_out.weight"]
    w["model.transformer.ln_f.weight"] = np.ones_like(w["model.transformer.ln_f.weight"])
    head[:, : len(chain)] = 0
    for axis, (cur, nxt) in enumerate(zip(chain, chain[1:])):
        emb[cur] = 0
        emb[cur, axis] = 1.0
        head[nxt, axis] = 20.0
    save_file(w, f"{ck}/model.safetensors", metadata={"format": "pt"})
    out = str(folder / "bundle")
    export_bundle(ck, out, progress=lambda *_: None)
    return out


def make_video(path, n=20, fps=20, size=(320, 240)):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n):
        img = np.full((size[1], size[0], 3), 40, np.uint8)
        cv2.circle(img, (20 + 12 * i, size[1] // 2), 15, (0, 0, 230), -1)
        w.write(img)
    w.release()
    return str(path)


def png(w=320, h=240, seed=0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


@pytest.fixture(scope="module")
def pointing_bundle(tmp_path_factory):
    return make_pointing_bundle(tmp_path_factory.mktemp("pointing"))


@contextmanager
def serving(bundle, source=None, **kw):
    """An App on 127.0.0.1, random port, in a thread; yields (base URL, app)."""
    from molmo_edge.runtime.session import Molmo
    model = kw.pop("model", None) or Molmo.load(bundle)
    app = App(model, source, **kw)
    server = make_server(app, "127.0.0.1", 0)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", app
    finally:
        server.shutdown()
        server.server_close()
        app.close()


def request(base, method, path, body=None, headers=None, timeout=30):
    """(status, headers, body bytes) over a fresh connection."""
    host, port = base.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        c.close()


def raw(base, data: bytes, timeout=10) -> bytes:
    host, port = base.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out


LIMITS = dict(max_body_bytes=2 << 20, max_image_pixels=200_000, queue_size=4, timeout_s=30, default_new_tokens=16,
              max_new_tokens=64)


@pytest.fixture(scope="module")
def server(pointing_bundle, tmp_path_factory):
    from molmo_edge.runtime.cameras import open_source
    video = make_video(tmp_path_factory.mktemp("cam") / "cam.mp4")
    src = open_source(video, loop=True)
    with serving(pointing_bundle, src, limits=Limits(**LIMITS)) as (base, app):
        deadline = time.monotonic() + 10
        while src.latest() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        yield base, app
    src.close()


def _check_point(ans, w, h):
    assert ans["text"] == POINT_ANSWER and ans["count"] == 1
    p = ans["points"][0]
    assert (p["x_pct"], p["y_pct"]) == (61.0, 42.0)
    assert abs(p["x"] - 0.61 * w) < 0.01 and abs(p["y"] - 0.42 * h) < 0.01


def test_query_every_way_to_send_an_image(server):
    base, app = server
    body, ctype = fuzz.multipart([("image", png(), "a.png"), ("prompt", b"Point to the cup.", None),
                                  ("prompt", b"How many cups?", None), ("max_new_tokens", b"20", None)])
    st, _, out = request(base, "POST", "/v1/query", body, {"Content-Type": ctype})
    assert st == 200, out
    res = json.loads(out)
    assert [a["prompt"] for a in res["answers"]] == ["Point to the cup.", "How many cups?"]
    for a in res["answers"]:
        _check_point(a, 320, 240)
    assert res["answers"][0]["timings"]["vision"] > 0 and res["answers"][1]["timings"]["vision"] == 0  # one vision pass
    assert res["image"] == {"width": 320, "height": 240, "source": "upload"}

    b64 = base64.b64encode(png(200, 100, 1)).decode()
    for image in (b64, "data:image/png;base64," + b64):
        st, _, out = request(base, "POST", "/v1/query", {"prompt": "Point to it.", "image": image})
        assert st == 200, out
        _check_point(json.loads(out)["answers"][0], 200, 100)

    st, _, out = request(base, "POST", "/v1/query?prompt=Where%3F", png(100, 50, 2), {"Content-Type": "image/png"})
    assert st == 200, out
    _check_point(json.loads(out)["answers"][0], 100, 50)

    st, _, out = request(base, "POST", "/v1/query", {"prompts": ["Where is the ball?"]})  # no image: the camera
    assert st == 200, out
    res = json.loads(out)
    assert res["image"]["source"] == "camera" and res["image"]["frame"] >= 0
    _check_point(res["answers"][0], 320, 240)


def test_chat_completions_plain_and_streaming(server):
    base, _ = server
    uri = "data:image/png;base64," + base64.b64encode(png()).decode()
    msgs = [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Point to the cup."},
                                         {"type": "image_url", "image_url": {"url": uri}}]}]
    st, _, out = request(base, "POST", "/v1/chat/completions", {"model": "molmo", "messages": msgs, "max_tokens": 20})
    assert st == 200, out
    res = json.loads(out)
    assert res["object"] == "chat.completion" and res["id"].startswith("chatcmpl-")
    assert res["choices"][0]["message"] == {"role": "assistant", "content": POINT_ANSWER}
    assert res["choices"][0]["finish_reason"] == "stop"
    assert res["usage"]["completion_tokens"] == 9 and res["usage"]["prompt_tokens"] > 100
    assert res["molmo"]["points"][0]["x"] == pytest.approx(0.61 * 320)

    # a second turn with history, text only (no image)
    hist = msgs + [{"role": "assistant", "content": POINT_ANSWER}, {"role": "user", "content": "And now?"}]
    st, _, out = request(base, "POST", "/v1/chat/completions", {"messages": hist[2:]})
    assert st == 200 and json.loads(out)["choices"][0]["message"]["content"] == POINT_ANSWER

    st, hdrs, out = request(base, "POST", "/v1/chat/completions",
                            {"messages": msgs, "stream": True, "stream_options": {"include_usage": True}})
    assert st == 200 and hdrs["Content-Type"] == "text/event-stream"
    events = [e[len("data: "):] for e in out.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == POINT_ANSWER and len(chunks) > 5  # token by token
    final = chunks[-1]
    assert final["choices"][0]["finish_reason"] == "stop" and final["usage"]["completion_tokens"] == 9
    assert final["molmo"]["count"] == 1 and final["molmo"]["points"][0]["y_pct"] == 42.0


def test_frame_and_its_points(server):
    base, _ = server
    st, hdrs, jpg = request(base, "GET", "/v1/frame")
    assert st == 200 and hdrs["Content-Type"] == "image/jpeg"
    first = int(hdrs["X-Frame-Id"])
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (240, 320, 3)
    time.sleep(0.3)
    assert int(request(base, "GET", "/v1/frame")[1]["X-Frame-Id"]) > first  # live

    st, _, out = request(base, "POST", "/v1/query", {"prompt": "Point to the ball."})
    assert st == 200
    _, _, plain = request(base, "GET", "/v1/frame")
    _, _, drawn = request(base, "GET", "/v1/frame?points=1")
    a = cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR).astype(int)
    b = cv2.imdecode(np.frombuffer(drawn, np.uint8), cv2.IMREAD_COLOR).astype(int)
    x, y = round(0.61 * 320), round(0.42 * 240)
    assert np.abs(a - b)[y - 3:y + 4, x - 3:x + 4].mean() > 40   # a marker where the point is
    assert np.abs(a - b)[:30, :30].mean() < 20                      # and the rest left alone


def test_health_metrics_openapi_models(server):
    base, _ = server
    st, _, out = request(base, "GET", "/healthz")
    h = json.loads(out)
    assert st == 200 and h["status"] == "ok" and h["queue"]["capacity"] == 4 and h["source"]["status"] == "running"
    st, hdrs, out = request(base, "GET", "/metrics")
    text = out.decode()
    assert st == 200 and hdrs["Content-Type"].startswith("text/plain")
    for name in ("molmo_http_requests_total{", "molmo_http_request_duration_seconds_bucket{", "molmo_queue_depth ",
                 "molmo_source_frames_total ", "process_resident_memory_bytes "):
        assert name in text
    assert re.search(r'^molmo_http_requests_total\{route="/healthz",code="200"\} \d+$', text, re.M)
    st, _, out = request(base, "GET", "/openapi.json")
    doc = json.loads(out)
    assert doc["openapi"].startswith("3.") and {"/v1/query", "/v1/chat/completions", "/v1/frame", "/healthz"} <= set(doc["paths"])
    assert doc["components"]["schemas"]["QueryJSON"]["properties"]["max_new_tokens"]["maximum"] == 64
    st, _, out = request(base, "GET", "/v1/models")
    assert st == 200 and json.loads(out)["data"][0]["object"] == "model"
    st, hdrs, page = request(base, "GET", "/")
    assert st == 200 and b"<canvas" in page and "default-src 'self'" in hdrs["Content-Security-Policy"]
    assert not re.search(rb"(src|href)=\"(https?:)?//", page)  # nothing from the network


BAD = [  # (method, path, body, content type, status, message fragment)
    ("POST", "/v1/query", b"{not json", "application/json", 400, "not valid JSON"),
    ("POST", "/v1/query", b"[1, 2]", "application/json", 400, "must be a JSON object"),
    ("POST", "/v1/query", b"[" * 100000, "application/json", 400, "not valid JSON"),
    ("POST", "/v1/query", {"prompt": 5}, None, 400, "`prompt` must be a string"),
    ("POST", "/v1/query", {"prompt": ""}, None, 400, "is empty"),
    ("POST", "/v1/query", {"prompt": "x" * 2001}, None, 400, "the limit is 2000"),
    ("POST", "/v1/query", {"prompts": ["a"] * 9}, None, 400, "the limit is 8"),
    ("POST", "/v1/query", {"prompts": "ab", "prompt": "cd"}, None, 400, "either"),
    ("POST", "/v1/query", b'{"prompt": "\\ud800"}', "application/json", 400, "lone surrogate"),
    ("POST", "/v1/query", {"prompt": "hi", "colour": 1}, None, 400, "unknown field"),
    ("POST", "/v1/query", {"prompt": "hi", "max_new_tokens": 0}, None, 400, "from 1 to 64"),
    ("POST", "/v1/query", {"prompt": "hi", "max_new_tokens": True}, None, 400, "must be an integer"),
    ("POST", "/v1/query", {"prompt": "hi", "max_new_tokens": "many"}, None, 400, "must be an integer"),
    ("POST", "/v1/query", {"prompt": "hi", "max_crops": 1000}, None, 400, "from 1 to 64"),
    ("POST", "/v1/query", {"prompt": "hi", "image": "@@@"}, None, 400, "not valid base64"),
    ("POST", "/v1/query", {"prompt": "hi", "image": 12}, None, 400, "base64 string"),
    ("POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(b"GIF89a nope").decode()}, None, 400, "not a readable image"),
    ("POST", "/v1/query", {"prompt": "hi", "image": "data:image/png,abc"}, None, 400, "';base64,'"),
    ("POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(png(4, 4)).decode()}, None, 400, "at least 8 pixels"),
    ("POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(png(600, 400)).decode()}, None, 413, "0.2 MP"),
    ("POST", "/v1/query", b"hello", "text/plain", 415, "not accepted"),
    ("POST", "/v1/query", b"--x\r\n\r\n", "multipart/form-data", 400, "without a boundary"),
    ("POST", "/v1/query", cv2.imencode(".png", np.zeros((1000, 2000, 3), np.uint8))[1].tobytes(), "image/png", 413,
     "2000x1000 (2.0 MP); the limit is 0.2 MP"),
    ("POST", "/v1/query?prompt=hi", png()[:100], "image/png", 400, "image"),
    ("POST", "/v1/chat/completions", {"messages": []}, None, 400, "non-empty array"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, None, 400, "non-empty array"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, None, 400, "string or an array"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "last message"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.jpg"}}, {"type": "text", "text": "hi"}]}]},
     None, 400, "does not fetch URLs"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, None, 400, "type"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "n": 2}, None, 400, "`n` must be 1"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, None, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stop": ["a"] * 5}, None, 400, "stop"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, None, 400, "stream"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**6}, None, 400, "from 1 to 64"),
    ("POST", "/v1/chat/completions", b"x", "text/plain", 415, "application/json"),
    ("GET", "/v1/nothing", None, None, 404, "no such endpoint"),
    ("PUT", "/v1/query", b"{}", "application/json", 405, "takes POST"),
    ("DELETE", "/", None, None, 405, "takes GET"),
    ("BREW", "/healthz", None, None, 405, "takes GET"),
]


def test_bad_input_is_4xx_with_a_clear_message_and_the_server_keeps_serving(server):
    base, _ = server
    for method, path, body, ctype, status, fragment in BAD:
        headers = {"Content-Type": ctype} if ctype else None
        st, hdrs, out = request(base, method, path, body, headers)
        msg = json.loads(out)["error"]["message"]
        assert st == status and fragment in msg, (method, path, str(body)[:60], st, msg)
        assert "\n" not in msg
    # below the HTTP client: oversized, unnumbered and chunked bodies
    resp = raw(base, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 9999999\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 413") and b"the limit is 2097152" in resp
    resp = raw(base, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\r\n{}")
    assert resp.startswith(b"HTTP/1.1 411")
    resp = raw(base, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 411")
    resp = raw(base, b"POST /v1/query HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 400")
    assert b"400 - Bad request" in raw(base, b"\x16\x03\x01 garbage\r\n\r\n")  # e.g. TLS to a plain port (http.server's own page)
    # still serving
    st, _, out = request(base, "POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(png()).decode()})
    assert st == 200 and json.loads(out)["answers"][0]["text"] == POINT_ANSWER


def test_keep_alive_and_unread_bodies(server):
    base, _ = server
    host, port = base.split("//")[1].split(":")
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    for _ in range(3):  # one connection, several requests
        c.request("GET", "/healthz")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Connection") != "close"
        r.read()
    # an error before the body was read: the body is drained, not parsed as the next request
    c.request("POST", "/v1/nowhere", body=b"GET /x HTTP/1.1\r\n\r\n" * 300, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 404 and r.getheader("Connection") != "close"
    r.read()
    c.request("GET", "/healthz")
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    c.close()


class SlowModel:
    """The real model, with its streamed text delivered slowly (as a big model on a small device would)."""

    def __init__(self, model, delay):
        self.model, self.delay, self.stats = model, delay, model.stats

    def ask(self, *a, on_text=None, **kw):
        def slow(piece):
            time.sleep(self.delay)
            if on_text:
                on_text(piece)
        return self.model.ask(*a, on_text=slow, **kw)


def test_full_queue_is_503_with_retry_after_and_timeouts(pointing_bundle):
    from molmo_edge.runtime.session import Molmo
    body = {"prompt": "hi", "image": base64.b64encode(png()).decode()}
    with serving(pointing_bundle, limits=Limits(queue_size=1, timeout_s=0.6)) as (base, app):
        gate = threading.Event()
        app.worker.submit(lambda job: gate.wait(10))        # the model is busy ...
        time.sleep(0.1)
        app.worker.submit(lambda job: None)                 # ... and the queue is full
        st, hdrs, out = request(base, "POST", "/v1/query", body)
        assert st == 503 and int(hdrs["Retry-After"]) >= 1 and "busy" in json.loads(out)["error"]["message"]
        st, hdrs, _ = request(base, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": True})
        assert st == 503 and "Retry-After" in hdrs
        assert request(base, "GET", "/healthz")[0] == 200   # cheap endpoints never wait for the model
        gate.set()
        time.sleep(0.2)
        # a request that waits in the queue past its timeout: 503 too (overloaded, retry), not 504
        gate = threading.Event()
        app.worker.submit(lambda job: gate.wait(3))
        time.sleep(0.1)
        st, hdrs, out = request(base, "POST", "/v1/query", body)
        assert st == 503 and "waited" in json.loads(out)["error"]["message"] and "Retry-After" in hdrs
        gate.set()
        time.sleep(0.2)
        assert request(base, "POST", "/v1/query", body)[0] == 200
    with serving(pointing_bundle, model=SlowModel(Molmo.load(pointing_bundle), 0.15), limits=Limits(timeout_s=0.5)) as (base, app):
        st, _, out = request(base, "POST", "/v1/query", body)
        assert st == 504 and "timeout" in json.loads(out)["error"]["message"]
        t = time.monotonic()
        app.model.delay = 0.0
        st, _, out = request(base, "POST", "/v1/query", body)  # the overrun was cancelled, the worker is free
        assert st == 200 and time.monotonic() - t < 1.0
        assert app.worker.failed >= 1


def test_api_key_everywhere_but_healthz(pointing_bundle):
    with serving(pointing_bundle, api_key="s3cret") as (base, _):
        assert request(base, "GET", "/healthz")[0] == 200
        for path in ("/", "/v1/models", "/metrics", "/openapi.json", "/v1/frame"):
            st, hdrs, out = request(base, "GET", path)
            assert st == 401 and hdrs["WWW-Authenticate"] == "Bearer" and "API key" in json.loads(out)["error"]["message"]
        st, _, _ = request(base, "POST", "/v1/query", {"prompt": "hi"})
        assert st == 401
        assert request(base, "GET", "/v1/models", headers={"Authorization": "Bearer s3cret"})[0] == 200
        assert request(base, "GET", "/v1/models", headers={"X-API-Key": "s3cret"})[0] == 200
        assert request(base, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        st, hdrs, _ = request(base, "GET", "/?key=s3cret")
        assert st == 200 and hdrs["Set-Cookie"].startswith("molmo_key=s3cret;") and "HttpOnly" in hdrs["Set-Cookie"]
        assert request(base, "GET", "/v1/models", headers={"Cookie": "molmo_key=s3cret"})[0] == 200
        st, _, out = request(base, "POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(png()).decode()},
                             {"Authorization": "Bearer s3cret"})
        assert st == 200


def test_connection_cap(pointing_bundle):
    with serving(pointing_bundle, limits=Limits(max_connections=2)) as (base, app):
        host, port = base.split("//")[1].split(":")
        idle = [socket.create_connection((host, int(port))) for _ in range(2)]
        time.sleep(0.2)
        resp = raw(base, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in resp
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert request(base, "GET", "/healthz")[0] == 200


def test_client_leaving_mid_stream_frees_the_model(pointing_bundle):
    from molmo_edge.runtime.session import Molmo
    with serving(pointing_bundle, model=SlowModel(Molmo.load(pointing_bundle), 0.2)) as (base, app):
        host, port = base.split("//")[1].split(":")
        body = json.dumps({"messages": [{"role": "user", "content": "hi"}], "stream": True}).encode()
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        assert b"text/event-stream" in s.recv(4096)
        s.close()
        t = time.monotonic()
        while app.worker.busy and time.monotonic() - t < 5:
            time.sleep(0.05)
        assert time.monotonic() - t < 1.5  # cancelled at the next token, not after all of them
        app.model.delay = 0
        assert request(base, "POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})[0] == 200


def test_short_openapi_fuzz_finds_no_5xx(server):
    base, _ = server
    report = fuzz.fuzz(base, cases=250, seconds=25, seed=1)
    assert report["cases"] >= 100 and not report["failures"], report["failures"][:5]
    assert request(base, "GET", "/healthz")[0] == 200


def test_serve_command(pointing_bundle, tmp_path):
    video = make_video(tmp_path / "cam.mp4", n=5)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    p = subprocess.Popen([sys.executable, "-m", "molmo_edge.runtime.cli", "serve", pointing_bundle, "--port", "0",
                          "--source", video, "--queue-size", "2"], stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        deadline = time.monotonic() + 60
        while "serving on" not in line and time.monotonic() < deadline:
            line = p.stderr.readline()
            assert line or p.poll() is None, "serve exited early"
        base = re.search(r"serving on (http://127\.0\.0\.1:\d+)", line).group(1)
        st, _, out = request(base, "GET", "/healthz")
        assert st == 200 and json.loads(out)["queue"]["capacity"] == 2
        st, _, out = request(base, "POST", "/v1/query", {"prompt": "Point to the ball."})
        assert st == 200 and json.loads(out)["answers"][0]["text"] == POINT_ANSWER
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0 and "stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    r = subprocess.run([sys.executable, "-m", "molmo_edge.runtime.cli", "serve", pointing_bundle, "--source", "/dev/video97"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: no camera at /dev/video97" in r.stderr and "Traceback" not in r.stderr
