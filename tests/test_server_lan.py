"""Safe on a robot's network: API keys in headers only (any printable characters), a one-time kiosk login
link that becomes a session cookie and never reaches the log, the Host allow-list (DNS rebinding), the
Origin check (cross-site requests), CORS off unless configured, and the warning for an open bind."""
import base64
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'molmo-edge[serve]'")
from serve_helpers import error_of, hostport, png, raw, request, serving, shared_pointing_bundle  # noqa: E402

from molmo_edge.runtime.errors import MolmoEdgeError  # noqa: E402
from molmo_edge.runtime.serve.security import check_key  # noqa: E402
from molmo_edge.runtime.serve.server import Limits  # noqa: E402

KEY = "s3cret; with spaces, clé=☃"   # any printable characters, ';' and non-ASCII included


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    return shared_pointing_bundle(tmp_path_factory)


def get(base, path, headers=b""):
    """A raw GET (http.client cannot send UTF-8 header values)."""
    return raw(base, b"GET " + path.encode() + b" HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n" + headers + b"\r\n")


def test_keys_only_in_headers_and_the_login_link(bundle, caplog):
    caplog.set_level(logging.INFO, logger="molmo_edge.server")
    with serving(bundle, api_key=KEY, access_log=True) as (base, st):
        assert request(base, "GET", "/healthz")[0] == 200
        for path in ("/", "/v1/models", "/metrics", "/openapi.json", "/v1/frame", "/v1/models/molmo"):
            s, hdrs, out = request(base, "GET", path)
            assert s == 401 and hdrs["www-authenticate"] == "Bearer" and error_of(out)["code"] == "invalid_api_key"
        assert request(base, "POST", "/v1/query", {"prompt": "hi"})[0] == 401
        utf8 = KEY.encode()
        assert get(base, "/v1/models", b"Authorization: Bearer " + utf8 + b"\r\n").startswith(b"HTTP/1.1 200")
        assert get(base, "/v1/models", b"X-API-Key: " + utf8 + b"\r\n").startswith(b"HTTP/1.1 200")
        assert get(base, "/v1/models", b"Authorization: Bearer wrong\r\n").startswith(b"HTTP/1.1 401")
        q = KEY.replace(" ", "%20").encode("ascii", "ignore").decode()
        assert request(base, "GET", f"/v1/models?key={q}")[0] == 401          # never in the URL
        assert request(base, "GET", f"/?key={q}")[0] == 401

        # the one-time login link: a cookie (not the key) and a redirect; a second use fails
        token = st.access.new_login_token()
        s, hdrs, _ = request(base, "GET", f"/login?token={token}")
        assert s == 303 and hdrs["location"] == "/"
        cookie = hdrs["set-cookie"]
        assert cookie.startswith("molmo_session=") and "HttpOnly" in cookie and "SameSite=strict" in cookie
        assert KEY not in cookie
        session = cookie.split(";")[0]
        assert request(base, "GET", "/", headers={"Cookie": session})[0] == 200
        assert request(base, "GET", "/v1/models", headers={"Cookie": session})[0] == 200
        assert request(base, "GET", "/v1/models", headers={"Cookie": "molmo_session=forged"})[0] == 401
        s, _, out = request(base, "GET", f"/login?token={token}")
        assert s == 401 and error_of(out)["code"] == "invalid_login_link"
        # a new link, minted with the key
        out = get(base, "/v1/models", b"")  # (unauthenticated: still 401)
        assert out.startswith(b"HTTP/1.1 401")
        s, _, out = request(base, "POST", "/v1/login-links", b"", {"X-API-Key": "x"})
        assert s == 401
        resp = raw(base, b"POST /v1/login-links HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n"
                         b"X-API-Key: " + utf8 + b"\r\n\r\n")
        link = json.loads(resp.split(b"\r\n\r\n", 1)[1])["url"]
        assert link.startswith("/login?token=") and request(base, "GET", link)[0] == 303
        time.sleep(0.2)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "/login" in logged and token not in logged and link.split("=")[1] not in logged   # never logged
    assert "GET /v1/models" in logged


