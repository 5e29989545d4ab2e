"""The HTTP server over real HTTP on loopback: every endpoint, the OpenAI-compatible chat (plain and
SSE), the camera frame, limits and malformed input (4xx in OpenAI's error shape, and the server keeps
serving), the bounded queue (503 + Retry-After), timeouts, request slots, a short OpenAPI fuzz run and
the `serve` command itself. Helpers and the tiny pointing bundle are in serve_helpers.py."""
import base64
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
from pathlib import Path

import cv2
import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'molmo-edge[serve]'")
from serve_helpers import (POINT_ANSWER, SlowModel, error_of, hostport, make_video, png, raw, request,  # noqa: E402
                           serving, shared_pointing_bundle)

from molmo_edge.runtime.serve.server import Limits  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _load_fuzzer():
    spec = importlib.util.spec_from_file_location("fuzz_openapi", REPO / "benchmarks" / "fuzz_openapi.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


fuzz = _load_fuzzer()  # benchmarks/fuzz_openapi.py: the fuzzer, and the multipart encoder the tests share


@pytest.fixture(scope="module")
def pointing_bundle(tmp_path_factory):
    return shared_pointing_bundle(tmp_path_factory)


LIMITS = dict(max_body_bytes=2 << 20, max_image_pixels=200_000, queue_size=4, timeout_s=30, default_new_tokens=16,
              max_new_tokens=64)


@pytest.fixture(scope="module")
def server(pointing_bundle, tmp_path_factory):
    from molmo_edge.runtime.cameras import open_source
    video = make_video(tmp_path_factory.mktemp("cam") / "cam.mp4")
    src = open_source(video, loop=True)
    with serving(pointing_bundle, src, limits=Limits(**LIMITS)) as (base, st):
        deadline = time.monotonic() + 10
        while src.latest() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        yield base, st
    src.close()


def _check_point(ans, w, h):
    assert ans["text"] == POINT_ANSWER and ans["count"] == 1
    p = ans["points"][0]
    assert (p["x_pct"], p["y_pct"]) == (61.0, 42.0)
    assert abs(p["x"] - 0.61 * w) < 0.01 and abs(p["y"] - 0.42 * h) < 0.01


def test_query_every_way_to_send_an_image(server):
    base, _ = server
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
    st, _, out = request(base, "POST", "/v1/query", {"prompt": "a", "prompts": ["b"], "image": b64})  # both: both asked
    assert st == 200 and [a["prompt"] for a in json.loads(out)["answers"]] == ["a", "b"]

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
    assert st == 200 and hdrs["content-type"].startswith("text/event-stream")
    events = [e[len("data: "):] for e in out.decode().split("\n\n") if e]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == POINT_ANSWER and len(chunks) > 5  # token by token
    finish, usage = chunks[-2], chunks[-1]
    assert finish["choices"][0]["finish_reason"] == "stop" and finish["usage"] is None
    assert finish["molmo"]["count"] == 1 and finish["molmo"]["points"][0]["y_pct"] == 42.0
    # OpenAI's include_usage: a last chunk with no choices carries the usage; every other chunk has usage null
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 9
    assert all(c["usage"] is None for c in chunks[:-1])


def test_frame_and_its_points(server):
    base, _ = server
    st, hdrs, jpg = request(base, "GET", "/v1/frame")
    assert st == 200 and hdrs["content-type"] == "image/jpeg"
    first = int(hdrs["x-frame-id"])
    img = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (240, 320, 3)
    time.sleep(0.3)
    assert int(request(base, "GET", "/v1/frame")[1]["x-frame-id"]) > first  # live

    st, _, out = request(base, "POST", "/v1/query", {"prompt": "Point to the ball."})
    assert st == 200
    _, _, plain = request(base, "GET", "/v1/frame")
    _, _, drawn = request(base, "GET", "/v1/frame?points=1")
    a = cv2.imdecode(np.frombuffer(plain, np.uint8), cv2.IMREAD_COLOR).astype(int)
    b = cv2.imdecode(np.frombuffer(drawn, np.uint8), cv2.IMREAD_COLOR).astype(int)
    x, y = round(0.61 * 320), round(0.42 * 240)
    assert np.abs(a - b)[y - 3:y + 4, x - 3:x + 4].mean() > 40   # a marker where the point is
    assert np.abs(a - b)[:30, :30].mean() < 20                      # and the rest left alone
    assert request(base, "GET", "/v1/frame?points=maybe")[0] == 400


def test_health_metrics_openapi_models_head_options(server):
    base, _ = server
    st, _, out = request(base, "GET", "/healthz")
    h = json.loads(out)
    assert st == 200 and h["status"] == "ok" and h["queue"]["capacity"] == 4 and h["source"]["status"] == "running"
    st, hdrs, out = request(base, "GET", "/metrics")
    text = out.decode()
    assert st == 200 and hdrs["content-type"].startswith("text/plain")
    for name in ("molmo_http_requests_total{", "molmo_http_request_duration_seconds_bucket{", "molmo_queue_depth ",
                 "molmo_source_frames_total ", "process_resident_memory_bytes ", "molmo_requests_in_progress "):
        assert name in text
    assert re.search(r'^molmo_http_requests_total\{code="200",route="/healthz"\} \d+', text, re.M)
    st, _, out = request(base, "GET", "/openapi.json")
    doc = json.loads(out)
    assert doc["openapi"].startswith("3.") and {"/v1/query", "/v1/chat/completions", "/v1/frame", "/healthz",
                                                "/v1/models/{model_id}"} <= set(doc["paths"])
    q = doc["components"]["schemas"]["QueryJSON"]["properties"]["max_new_tokens"]
    assert q["anyOf"][0]["maximum"] == 64
    st, _, out = request(base, "GET", "/v1/models")
    models = json.loads(out)["data"]
    assert st == 200 and models[0]["object"] == "model" and "molmo" in [m["id"] for m in models]
    st, _, out = request(base, "GET", f"/v1/models/{models[0]['id']}")
    assert st == 200 and json.loads(out)["id"] == models[0]["id"]
    st, _, out = request(base, "GET", "/v1/models/gpt-4o")
    assert st == 404 and error_of(out)["code"] == "model_not_found"
    st, hdrs, page = request(base, "GET", "/")
    assert st == 200 and b"<canvas" in page and "default-src 'self'" in hdrs["content-security-policy"]
    assert not re.search(rb"(src|href)=\"(https?:)?//", page)  # nothing from the network
    st, hdrs, body = request(base, "HEAD", "/healthz")
    assert st == 200 and body == b"" and int(hdrs["content-length"]) > 0
    st, hdrs, _ = request(base, "OPTIONS", "/v1/chat/completions")
    assert st == 204 and hdrs["allow"] == "POST, OPTIONS"
    assert "access-control-allow-origin" not in hdrs   # CORS is off unless configured
    st, hdrs, _ = request(base, "OPTIONS", "/v1/frame")
    assert st == 204 and hdrs["allow"] == "GET, HEAD, OPTIONS"


B64 = base64.b64encode(png()).decode()
USER = [{"role": "user", "content": "hi"}]
BAD = [  # (method, path, body, content type, status, message fragment, param)
    ("POST", "/v1/query", b"{not json", "application/json", 400, "JSON", None),
    ("POST", "/v1/query", b"[1, 2]", "application/json", 400, "object", None),
    ("POST", "/v1/query", b"[" * 100000, "application/json", 400, "JSON", None),
    ("POST", "/v1/query", {"prompt": 5}, None, 400, "string", "prompt"),
    ("POST", "/v1/query", {"prompt": ""}, None, 400, "at least 1 character", "prompt"),
    ("POST", "/v1/query", {"prompt": " \t\n"}, None, 400, "pattern", "prompt"),
    ("POST", "/v1/query", {"prompt": "x" * 2001}, None, 400, "at most 2000 characters", "prompt"),
    ("POST", "/v1/query", {"prompts": ["a"] * 9}, None, 400, "at most 8 items", "prompts"),
    ("POST", "/v1/query", {}, None, 400, "no prompt", "prompt"),
    ("POST", "/v1/query", b'{"prompt": "\\ud800"}', "application/json", 400, "JSON", None),
    ("POST", "/v1/query", {"prompt": "hi", "colour": 1}, None, 400, "unknown parameter `colour`", "colour"),
    ("POST", "/v1/query", {"prompt": "hi", "max_new_tokens": 0}, None, 400, "greater than or equal to 1", "max_new_tokens"),
    ("POST", "/v1/query", {"prompt": "hi", "max_new_tokens": True}, None, 400, "integer", "max_new_tokens"),
    ("POST", "/v1/query", {"prompt": "hi", "max_new_tokens": "many"}, None, 400, "integer", "max_new_tokens"),
    ("POST", "/v1/query", {"prompt": "hi", "max_crops": 1000}, None, 400, "less than or equal to 12", "max_crops"),
    ("POST", "/v1/query", {"prompt": "hi", "image": "@@@"}, None, 400, "not valid base64", "image"),
    ("POST", "/v1/query", {"prompt": "hi", "image": 12}, None, 400, "string", "image"),
    ("POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(b"GIF89a nope").decode()}, None, 400,
     "not a readable image", "image"),
    ("POST", "/v1/query", {"prompt": "hi", "image": "data:image/png,abc"}, None, 400, "';base64,'", "image"),
    ("POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(png(4, 4)).decode()}, None, 400, "at least 8 pixels",
     "image"),
    ("POST", "/v1/query", {"prompt": "hi", "image": base64.b64encode(png(600, 400)).decode()}, None, 413, "0.2 MP", "image"),
    ("POST", "/v1/query", b"hello", "text/plain", 415, "not accepted", None),
    ("POST", "/v1/query", b"--x\r\n\r\n", "multipart/form-data", 400, "multipart", None),
    ("POST", "/v1/query?prompt=hi", cv2.imencode(".png", np.zeros((1000, 2000, 3), np.uint8))[1].tobytes(), "image/png", 413,
     "2000x1000 (2.0 MP); the limit is 0.2 MP", "image"),
    ("POST", "/v1/query?prompt=hi", png()[:100], "image/png", 400, "image", "image"),
    ("POST", "/v1/query", png(), "image/png", 400, "no prompt", "prompt"),
    ("POST", "/v1/query?max_new_tokens=x", {"prompt": "hi"}, None, 400, "integer", "max_new_tokens"),
    ("POST", "/v1/query?colour=red", {"prompt": "hi"}, None, 400, "unknown parameter `colour`", "colour"),
    ("POST", "/v1/chat/completions", {"messages": []}, None, 400, "at least 1 item", "messages"),
    ("POST", "/v1/chat/completions", {"messages": "hi"}, None, 400, "array", "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, None, 400, "robot", "messages[0]"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, None, 400, "string", "messages[0].content"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, None, 400, "last message",
     "messages[0].role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.jpg"}}, {"type": "text", "text": "hi"}]}]},
     None, 400, "does not fetch URLs", "messages[0].content[0].image_url.url"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, None, 400, "audio",
     "messages[0].content[0]"),
    ("POST", "/v1/chat/completions", {"messages": USER, "n": 2}, None, 400, "one choice", "n"),
    ("POST", "/v1/chat/completions", {"messages": USER, "temperature": "hot"}, None, 400, "number", "temperature"),
    ("POST", "/v1/chat/completions", {"messages": USER, "stop": ["a"] * 5}, None, 400, "at most 4", "stop"),
    ("POST", "/v1/chat/completions", {"messages": USER, "stream": "yes"}, None, 400, "boolean", "stream"),
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 10**6}, None, 400, "less than or equal to 64",
     "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 0, "max_completion_tokens": 5}, None, 400,
     "greater than or equal to 1", "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": USER, "stream": True, "stream_options": {"include_usage": None}}, None,
     400, "boolean", "stream_options.include_usage"),
    ("POST", "/v1/chat/completions", b"x", "text/plain", 415, "application/json", None),
    ("GET", "/v1/nothing", None, None, 404, "no such endpoint", None),
    ("PUT", "/v1/query", b"{}", "application/json", 405, "takes POST", None),
    ("DELETE", "/", None, None, 405, "takes GET", None),
    ("BREW", "/healthz", None, None, 405, "takes GET", None),
]


