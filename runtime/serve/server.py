"""`molmo-edge serve`: one model behind a bounded queue, a JSON API, an OpenAI-compatible chat endpoint
and a kiosk page, on uvicorn + Starlette.

    molmo-edge serve bundle/ --source /dev/video0            # http://127.0.0.1:8000/ is the kiosk

Endpoints (the full schema, generated from the request models, is GET /openapi.json):

  POST /v1/query              image (multipart, base64 JSON, raw image/* body), the latest camera frame or
                              (Molmo2, "clip": S with --clip-history) its last S seconds as a video,
                              one or more prompts -> answers with points, count, timings
  POST /v1/chat/completions   OpenAI-compatible; images as data: URIs (Molmo v1: one; Molmo2: up to
                              --max-images, in order); "stream": true -> server-sent events
  GET  /v1/frame              latest camera frame as JPEG (?points=1 draws the last camera answer's points)
  GET  /v1/models, /v1/models/{id}, /healthz, /metrics (Prometheus), /openapi.json, / (the kiosk page)
  GET  /login?token=...       one-time kiosk login link -> session cookie; POST /v1/login-links mints one

Limits per phase: headers (--header-timeout), body (--max-body-mb within --body-timeout), queue wait and
generation (--timeout each), requests in progress (--max-connections), open sockets (--max-sockets).
Layout: worker.py (model thread + queue), schemas.py (pydantic models), conversation.py (chat -> prompt,
context check), chat.py / query.py / endpoints.py (handlers), app.py (routes + guard), security.py,
protocol.py (header deadline), metrics.py, openapi.py; this file binds and runs them.
"""
from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any, Callable

import uvicorn

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.serve.app import build_app
from molmo_edge.runtime.serve.limits import Limits
from molmo_edge.runtime.serve.protocol import GuardedH11
from molmo_edge.runtime.serve.state import ServeState

__all__ = ["Limits", "ServeState", "Server", "make_server", "run_server"]


class Server:
    """A bound socket and a uvicorn server for one ServeState. `url` is known once bound (port 0 picks one)."""

    def __init__(self, st: ServeState, host: str = "127.0.0.1", port: int = 8000):
        self.st = st
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as e:
            self.sock.close()
            raise MolmoEdgeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or stop what "
                                 "uses it") from None
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{host if ':' not in host else f'[{host}]'}:{self.port}"
        lim = st.limits
        config = uvicorn.Config(build_app(st), http=GuardedH11.configured(lim.header_timeout_s, lim.body_timeout_s, lim.max_sockets),
                                lifespan="off", access_log=False, proxy_headers=False, log_level="warning", server_header=False,
                                timeout_keep_alive=max(1, round(lim.keep_alive_s)), ws="none",
                                timeout_graceful_shutdown=max(1, round(min(lim.timeout_s, 30))))
        self.uvicorn = uvicorn.Server(config)
        st.open_sockets = lambda: len(self.uvicorn.server_state.connections)
        self._thread: threading.Thread | None = None

    def serve_forever(self) -> None:
        """Run until stopped (SIGINT/SIGTERM in the main thread; `shutdown()` from another)."""
        self.uvicorn.run(sockets=[self.sock])

    def start(self) -> "Server":
        """Serve in a background thread (tests, benchmarks); returns once it accepts connections."""
        self._thread = threading.Thread(target=self.serve_forever, name="uvicorn", daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            threading.Event().wait(0.01)
        return self

    def shutdown(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=35)

    def close(self) -> None:
        self.sock.close()


def make_server(st: ServeState, host: str = "127.0.0.1", port: int = 8000) -> Server:
    return Server(st, host, port)


def run_server(st: ServeState, host: str = "127.0.0.1", port: int = 8000,
               on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM: stop accepting, let in-flight requests finish (up to --timeout, at most 30 s;
    then they are cancelled, and so is their generation), then close the worker and the camera."""
    server = make_server(st, host, port)

    async def announce() -> None:
        while not server.uvicorn.started:
            await asyncio.sleep(0.02)
        if on_ready:
            on_ready(server.url)
    orig = server.uvicorn.startup

    async def startup(*a: Any, **kw: Any) -> None:
        await orig(*a, **kw)
        asyncio.ensure_future(announce())
    server.uvicorn.startup = startup  # type: ignore[method-assign]
    try:
        server.serve_forever()
    finally:
        server.close()
        st.close()
        if st.source is not None:
            st.source.close()