def test_keys_must_be_printable():
    for bad in ("", " lead", "tab\there", "new\nline"):
        with pytest.raises(MolmoEdgeError, match="printable"):
            check_key(bad)
    assert check_key("ok; é ☃") == "ok; é ☃"


def test_host_allow_list_and_origin_check(bundle):
    body = json.dumps({"prompt": "hi", "image": base64.b64encode(png()).decode()}).encode()

    def post(base, host, origin=None):
        o = b"Origin: " + origin.encode() + b"\r\n" if origin else b""
        return raw(base, b"POST /v1/query HTTP/1.1\r\nHost: " + host.encode() + b"\r\nContent-Type: application/json\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n" % len(body) + o + b"\r\n" + body, timeout=30)
    with serving(bundle, limits=Limits(allow_hosts=("robot.local",))) as (base, st):
        port = hostport(base)[1]
        for host in ("attacker.example", "attacker.example:%d" % port, "localhost.attacker.example"):
            resp = raw(base, b"GET /v1/models HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 421") and b"host_not_allowed" in resp, host
        for host in ("localhost:%d" % port, "127.0.0.1:%d" % port, "[::1]:%d" % port, "192.168.1.20:%d" % port,
                     "ROBOT.local:%d" % port, socket.gethostname()):
            resp = raw(base, b"GET /v1/models HTTP/1.1\r\nHost: " + host.encode() + b"\r\nConnection: close\r\n\r\n")
            assert resp.startswith(b"HTTP/1.1 200"), host
        # cross-site requests that change state (run the model) are refused; same-origin ones are not
        resp = post(base, f"localhost:{port}", "http://evil.example")
        assert resp.startswith(b"HTTP/1.1 403") and b"cross_site_request" in resp
        assert post(base, f"localhost:{port}", f"http://localhost:{port}").startswith(b"HTTP/1.1 200")
        assert post(base, f"localhost:{port}").startswith(b"HTTP/1.1 200")     # no Origin: not a browser page
        # no CORS headers unless configured
        resp = raw(base, b"OPTIONS /v1/query HTTP/1.1\r\nHost: localhost\r\nOrigin: http://evil.example\r\n"
                         b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n")
        assert resp.startswith(b"HTTP/1.1 204") and b"access-control-allow-origin" not in resp.lower()
    with serving(bundle, limits=Limits(cors_origins=("http://dash.local:3000",), allow_hosts=("*",))) as (base, st):
        resp = raw(base, b"OPTIONS /v1/query HTTP/1.1\r\nHost: anything.example\r\nOrigin: http://dash.local:3000\r\n"
                         b"Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n").lower()
        assert resp.startswith(b"http/1.1 204") and b"access-control-allow-origin: http://dash.local:3000" in resp
        assert b"access-control-allow-headers: authorization, content-type, x-api-key" in resp
        resp = post(base, "anything.example", "http://dash.local:3000")
        assert resp.startswith(b"HTTP/1.1 200") and b"access-control-allow-origin: http://dash.local:3000" in resp.lower()
        assert post(base, "anything.example", "http://evil.example").startswith(b"HTTP/1.1 403")


def test_binding_beyond_loopback_without_a_key_warns(bundle):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MOLMO_EDGE_API_KEY", None)
    p = subprocess.Popen([sys.executable, "-m", "molmo_edge.runtime.cli", "serve", bundle, "--host", "0.0.0.0", "--port", "0"],
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = p.stderr.readline()
            lines.append(line)
            if "serving on" in line or not line:
                break
        text = "".join(lines)
        assert "warning: serving on 0.0.0.0 without --api-key" in text, text
    finally:
        p.terminate()
        p.wait(timeout=40)
    p = subprocess.run([sys.executable, "-m", "molmo_edge.runtime.cli", "serve", bundle, "--api-key", "bad\tkey"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "printable" in p.stderr and "Traceback" not in p.stderr
