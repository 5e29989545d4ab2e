"""uvicorn's h11 protocol with the limits it lacks: a deadline for the request line and headers (a client
dripping bytes cannot hold a connection), a cap on open sockets, and JSON errors in OpenAI's shape for
malformed requests (431 for oversized headers) instead of plain text."""
from __future__ import annotations

import json
import socket
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from molmo_edge.runtime.serve.errors import error_body

MAX_HEADER_BYTES = 16 * 1024   # request line + headers; more is a 431


class _Conn(h11.Connection):
    """Remembers the last protocol error so the answer can carry its status (400, 431)."""
    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as e:
            self.last_error = e
            raise


class _CoalescingTransport:
    """Joins the writes of one event-loop turn into one send: uvicorn writes a response's head and body
    separately, and every send drops and retakes the GIL the model thread also wants."""

    def __init__(self, transport: Any, loop: Any):
        self._t, self._loop, self._buf, self._scheduled = transport, loop, [], False

    def write(self, data: bytes) -> None:
        if data:
            self._buf.append(bytes(data))
            if not self._scheduled:
                self._scheduled = True
                self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._buf:
            data, self._buf = b"".join(self._buf), []
            if not self._t.is_closing():
                self._t.write(data)

    def close(self) -> None:
        self._flush()
        self._t.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._t, name)


class GuardedH11(H11Protocol):
    header_timeout_s = 10.0
    body_timeout_s = 30.0
    max_sockets = 512

    def __init__(self, *a: Any, **kw: Any):
        super().__init__(*a, **kw)
        self.conn = _Conn(h11.SERVER, MAX_HEADER_BYTES)
        self._header_timer: Any = None

    @classmethod
    def configured(cls, header_timeout_s: float, body_timeout_s: float, max_sockets: int) -> type["GuardedH11"]:
        return type("GuardedH11", (cls,), {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s,
                                           "max_sockets": max_sockets})

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_sockets:   # beyond the cap nothing is read: close at once
            transport.close()
            return
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # uvicorn writes the headers and the body separately: without this, Nagle holds the body back
            # until the client's delayed ACK (40 ms per keep-alive request)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.transport = _CoalescingTransport(transport, self.loop)  # type: ignore[assignment]
        self._arm()

    def _arm(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm()   # the next request has begun: its headers have header_timeout_s to arrive
            buf = self.conn.trailing_data[0] + data
            if buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4) < 0 and len(buf) > MAX_HEADER_BYTES:
                self._send_error(431, f"the request line and headers are over {MAX_HEADER_BYTES} bytes")
                return
        try:
            super().data_received(data)
        except UnicodeDecodeError:   # a request target that is not ASCII
            self._send_error(400, "the request target is not ASCII; percent-encode it")
            return
        if self.conn.their_state is not h11.IDLE:
            self._disarm()

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        if self.conn.trailing_data[0]:   # a partial request: say why it is dropped
            self._send_error(408, f"the request headers did not arrive within {self.header_timeout_s:g} s")
        else:
            self.transport.close()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            # answered before the body was read (an error): uvicorn drains the rest, for body_timeout_s at most
            self.loop.call_later(self.body_timeout_s, self._drain_too_slow, self.conn)

    def _drain_too_slow(self, conn: h11.Connection) -> None:
        if self.conn is conn and conn.their_state is h11.SEND_BODY and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        e = self.conn.last_error
        status = getattr(e, "error_status_hint", 400) if e is not None else 400
        what = "the request headers are too large" if status == 431 else f"malformed HTTP request ({str(e or msg)[:120]})"
        self._send_error(status, what)

    def _send_error(self, status: int, message: str) -> None:
        body = json.dumps(error_body(status, message)).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}.get(status, b"Error")
        head = (b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n"
                % (status, reason, len(body)))
        if not self.transport.is_closing():
            self.transport.write(head + body)
            self.transport.close()
