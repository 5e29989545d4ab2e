"""API errors in OpenAI's shape: {"error": {"message", "type", "param", "code"}} with string codes."""
from __future__ import annotations

import json
from typing import Any

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error", 404: "not_found_error",
          405: "invalid_request_error", 408: "timeout_error", 409: "invalid_request_error", 411: "invalid_request_error",
          413: "invalid_request_error", 415: "invalid_request_error", 421: "invalid_request_error",
          431: "invalid_request_error", 503: "overloaded_error", 504: "timeout_error"}
_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 411: "length_required", 413: "request_too_large", 415: "unsupported_media_type",
          421: "misdirected_request", 431: "headers_too_large", 500: "internal_error", 503: "overloaded",
          504: "generation_timeout"}


class APIError(Exception):
    """An answer other than 200: status, one line saying what to fix, the offending parameter, a string code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code or _CODES.get(status, "error")
        self.headers = dict(headers or {})
        if close:
            self.headers["Connection"] = "close"

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error"),
                      "param": param, "code": code or _CODES.get(status, "error")}}


def error_bytes(status: int, message: str, param: str | None = None, code: str | None = None) -> bytes:
    return json.dumps(error_body(status, message, param, code)).encode()
