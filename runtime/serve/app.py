"""The ASGI application: Starlette routes behind one guard that checks, in order, the Host, OPTIONS and
CORS, the API key, cross-site origins and the request-slot cap, and counts every request."""
from __future__ import annotations

import asyncio
import logging
import time
from http.cookies import CookieError, SimpleCookie
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from molmo_edge.runtime.serve import endpoints
from molmo_edge.runtime.serve.bodies import error_response, take_slot
from molmo_edge.runtime.serve.chat import chat_completions
from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.query import query
from molmo_edge.runtime.serve.security import same_origin
from molmo_edge.runtime.serve.state import ServeState

log = logging.getLogger("molmo_edge.server")
_timeout = getattr(asyncio, "timeout", None)   # 3.11+: no task per send (wait_for makes one)

# path, methods, endpoint, needs the API key
ROUTES: list[tuple[str, tuple[str, ...], Any, bool]] = [
    ("/", ("GET",), endpoints.kiosk, True),
    ("/login", ("GET",), endpoints.login, False),
    ("/healthz", ("GET",), endpoints.healthz, False),
    ("/metrics", ("GET",), endpoints.metrics, True),
    ("/openapi.json", ("GET",), endpoints.openapi_json, True),
    ("/v1/models", ("GET",), endpoints.models, True),
    ("/v1/models/{model_id}", ("GET",), endpoints.model, True),
    ("/v1/frame", ("GET",), endpoints.frame, True),
    ("/v1/query", ("POST",), query, True),
    ("/v1/chat/completions", ("POST",), chat_completions, True),
    ("/v1/login-links", ("POST",), endpoints.login_links, True),
]
PUBLIC = {p for p, _, _, auth in ROUTES if not auth}
_METHODS = {p: m for p, m, _, _ in ROUTES}
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def route_of(path: str) -> str | None:
    if path in _METHODS:
        return path
    if path.startswith("/v1/models/") and "/" not in path[len("/v1/models/"):]:
        return "/v1/models/{model_id}"
    return None


def allow(route: str) -> str:
    methods = _METHODS[route]
    return ", ".join(methods + (("HEAD",) if "GET" in methods else ()) + ("OPTIONS",))


