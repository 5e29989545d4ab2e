"""The small endpoints: kiosk page, login links, health, metrics, schema, models, camera frame."""
from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from molmo_edge.runtime.serve.bodies import SECURITY_HEADERS, json_response
from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.metrics import CONTENT_TYPE
from molmo_edge.runtime.serve.openapi import openapi
from molmo_edge.runtime.serve.security import COOKIE
from molmo_edge.runtime.serve.state import ServeState

KIOSK_CSP = ("default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
             "script-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'")


def _st(request: Request) -> ServeState:
    return request.app.state.serve


async def kiosk(request: Request) -> Response:
    return Response(_st(request).kiosk, 200, {**SECURITY_HEADERS, "Content-Security-Policy": KIOSK_CSP,
                                              "X-Frame-Options": "DENY"}, "text/html; charset=utf-8")


async def login(request: Request) -> Response:
    """GET /login?token=T: a one-time link (printed at start, or from POST /v1/login-links) becomes a kiosk
    session cookie, then a redirect to the kiosk. The access log never shows the token."""
    st = _st(request)
    if st.api_key is None:
        return RedirectResponse("/", 303, SECURITY_HEADERS)
    sid = st.access.redeem(request.query_params.get("token", ""))
    if sid is None:
        raise APIError(401, "this login link is unknown or was already used; get a new one: POST /v1/login-links with "
                            "the API key (or restart `molmo-edge serve`, which prints one)", "token", "invalid_login_link")
    r = RedirectResponse("/", 303, SECURITY_HEADERS)
    r.set_cookie(COOKIE, sid, httponly=True, samesite="strict", path="/")
    return r


async def login_links(request: Request) -> Response:
    st = _st(request)
    if st.api_key is None:
        raise APIError(404, "this server has no API key: the kiosk needs no login", None, "no_api_key")
    return json_response({"url": f"/login?token={st.access.new_login_token()}"}, 201)


async def healthz(request: Request) -> Response:
    return json_response(_st(request).health())


async def metrics(request: Request) -> Response:
    return Response(_st(request).metrics.render(), 200, SECURITY_HEADERS, CONTENT_TYPE)


async def openapi_json(request: Request) -> Response:
    return json_response(openapi(_st(request)))


def _model(st: ServeState, name: str) -> dict:
    return {"id": name, "object": "model", "created": int(st.started), "owned_by": "molmo-edge"}


async def models(request: Request) -> Response:
    st = _st(request)
    return json_response({"object": "list", "data": [_model(st, n) for n in st.model_names]})


async def model(request: Request) -> Response:
    st = _st(request)
    name = request.path_params["model_id"]
    if name not in st.model_names:
        raise APIError(404, f"model `{name[:80]}` is not served here; this server serves {' and '.join(st.model_names)}",
                       "model", "model_not_found")
    return json_response(_model(st, name))


async def frame(request: Request) -> Response:
    st = _st(request)
    flag = request.query_params.get("points", "false").lower()
    if flag not in ("1", "0", "true", "false", "yes", "no"):
        raise APIError(400, f"`points` must be true or false (got {flag[:20]!r})", "points", "invalid_value")
    points = flag in ("1", "true", "yes")
    jpeg, f = await run_in_threadpool(st.frame_jpeg, points)
    return Response(jpeg, 200, {**SECURITY_HEADERS, "X-Frame-Id": str(f.id), "X-Frame-Timestamp": f"{f.timestamp:.3f}"},
                    "image/jpeg")
