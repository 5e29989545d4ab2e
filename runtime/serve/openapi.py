"""The server's API as an OpenAPI 3.1 document, with its limits in it (GET /openapi.json; the fuzz
benchmark generates requests from it)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from molmo_edge.runtime.serve.server import Limits


def openapi(lim: Limits) -> dict[str, Any]:
    """The API as OpenAPI 3.1, with the server's limits in it."""
    err = {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    prompt = {"type": "string", "minLength": 1, "maxLength": lim.max_prompt_chars}
    opts = {"max_new_tokens": {"type": "integer", "minimum": 1, "maximum": lim.max_new_tokens, "default": lim.default_new_tokens},
            "max_crops": {"type": "integer", "minimum": 1, "maximum": 64}}
    std = {"400": err, "401": err, "413": err, "415": err, "503": err, "504": err}
    image_ok = {"200": {"description": "the latest camera frame", "content": {"image/jpeg": {}}}, "404": err, "503": err}
    part = {"oneOf": [
        {"type": "object", "required": ["type", "text"], "properties": {"type": {"const": "text"}, "text": {"type": "string"}}},
        {"type": "object", "required": ["type", "image_url"], "properties": {
            "type": {"const": "image_url"},
            "image_url": {"type": "object", "required": ["url"], "properties": {"url": {"type": "string", "pattern": "^data:"}}}}}]}
    return {
        "openapi": "3.1.0",
        "info": {"title": "molmo-edge", "version": "1", "description": "Molmo vision-language model, offline. "
                 "Points are in pixels of the image and in percent of its width/height."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"},
                                "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}},
            "schemas": {
                "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"}, "code": {"type": "integer"}}}}},
                "Point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"},
                                                           "x_pct": {"type": "number"}, "y_pct": {"type": "number"},
                                                           "label": {"type": "string"},
                                                           "image": {"type": ["integer", "null"]},
                                                           "time": {"type": ["number", "null"]},
                                                           "frame": {"type": ["integer", "null"]},
                                                           "object": {"type": ["integer", "null"]}}},
                "Answer": {"type": "object", "properties": {
                    "prompt": {"type": "string"}, "text": {"type": "string"},
                    "token_ids": {"type": "array", "items": {"type": "integer"}},
                    "points": {"type": "array", "items": {"$ref": "#/components/schemas/Point"}},
                    "count": {"type": ["integer", "null"]}, "stop_reason": {"type": "string"},
                    "timings": {"type": "object", "additionalProperties": {"type": "number"}}}},
                "QueryJSON": {"type": "object", "additionalProperties": False, "properties": {
                    "prompt": prompt, "prompts": {"type": "array", "items": prompt, "minItems": 1, "maxItems": lim.max_prompts},
                    "image": {"type": "string", "description": "base64 image bytes or a data: URI; omit for the latest camera frame"},
                    **opts}},
                "ChatRequest": {"type": "object", "required": ["messages"], "properties": {
                    "model": {"type": "string"},
                    "messages": {"type": "array", "minItems": 1, "maxItems": lim.max_messages, "items": {
                        "type": "object", "required": ["role", "content"], "properties": {
                            "role": {"enum": ["system", "user", "assistant"]},
                            "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": part}]}}}},
                    "max_tokens": opts["max_new_tokens"], "max_completion_tokens": opts["max_new_tokens"],
                    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
                    "top_p": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                    "seed": {"type": "integer", "minimum": 0}, "n": {"const": 1},
                    "stop": {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}, "maxItems": 4}]},
                    "stream": {"type": "boolean"}, "stream_options": {"type": "object", "properties": {
                        "include_usage": {"type": "boolean"}}},
                    "max_crops": opts["max_crops"]}},
            }},
        "security": [{"bearer": []}, {"apiKey": []}, {}],
        "paths": {
            "/v1/query": {"post": {
                "summary": "Answer prompts about an uploaded image or the latest camera frame",
                "parameters": [{"name": "prompt", "in": "query", "schema": prompt,
                                "description": "with a raw image/* body only"}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/QueryJSON"}},
                    "multipart/form-data": {"schema": {"type": "object", "properties": {
                        "image": {"type": "string", "format": "binary"}, "prompt": prompt, **opts}}},
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {"200": {"description": "answers", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "answers": {"type": "array", "items": {"$ref": "#/components/schemas/Answer"}},
                        "image": {"type": "object"}, "timings": {"type": "object"}}}}}}, **std}}},
            "/v1/chat/completions": {"post": {
                "summary": "OpenAI-compatible chat; images as data: URIs; stream=true answers with server-sent events",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/ChatRequest"}}}},
                "responses": {"200": {"description": "a chat.completion, or text/event-stream of chat.completion.chunk",
                                      "content": {"application/json": {}, "text/event-stream": {}}}, **std}}},
            "/v1/frame": {"get": {"summary": "The latest camera frame as JPEG",
                                  "parameters": [{"name": "points", "in": "query", "schema": {"type": "boolean"},
                                                  "description": "draw the last camera answer's points"}],
                                  "responses": image_ok}},
            "/v1/models": {"get": {"summary": "The served model", "responses": {"200": {"description": "model list"}}}},
            "/healthz": {"get": {"summary": "Liveness (no API key needed)", "security": [{}],
                                 "responses": {"200": {"description": "ok"}}}},
            "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text exposition"}}}},
            "/openapi.json": {"get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI 3.1"}}}},
            "/": {"get": {"summary": "The kiosk page", "responses": {"200": {"description": "HTML"}}}},
        },
    }
