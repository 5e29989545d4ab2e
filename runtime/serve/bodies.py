"""Request bodies under a size and a time limit, JSON answers, request slots and disconnect watching."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.state import ServeState

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(json.dumps(obj).encode(), status, {**SECURITY_HEADERS, **(headers or {})}, "application/json")


def error_response(e: APIError) -> Response:
    return json_response(e.body(), e.status, e.headers)


def take_slot(st: ServeState, scope: dict) -> None:
    """Count this request against --max-connections from here on (the guard gives the slot back)."""
    flags = scope.setdefault("molmo", {})
    if flags.get("slot"):
        return
    if st.in_progress >= st.limits.max_connections:
        raise APIError(503, f"too many requests in progress ({st.limits.max_connections}); retry in 1 s", None,
                       "too_many_requests_in_progress", {"Retry-After": "1"})
    st.in_progress += 1
    flags["slot"] = True


async def read_body(request: Request) -> bytes:
    """The whole body, at most --max-body-mb, within the body timeout; then a request slot is taken."""
    st: ServeState = request.app.state.serve
    lim = st.limits
    if st.worker.full():   # shed load before reading the body (uvicorn drains it: no reset for the uploader)
        raise st.worker.busy_error()
    cl = request.headers.get("content-length")
    if cl is not None and cl.isdigit() and int(cl) > lim.max_body_bytes:
        raise APIError(413, f"body is {cl} bytes; the limit is {lim.max_body_bytes} ({lim.max_body_bytes / (1 << 20):g} MiB): "
                            "send a smaller image", None, "request_too_large", close=True)
    chunks: list[bytes] = []
    size = 0

    async def pull() -> None:
        nonlocal size
        async for c in request.stream():
            size += len(c)
            if size > lim.max_body_bytes:
                raise APIError(413, f"body is over the limit of {lim.max_body_bytes} bytes: send a smaller image", None,
                               "request_too_large", close=True)
            chunks.append(c)
    try:
        await asyncio.wait_for(pull(), lim.body_timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        raise APIError(408, f"the body did not arrive within {lim.body_timeout_s:g} s; send it faster or smaller", None,
                       "request_timeout", close=True) from None
    except ClientDisconnect:
        raise APIError(400, "the client closed the connection during the body", None, "client_disconnected",
                       close=True) from None
    take_slot(st, request.scope)
    if st.worker.full():   # shed load before decoding an image nobody will run
        raise st.worker.busy_error()
    return b"".join(chunks)


def disconnect_watcher(request: Request):
    """An awaitable factory that returns when the client disconnects (the body must have been read)."""
    async def wait() -> None:
        while True:
            msg = await request.receive()
            if msg["type"] == "http.disconnect":
                return
    return wait
