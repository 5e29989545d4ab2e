"""GET /openapi.json: OpenAPI 3.1 built from the same pydantic models that validate requests, with this
server's limits in them (schemathesis and benchmarks/fuzz_openapi.py generate requests from it)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from molmo_edge.runtime.serve.schemas import IMAGE_B64_FORMAT, IMAGE_URI_FORMAT, NOT_BLANK

if TYPE_CHECKING:
    from molmo_edge.runtime.serve.state import ServeState

REF = "#/components/schemas/{model}"


def _components(models: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, m in models.items():
        s = m.model_json_schema(ref_template=REF)
        out.update(s.pop("$defs", {}))
        out[name] = s
    return out


def _json(name: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{name}"}}}


def _ok(name: str, description: str, status: str = "200") -> dict[str, Any]:
    return {status: {"description": description, "content": _json(name)}, "default": {"description": "an error",
                                                                                      "content": _json("Error")}}


def openapi(st: ServeState) -> dict[str, Any]:
    s, lim = st.schemas, st.limits
    schemas = _components({"ChatRequest": s.ChatRequest, "QueryJSON": s.QueryJSON, "QueryForm": s.QueryForm,
                           **s.responses})
    err = {"default": {"description": "an error (OpenAI's shape)", "content": _json("Error")}}
    binary = {"schema": {"type": "string", "format": "binary"}}
    prompt = {"type": "string", "minLength": 1, "maxLength": lim.max_prompt_chars, "pattern": NOT_BLANK}
    raw_params = [{"name": "prompt", "in": "query", "required": False, "style": "form", "explode": True,
                   "schema": {"type": "array", "items": prompt, "maxItems": lim.max_prompts},
                   "description": "more prompts (with a raw image/* body, the only way to send them: then at least one)"},
                  {"name": "max_new_tokens", "in": "query", "required": False,
                   "schema": {"type": "integer", "minimum": 1, "maximum": lim.max_new_tokens},
                   "description": "used where the body does not set it"},
                  {"name": "max_crops", "in": "query", "required": False,
                   "schema": {"type": "integer", "minimum": 1, "maximum": st.crops_cap},
                   "description": "used where the body does not set it"}]
    images = ("one image per conversation" if st.images_cap == 1 else
              f"up to {st.images_cap} images per conversation, in order (--max-images)")
    clips = (f" `/v1/query` with `clip: SECONDS` (at most {st.clip_cap:g}) asks about the camera's last seconds as a "
             "video; its points carry the `time` and `frame` they belong to." if st.clip_cap is not None else "")
    security = [{"bearer": []}, {"apiKey": []}] if st.api_key else []
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": "molmo-edge", "version": "2", "description":
                 f"{st.model_name} (a {st.family} vision-language model), offline: {images} in chat.{clips} Points "
                 f"are in pixels of the image and in percent of its width/height. Images are sent inline (format `{IMAGE_URI_FORMAT}`: a data: URI of a "
                 f"PNG/JPEG/WebP image, `{IMAGE_B64_FORMAT}`: the same or bare base64) and must be at least "
                 f"{lim.min_image_side} px a side and at most {lim.max_image_pixels / 1e6:g} MP. A generation over the "
                 f"{lim.timeout_s:g} s limit is a 504 with `x-should-retry: false`; a full queue a 503 with Retry-After."},
        "components": {"schemas": schemas},
        "paths": {
            "/v1/query": {"post": {
                "summary": "Answer prompts about an uploaded image, the latest camera frame"
                           + (" or the camera's last seconds (clip)" if st.clip_cap is not None else ""),
                "parameters": raw_params,
                "requestBody": {"required": True, "content": {
                    **_json("QueryJSON"),
                    "multipart/form-data": {"schema": {"$ref": "#/components/schemas/QueryForm"},
                                            "encoding": {"image": {"contentType": "image/png, image/jpeg"}}},
                    "image/png": binary, "image/jpeg": binary}},
                "responses": _ok("QueryResponse", "answers")}},
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI-compatible chat; stream=true answers with server-sent events",
                "requestBody": {"required": True, "content": _json("ChatRequest")},
                "responses": {"200": {"description": "a chat.completion, or an event stream of chat.completion.chunk",
                                      "content": {**_json("ChatCompletion"), "text/event-stream": {"schema": {
                                          "type": "object", "required": ["data"], "properties": {"data": {
                                              "type": "string", "description": "a JSON chat.completion.chunk, a JSON "
                                              "error (then the stream ends), or [DONE]"}}}}}},
                              **err}}},
            "/v1/frame": {"get": {"summary": "The latest camera frame as JPEG",
                                  "parameters": [{"name": "points", "in": "query", "required": False,
                                                  "schema": {"type": "boolean"},
                                                  "description": "draw the last camera answer's points"}],
                                  "responses": {"200": {"description": "JPEG", "content": {"image/jpeg": binary}}, **err}}},
            "/v1/models": {"get": {"summary": "The served model and its aliases", "responses": _ok("ModelList", "models")}},
            "/v1/models/{model_id}": {"get": {"summary": "One model", "parameters": [
                {"name": "model_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": _ok("Model", "the model")}},
            "/v1/login-links": {"post": {"summary": "A one-time kiosk login link (GET it to get a session cookie)",
                                         "responses": _ok("LoginLink", "the link", "201")}},
            "/login": {"get": {"summary": "Redeem a one-time login link: sets the kiosk cookie, redirects to /",
                               "security": [], "parameters": [{"name": "token", "in": "query", "required": False,
                                                               "schema": {"type": "string"}}],
                               "responses": {"303": {"description": "to the kiosk"}, **err}}},
            "/healthz": {"get": {"summary": "Liveness (no API key needed)", "security": [],
                                 "responses": _ok("Health", "ok")}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {
                "200": {"description": "text exposition", "content": {"text/plain": {"schema": {"type": "string"}}}}, **err}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}},
                **err}}},
            "/": {"get": {"summary": "The kiosk page", "responses": {
                "200": {"description": "HTML", "content": {"text/html": {"schema": {"type": "string"}}}}, **err}}},
        },
    }
    if security:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"},
                                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
        doc["security"] = security
    return doc