def test_bad_input_is_4xx_in_openai_shape_and_the_server_keeps_serving(server):
    base, _ = server
    for method, path, body, ctype, status, fragment, param in BAD:
        headers = {"Content-Type": ctype} if ctype else None
        st, hdrs, out = request(base, method, path, body, headers)
        err = error_of(out)
        assert st == status and fragment in err["message"], (method, path, str(body)[:60], st, err)
        assert err["param"] == param, (str(body)[:60], err)
        if st == 405:
            assert "OPTIONS" in hdrs["allow"]
    # below the HTTP client: oversized, garbled and chunked bodies, and broken requests: JSON errors, never HTML
    resp = raw(base, b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 9999999\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 413") and b"the limit is 2097152" in resp
    body = json.dumps({"prompt": "hi", "image": B64}).encode()
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    resp = raw(base, b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked"
                     b"\r\nConnection: close\r\n\r\n" + chunked, timeout=30)
    assert resp.startswith(b"HTTP/1.1 200") and POINT_ANSWER.encode() in resp
    for bad in (b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Length: -5\r\n\r\n",
                b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Length: \xb2\r\n\r\n",   # the 500 of the old server
                b"\x16\x03\x01 garbage\r\n\r\n",                                        # e.g. TLS to a plain port
                b"GET /\xb2 HTTP/1.1\r\nHost: localhost\r\n\r\n"):
        resp = raw(base, bad)
        assert resp.startswith(b"HTTP/1.1 400") and b'"code": "invalid_request"' in resp, (bad, resp[:200])
    resp = raw(base, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 431") and b"application/json" in resp
    resp = raw(base, b"GET /" + b"a" * 40000 + b" HTTP/1.1\r\nHost: localhost\r\n\r\n")
    assert resp.startswith(b"HTTP/1.1 431")
    # still serving
    st, _, out = request(base, "POST", "/v1/query", {"prompt": "hi", "image": B64})
    assert st == 200 and json.loads(out)["answers"][0]["text"] == POINT_ANSWER


def test_keep_alive_and_unread_bodies(server):
    import http.client
    base, _ = server
    c = http.client.HTTPConnection(*hostport(base), timeout=10)
    for _ in range(3):  # one connection, several requests
        c.request("GET", "/healthz")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Connection") != "close"
        r.read()
    # an error before the body was read: the body is drained, not parsed as the next request
    c.request("POST", "/v1/nowhere", body=b"GET /x HTTP/1.1\r\n\r\n" * 300, headers={"Content-Type": "application/json"})
    r = c.getresponse()
    assert r.status == 404
    r.read()
    c.request("GET", "/healthz")
    r = c.getresponse()
    assert r.status == 200 and json.loads(r.read())["status"] == "ok"
    c.close()


def test_full_queue_is_503_with_retry_after_and_timeouts_are_not_retryable(pointing_bundle):
    from molmo_edge.runtime.session import Molmo
    body = {"prompt": "hi", "image": B64}
    with serving(pointing_bundle, limits=Limits(queue_size=1, timeout_s=0.6)) as (base, st):
        gate = threading.Event()
        st.worker.submit(lambda job: gate.wait(10))        # the model is busy ...
        time.sleep(0.1)
        st.worker.submit(lambda job: None)                 # ... and the queue is full
        s, hdrs, out = request(base, "POST", "/v1/query", body)
        assert s == 503 and int(hdrs["retry-after"]) >= 1 and error_of(out)["code"] == "model_busy"
        s, hdrs, _ = request(base, "POST", "/v1/chat/completions", {"messages": USER, "stream": True})
        assert s == 503 and "retry-after" in hdrs
        assert request(base, "GET", "/healthz")[0] == 200   # cheap endpoints never wait for the model
        gate.set()
        time.sleep(0.2)
        # a request that waits in the queue past its timeout: 503 too (overloaded, retry), not 504
        gate = threading.Event()
        st.worker.submit(lambda job: gate.wait(3))
        time.sleep(0.1)
        s, hdrs, out = request(base, "POST", "/v1/query", body)
        assert s == 503 and "waited" in error_of(out)["message"] and "retry-after" in hdrs
        gate.set()
        time.sleep(0.2)
        assert request(base, "POST", "/v1/query", body)[0] == 200
    with serving(pointing_bundle, model=SlowModel(Molmo.load(pointing_bundle), 0.3), limits=Limits(timeout_s=1.0)) as (base, st):
        for path, b in (("/v1/query", body), ("/v1/chat/completions", {"messages": USER})):
            s, hdrs, out = request(base, "POST", path, b)
            err = error_of(out)
            assert s == 504 and err["code"] == "generation_timeout" and hdrs["x-should-retry"] == "false", (path, err)
        # streamed: the text so far was sent, then an error event says why it stopped
        s, _, out = request(base, "POST", "/v1/chat/completions", {"messages": USER, "stream": True})
        events = [json.loads(e[6:]) for e in out.decode().split("\n\n") if e.startswith("data: {")]
        assert s == 200 and events[-1]["error"]["code"] == "generation_timeout"
        assert any(e.get("choices") and e["choices"][0]["delta"].get("content") for e in events)
        t = time.monotonic()
        st.model.delay = 0.0
        s, _, out = request(base, "POST", "/v1/query", body)  # the overrun was cancelled, the worker is free
        assert s == 200 and time.monotonic() - t < 1.5
        assert st.worker.failed >= 1


def test_requests_in_progress_cap_spares_healthz(pointing_bundle):
    with serving(pointing_bundle, limits=Limits(max_connections=1)) as (base, st):
        st.in_progress = 1   # as if one request held the only slot
        s, hdrs, out = request(base, "GET", "/v1/models")
        assert s == 503 and hdrs["retry-after"] == "1" and error_of(out)["code"] == "too_many_requests_in_progress"
        assert request(base, "GET", "/healthz")[0] == 200
        st.in_progress = 0
        assert request(base, "GET", "/v1/models")[0] == 200
        t = time.monotonic()
        while st.in_progress and time.monotonic() - t < 2:
            time.sleep(0.01)
        assert st.in_progress == 0   # every slot taken was given back


def test_socket_cap(pointing_bundle):
    with serving(pointing_bundle, limits=Limits(max_sockets=2)) as (base, st):
        idle = [socket.create_connection(hostport(base)) for _ in range(2)]
        time.sleep(0.2)
        assert raw(base, b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n") == b""   # closed at once, nothing read
        for s in idle:
            s.close()
        time.sleep(0.3)
        assert request(base, "GET", "/healthz")[0] == 200


def _busy_wait(st, seconds):
    t = time.monotonic()
    while st.worker.busy and time.monotonic() - t < seconds:
        time.sleep(0.05)
    return time.monotonic() - t


def test_clients_leaving_free_the_model_streaming_or_not(pointing_bundle):
    from molmo_edge.runtime.session import Molmo
    with serving(pointing_bundle, model=SlowModel(Molmo.load(pointing_bundle), 0.3)) as (base, st):
        for stream in (True, False):
            body = json.dumps({"messages": USER, "stream": stream}).encode()
            s = socket.create_connection(hostport(base), timeout=10)
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            if stream:
                assert b"text/event-stream" in s.recv(4096)
            else:
                time.sleep(0.5)
                assert st.worker.busy
            s.close()
            assert _busy_wait(st, 5) < 1.5, stream  # cancelled at the next token, not after all of them
        st.model.delay = 0
        assert request(base, "POST", "/v1/chat/completions", {"messages": USER})[0] == 200


def test_crops_are_capped_and_the_context_is_checked_before_vision(pointing_bundle):
    with serving(pointing_bundle, limits=Limits(max_crops=2, max_prompt_chars=30000, max_new_tokens=64)) as (base, st):
        s, _, out = request(base, "POST", "/v1/query", {"prompt": "hi", "image": B64, "max_crops": 3})
        assert s == 400 and error_of(out)["param"] == "max_crops" and "less than or equal to 2" in error_of(out)["message"]
        s, _, out = request(base, "GET", "/openapi.json")
        assert "at most this server's --max-crops (2)" in out.decode()
        s, _, out = request(base, "POST", "/v1/query", {"prompt": "hi", "image": B64, "max_crops": 2})
        assert s == 200
        vision = st.model.stats["vision_runs"]
        long = "Point to the cup. " * 1500   # several thousand tokens: past the tiny model's context
        for path, body in (("/v1/query", {"prompt": long, "image": base64.b64encode(png(300, 200, 7)).decode()}),
                           ("/v1/chat/completions", {"messages": [{"role": "user", "content": [
                               {"type": "text", "text": long}, {"type": "image_url", "image_url": {
                                   "url": "data:image/png;base64," + base64.b64encode(png(300, 200, 8)).decode()}}]}]})):
            s, _, out = request(base, "POST", path, body)
            err = error_of(out)
            assert s == 400 and err["code"] == "context_length_exceeded" and "context is" in err["message"], (path, err)
        assert st.model.stats["vision_runs"] == vision   # refused before the vision pass
        s, _, out = request(base, "POST", "/v1/chat/completions", {"messages": USER, "max_tokens": 64})
        assert s == 200


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
        assert p.wait(timeout=40) == 0 and "stopped" in p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
    r = subprocess.run([sys.executable, "-m", "molmo_edge.runtime.cli", "serve", pointing_bundle, "--source", "/dev/video97"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: no camera at /dev/video97" in r.stderr and "Traceback" not in r.stderr
