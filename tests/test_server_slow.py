"""Slow clients must not lock out others: 64 sockets dripping their headers or bodies a byte at a time
while normal clients are served and /healthz answers at once; each phase has its own deadline."""
import base64
import json
import socket
import threading
import time

import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'molmo-edge[serve]'")
from serve_helpers import POINT_ANSWER, hostport, png, request, serving, shared_pointing_bundle  # noqa: E402

from molmo_edge.runtime.serve.server import Limits  # noqa: E402


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_pointing_bundle(tmp_path_factory)


class Dripper(threading.Thread):
    """Sends a request a byte every `every` seconds: in its headers, or (headers complete) in its body."""

    def __init__(self, base, phase, every=0.5):
        super().__init__(daemon=True)
        self.base, self.phase, self.every = base, phase, every
        self.answer, self.closed_after = b"", None
        self.stop = threading.Event()

    def run(self):
        s = socket.create_connection(hostport(self.base), timeout=60)
        head = b"POST /v1/query HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 50000\r\n"
        t0 = time.monotonic()
        try:
            if self.phase == "body":
                s.sendall(head + b"\r\n")
                data = b"{" + b" " * 49999
            else:
                data = head
            for b in data:
                if self.stop.is_set():
                    break
                s.sendall(bytes([b]))
                s.settimeout(self.every)
                try:
                    got = s.recv(65536)
                    if got:
                        self.answer += got
                    self.closed_after = time.monotonic() - t0
                    while got:
                        got = s.recv(65536)
                        self.answer += got
                    return
                except socket.timeout:
                    continue
        except OSError:
            self.closed_after = time.monotonic() - t0
        finally:
            s.close()


def test_64_dripping_clients_do_not_lock_out_normal_ones(bundle):
    body = {"prompt": "hi", "image": base64.b64encode(png()).decode()}
    lim = Limits(max_connections=4, header_timeout_s=4, body_timeout_s=5)
    with serving(bundle, limits=lim) as (base, st):
        drips = [Dripper(base, "headers" if i % 2 else "body") for i in range(64)]
        for d in drips:
            d.start()
        time.sleep(1.0)   # all 64 are connected and dripping
        assert st.open_sockets() >= 64
        t = time.monotonic()
        for _ in range(5):
            s, _, _ = request(base, "GET", "/healthz", timeout=5)
            assert s == 200
        assert (time.monotonic() - t) / 5 < 0.5          # healthz answers at once
        for _ in range(3):                                # and the model serves normal clients
            s, _, out = request(base, "POST", "/v1/query", body, timeout=30)
            assert s == 200 and json.loads(out)["answers"][0]["text"] == POINT_ANSWER
        assert request(base, "GET", "/v1/models")[0] == 200
        for d in drips:
            d.join(timeout=15)
        # each phase's deadline ended the drippers with a 408 in OpenAI's error shape
        headers = [d for d in drips if d.phase == "headers"]
        bodies = [d for d in drips if d.phase == "body"]
        assert all(d.answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in d.answer for d in headers)
        assert all(3.5 < d.closed_after < 8 for d in headers), [d.closed_after for d in headers]
        assert all(d.answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in d.answer for d in bodies)
        assert all(4.5 < d.closed_after < 9 for d in bodies), [d.closed_after for d in bodies]
        time.sleep(0.3)
        assert st.open_sockets() <= 2 and st.in_progress == 0


def test_idle_connections_are_closed(bundle):
    with serving(bundle, limits=Limits(header_timeout_s=1, keep_alive_s=1)) as (base, st):
        s = socket.create_connection(hostport(base), timeout=5)   # connects, sends nothing
        t = time.monotonic()
        assert s.recv(100) == b"" and time.monotonic() - t < 3   # closed quietly
        s.close()