class Guard:
    """Checks before routing, request accounting after. Pure ASGI (no buffering of streamed answers)."""

    def __init__(self, app: Any, st: ServeState):
        self.app, self.st = app, st
        cors = st.limits.cors_origins
        self.cors_any, self.cors = "*" in cors, {o.rstrip("/").lower() for o in cors if o != "*"}

    def cors_allowed(self, origin: str | None) -> bool:
        return bool(origin) and (self.cors_any or origin.rstrip("/").lower() in self.cors)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        st, t0 = self.st, time.monotonic()
        headers: dict[bytes, bytes] = {}
        for k, v in scope["headers"]:
            headers.setdefault(k, v)
        origin = headers.get(b"origin", b"").decode("latin-1") or None
        route = route_of(scope["path"])
        status = [0]
        extra: list[tuple[bytes, bytes]] = []
        if self.cors_allowed(origin):
            extra = [(b"access-control-allow-origin", b"*" if self.cors_any else origin.encode("latin-1")),
                     (b"vary", b"Origin"),
                     (b"access-control-expose-headers", b"Retry-After, X-Frame-Id, X-Frame-Timestamp")]
        write_timeout = st.limits.body_timeout_s

        async def guarded_send(msg: dict) -> None:
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
                if extra:
                    msg = {**msg, "headers": list(msg.get("headers", [])) + extra}
            # a client that stops reading must not hold its slot forever
            if _timeout is not None:
                async with _timeout(write_timeout):
                    await send(msg)
            else:
                await asyncio.wait_for(send(msg), write_timeout)
        flags = scope.setdefault("molmo", {})
        try:
            refusal = self.refuse(scope, headers, origin, route)
            if refusal is not None:
                await refusal(scope, receive, guarded_send)
            else:
                await self.app(scope, receive, guarded_send)
        except APIError as e:
            await error_response(e)(scope, receive, guarded_send)
        finally:
            if flags.get("slot"):
                st.in_progress -= 1
            st.metrics.record(route or "other", status[0], time.monotonic() - t0)
            if st.access_log:   # the path only: query strings may carry login tokens
                client = scope.get("client") or ("-", 0)
                log.info("%s %s %s %d %.1f ms", client[0], scope["method"], scope["path"][:200], status[0],
                         (time.monotonic() - t0) * 1e3)

    def refuse(self, scope: dict, headers: dict[bytes, bytes], origin: str | None, route: str | None) -> Response | None:
        st, method = self.st, scope["method"]
        host = headers.get(b"host", b"").decode("latin-1")
        if not st.hosts.allowed(host):
            raise APIError(421, f"Host {host[:80]!r} is not served here (DNS rebinding guard); start the server with "
                                f"--allow-host NAME to accept it", None, "host_not_allowed")
        if method == "OPTIONS":
            if route is None:
                raise APIError(404, f"no such endpoint {scope['path'][:100]!r}; see /openapi.json", None, "not_found")
            h = {"Allow": allow(route)}
            if self.cors_allowed(origin):
                h.update({"Access-Control-Allow-Methods": allow(route),
                          "Access-Control-Allow-Headers": "Authorization, Content-Type, X-API-Key",
                          "Access-Control-Max-Age": "600"})
            return Response(status_code=204, headers=h)
        if route not in PUBLIC and not st.access.authorized(headers, _cookies(headers)):
            raise APIError(401, "missing or wrong API key: send Authorization: Bearer KEY or X-API-Key: KEY (for the kiosk, "
                                "open the login link `molmo-edge serve` printed)", None, "invalid_api_key",
                           {"WWW-Authenticate": "Bearer"})
        if method not in SAFE_METHODS and origin and not same_origin(origin, host) and not self.cors_allowed(origin):
            raise APIError(403, f"cross-site request from {origin[:80]} refused; allow the origin with --cors-origin",
                           None, "cross_site_request")
        if route not in ("/healthz", None) and method in ("GET", "HEAD"):
            take_slot(st, scope)
        return None


def _cookies(headers: dict[bytes, bytes]) -> dict[str, str]:
    raw = headers.get(b"cookie")
    if not raw:
        return {}
    c = SimpleCookie()
    try:
        c.load(raw.decode("latin-1"))
    except CookieError:
        return {}
    return {k: m.value for k, m in c.items()}


async def _api_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, APIError)
    return error_response(e)


async def _http_error(request: Request, e: Exception) -> Response:
    assert isinstance(e, HTTPException)
    if e.status_code == 404:
        return error_response(APIError(404, f"no such endpoint {request.url.path[:100]!r}; see /openapi.json", None,
                                       "not_found"))
    if e.status_code == 405:
        route = route_of(request.url.path)
        return error_response(APIError(405, f"{request.url.path[:100]} takes {' or '.join(_METHODS[route])}, "
                                            f"not {request.method[:20]}", None, "method_not_allowed",
                                       {"Allow": allow(route)}))
    return error_response(APIError(e.status_code, str(e.detail)[:200], None, None, dict(e.headers or {})))


async def _internal(request: Request, e: Exception) -> Response:
    log.error("internal error on %s %s", request.method, request.url.path[:200], exc_info=e)
    return error_response(APIError(500, "internal server error (logged); please report it", None, "internal_error"))


def build_app(st: ServeState) -> Any:
    """The ASGI app for one ServeState."""
    app = Starlette(routes=[Route(p, fn, methods=list(m)) for p, m, fn, _ in ROUTES],
                    exception_handlers={APIError: _api_error, HTTPException: _http_error, Exception: _internal})
    app.state.serve = st
    return Guard(app, st)
