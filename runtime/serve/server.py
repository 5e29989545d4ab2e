"""HTTP server: one model behind a bounded queue, a JSON API, an OpenAI-compatible chat endpoint and a kiosk page.

    molmo-edge serve bundle/ --source /dev/video0            # http://127.0.0.1:8000/ is the kiosk

Standard library only (http.server): nothing to install on a Jetson, and the surface is small
enough to check by hand. Endpoints (the full schema is GET /openapi.json):

  POST /v1/query              image (multipart, base64 JSON, raw image/* body) or the latest camera frame,
                              one or more prompts -> answers with points, count, timings
  POST /v1/chat/completions   OpenAI-compatible; images as data: URIs in image_url parts; "stream": true -> SSE
  GET  /v1/frame              latest camera frame as JPEG (?points=1 draws the last camera answer's points)
  GET  /v1/models, /healthz, /metrics (Prometheus), /openapi.json, / (the kiosk page)

Under load: a single worker thread owns the model; requests wait in a queue of `queue_size` and get
503 + Retry-After when it is full, or when they waited longer than the per-request timeout; a
request whose generation overruns the timeout is cancelled at the next token (504). Bodies, image
pixels, prompt lengths, new tokens and open connections are capped; every malformed input is a 4xx
with one line saying what to fix. With an API key, every path but /healthz needs it (Bearer, X-API-Key,
or the cookie the kiosk gets from /?key=KEY).
"""
from __future__ import annotations

import base64
import binascii
import concurrent.futures
import contextlib
import hmac
import io
import json
import logging
import math
import os
import queue
import re
import threading
import time
import uuid
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator
from urllib.parse import parse_qs, urlsplit

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.serve.openapi import openapi

__all__ = ["Limits", "App", "make_server", "run_server"]

log = logging.getLogger("molmo_edge.server")
STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_ROUTES = ("/", "/healthz", "/metrics", "/openapi.json", "/v1/models", "/v1/frame", "/v1/query", "/v1/chat/completions")


@dataclass
class Limits:
    max_body_bytes: int = 16 << 20
    max_image_pixels: int = 24_000_000
    min_image_side: int = 8            # smaller images carry nothing the model can see
    max_prompt_chars: int = 2000       # per prompt / per chat message
    max_prompts: int = 8
    max_messages: int = 32
    max_new_tokens: int = 512
    default_new_tokens: int = 128
    queue_size: int = 8                # requests waiting for the model (beyond the one running)
    timeout_s: float = 60.0            # whole request: queue wait + generation
    max_connections: int = 64          # open sockets; more get an immediate 503
    max_crops: int | None = None       # server-wide default crops per image


class HTTPError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None, close: bool = False):
        super().__init__(message)
        self.status, self.message, self.headers, self.close = status, message, headers or {}, close


class _Cancelled(Exception):
    """Raised inside generation when the request's client is gone or its time is up."""


# --- the model worker ------------------------------------------------------------------------------

class _Job:
    def __init__(self, fn: Callable[["_Job"], Any]):
        self.fn, self.future, self.cancelled = fn, concurrent.futures.Future(), threading.Event()

    def check(self, _piece: str = "") -> None:
        if self.cancelled.is_set():
            raise _Cancelled()


class ModelWorker:
    """The one thread that calls the model (it is not thread-safe, and two at once would only thrash)."""

    def __init__(self, model: Any, queue_size: int):
        self.model, self.capacity = model, queue_size
        self._q: queue.Queue[_Job | None] = queue.Queue(maxsize=queue_size)
        self.busy = False
        self.service_s = 1.0           # moving average of a job's run time, for Retry-After
        self.completed = self.failed = 0
        self._thread = threading.Thread(target=self._run, name="model worker", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        return self._q.qsize()

    def full(self) -> bool:
        return self._q.full()

    def retry_after(self) -> int:
        return max(1, math.ceil(self.service_s * (self.depth + 1)))

    def submit(self, fn: Callable[[_Job], Any]) -> _Job:
        job = _Job(fn)
        try:
            self._q.put_nowait(job)
        except queue.Full:
            raise _busy(self) from None
        return job

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            self.busy, t = True, time.perf_counter()
            try:
                job.future.set_result(job.fn(job))
                self.completed += 1
            except BaseException as e:  # delivered to the waiting request, never kills the worker
                job.future.set_exception(e)
                self.failed += 1
            finally:
                self.busy = False
                self.service_s = 0.8 * self.service_s + 0.2 * (time.perf_counter() - t)

    def close(self) -> None:
        try:
            self._q.put(None, timeout=1)
        except queue.Full:
            pass


def _busy(worker: ModelWorker) -> HTTPError:
    ra = worker.retry_after()
    return HTTPError(503, f"the model is busy ({worker.depth} requests queued); retry in {ra} s", {"Retry-After": str(ra)})


# --- validation helpers --------------------------------------------------------------------------

def _type(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(type(v), "number")


def _int(d: dict, key: str, default: int | None, lo: int, hi: int) -> int | None:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, str) and re.fullmatch(r"\s*-?\d{1,9}\s*", v):  # form fields and query strings are text
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise HTTPError(400, f"`{key}` must be an integer from {lo} to {hi} (got {_type(v)} {str(v)[:40]!r})")
    if not lo <= v <= hi:
        raise HTTPError(400, f"`{key}` must be from {lo} to {hi} (got {v})")
    return v


def _float(d: dict, key: str, default: float, lo: float, hi: float) -> float:
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise HTTPError(400, f"`{key}` must be a number from {lo:g} to {hi:g} (got {_type(v)})")
    if not lo <= v <= hi:
        raise HTTPError(400, f"`{key}` must be from {lo:g} to {hi:g} (got {v:g})")
    return float(v)


def _text(v: Any, what: str, limit: int, allow_empty: bool = False) -> str:
    if not isinstance(v, str):
        raise HTTPError(400, f"{what} must be a string (got {_type(v)})")
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise HTTPError(400, f"{what} is not valid Unicode text (lone surrogate); send UTF-8 text") from None
    if not allow_empty and not v.strip():
        raise HTTPError(400, f"{what} is empty; ask a question, e.g. \"Point to the cup.\"")
    if len(v) > limit:
        raise HTTPError(400, f"{what} has {len(v)} characters; the limit is {limit}: shorten it")
    return v


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad encoding, absurd numbers, deep nesting
        raise HTTPError(400, f"body is not valid JSON ({str(e)[:120]}); send a JSON object") from None
    if not isinstance(data, dict):
        raise HTTPError(400, f"body must be a JSON object (got {_type(data)})")
    return data


def _multipart(body: bytes, ctype: str) -> dict[str, list[tuple[bytes, str | None]]]:
    """name -> [(content, filename)] of a multipart/form-data body (the cgi module is gone in 3.13)."""
    m = re.search(r'boundary="?([^";,]{1,200})"?', ctype)
    if not m:
        raise HTTPError(400, "multipart/form-data without a boundary; let your HTTP client build the Content-Type")
    chunks = body.split(b"--" + m.group(1).encode("latin-1"))
    if len(chunks) < 3:
        raise HTTPError(400, "multipart body has no parts; send fields `image` and `prompt`")
    fields: dict[str, list[tuple[bytes, str | None]]] = {}
    for part in chunks[1:]:
        if part.startswith(b"--"):
            break
        head, sep, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disp = re.search(rb'(?im)^content-disposition:[^\r\n]*?\bname="([^"]*)"(?:[^\r\n]*?\bfilename="([^"]*)")?', head)
        if not sep or not disp:
            raise HTTPError(400, "malformed multipart part (no Content-Disposition name); send form fields `image`, `prompt`")
        if len(fields) > 32:
            raise HTTPError(400, "too many multipart fields; send `image`, `prompt` (repeatable) and options")
        name = disp.group(1).decode("utf-8", "replace")
        fields.setdefault(name, []).append((content.removesuffix(b"\r\n"), disp.group(2) and disp.group(2).decode("utf-8", "replace")))
    return fields


def _form_text(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError(400, f"{what} is not UTF-8 text") from None


# --- the application -----------------------------------------------------------------------------

class App:
    """Routes, validation and the model worker; `make_server` puts it behind HTTP."""

    def __init__(self, model: Any, source: Any = None, *, api_key: str | None = None, limits: Limits | None = None,
                 model_name: str | None = None, access_log: bool = False):
        self.model, self.source, self.api_key = model, source, api_key or None
        self.limits = limits or Limits()
        self.model_name = model_name or getattr(getattr(model, "bundle", None), "manifest", {}).get("model", {}).get("name") \
            or "molmo"
        self.access_log = access_log
        self.worker = ModelWorker(model, self.limits.queue_size)
        if source is not None:
            source.start()  # the kiosk's live view needs frames before the first question
        self.started = time.time()
        self.connections = 0
        self._lock = threading.Lock()
        self._requests: dict[tuple[str, int], int] = {}
        self._hist: dict[str, list[float]] = {}           # route -> bucket counts + [sum, count]
        self.rejected = self.timeouts = 0
        self._last_camera: tuple[int, list[Any]] | None = None   # (frame id, points) of the last camera answer
        self._jpeg: tuple[Any, bytes] | None = None               # (key, bytes): one encoded frame, shared by viewers
        self._decode_slots = threading.BoundedSemaphore(max(2, os.cpu_count() or 2))  # bounds decode memory
        with open(os.path.join(STATIC, "kiosk.html"), "rb") as f:
            self.kiosk = f.read()

    def close(self) -> None:
        self.worker.close()

    # --- bookkeeping -------------------------------------------------------------------------------
    def record(self, route: str, status: int, seconds: float) -> None:
        with self._lock:
            self._requests[(route, status)] = self._requests.get((route, status), 0) + 1
            h = self._hist.setdefault(route, [0.0] * (len(_BUCKETS) + 2))
            for i, b in enumerate(_BUCKETS):
                if seconds <= b:
                    h[i] += 1
            h[-2] += seconds
            h[-1] += 1
            if status == 503:
                self.rejected += 1
            elif status == 504:
                self.timeouts += 1

    def authorized(self, headers: Any, query: dict[str, list[str]]) -> bool:
        if not self.api_key:
            return True
        auth = headers.get("Authorization", "")
        cookie = re.search(r"(?:^|;\s*)molmo_key=([^;]*)", headers.get("Cookie", ""))
        given = [auth[7:].strip() if auth[:7].lower() == "bearer " else "", headers.get("X-API-Key", ""),
                 cookie.group(1) if cookie else "", (query.get("key") or [""])[0]]
        return any(g and hmac.compare_digest(g.encode(), self.api_key.encode()) for g in given)

    # --- images --------------------------------------------------------------------------------------
    def decode_image(self, data: bytes, what: str = "image") -> np.ndarray:
        from PIL import Image
        from molmo_edge.runtime.preprocess import ImageError, load_image
        lim = self.limits
        if not data:
            raise HTTPError(400, f"{what} is empty; send the bytes of a PNG/JPEG/WebP image")
        with self._decode_slots:
            try:
                with Image.open(io.BytesIO(data)) as im:   # reads the header only: size before pixels
                    w, h = im.size
            except Image.DecompressionBombError:
                raise HTTPError(413, f"{what} has too many pixels (the limit is {lim.max_image_pixels / 1e6:g} MP); "
                                     "downscale it") from None
            except Exception:
                raise HTTPError(400, f"{what} is not a readable image; send PNG, JPEG, WebP, BMP or TIFF bytes") from None
            if w * h > lim.max_image_pixels:
                raise HTTPError(413, f"{what} is {w}x{h} ({w * h / 1e6:.1f} MP); the limit is "
                                     f"{lim.max_image_pixels / 1e6:g} MP: downscale it")
            if min(w, h) < lim.min_image_side:
                raise HTTPError(400, f"{what} is {w}x{h}; it must be at least {lim.min_image_side} pixels on each side")
            try:
                return load_image(data)
            except ImageError as e:
                raise HTTPError(400, f"{what}: {e}") from None

    def image_from_b64(self, s: Any, what: str) -> np.ndarray:
        if not isinstance(s, str):
            raise HTTPError(400, f"{what} must be a base64 string or a data: URI (got {_type(s)})")
        if s.startswith("data:"):
            head, sep, s = s.partition(",")
            if not sep or not head.endswith(";base64"):
                raise HTTPError(400, f"{what} is a data: URI without ';base64,'; send data:image/png;base64,...")
        try:
            raw = base64.b64decode(re.sub(r"\s+", "", s), validate=True)
        except (binascii.Error, ValueError):
            raise HTTPError(400, f"{what} is not valid base64; send the image file's bytes base64-encoded") from None
        return self.decode_image(raw, what)

    def camera_frame(self) -> Any:
        if self.source is None:
            raise HTTPError(400, "no image given and no camera: send an image, or start the server with --source URI")
        frame, deadline = self.source.latest(), time.monotonic() + 2.0
        while frame is None and self.source.status == "running" and time.monotonic() < deadline:  # just started
            time.sleep(0.05)
            frame = self.source.latest()
        if frame is None:
            raise HTTPError(503, f"the camera ({self.source.name}) has not delivered a frame yet ({self.source.status}); "
                                 "retry shortly", {"Retry-After": "1"})
        return frame

    # --- running jobs --------------------------------------------------------------------------------
    def run(self, fn: Callable[[_Job], Any], deadline: float) -> Any:
        job = self.worker.submit(fn)
        try:
            return job.future.result(timeout=max(0.0, deadline - time.monotonic()))
        except concurrent.futures.TimeoutError:
            if job.future.cancel():  # still queued: the server is overloaded, not this request too slow
                raise HTTPError(503, f"the model is busy: waited {self.limits.timeout_s:g} s in the queue; retry later",
                                {"Retry-After": str(self.worker.retry_after())}) from None
            job.cancelled.set()
            try:
                job.future.result(timeout=5)
            except BaseException:
                pass
            raise HTTPError(504, f"generation took longer than the {self.limits.timeout_s:g} s request timeout; "
                                 "ask for fewer tokens (max_new_tokens) or fewer crops") from None
        except (_Cancelled, MolmoEdgeError) as e:
            raise _job_error(e) from None

    def ask_all(self, job: _Job, prompts: list[str], image: np.ndarray, opts: dict[str, Any],
                on_text: Callable[[str], None] | None = None) -> list[Any]:
        answers = []
        for p in prompts:
            def cb(piece: str) -> None:
                job.check()
                if on_text:
                    on_text(piece)
            answers.append(self.model.ask(p, image, on_text=cb, **opts))
        return answers

    # --- endpoints ---------------------------------------------------------------------------------
    def query(self, body: bytes, content_type: str, qs: dict[str, list[str]]) -> dict[str, Any]:
        t0, lim = time.monotonic(), self.limits
        ctype = content_type.split(";")[0].strip().lower()
        deadline = t0 + lim.timeout_s
        fields: dict[str, Any]
        image = None
        if ctype == "application/json":
            fields = _json_body(body)
            unknown = set(fields) - {"prompt", "prompts", "image", "max_new_tokens", "max_crops"}
            if unknown:
                raise HTTPError(400, f"unknown field(s) {', '.join(sorted(unknown))[:200]}; "
                                     "use prompt/prompts, image, max_new_tokens, max_crops")
            prompts = fields.get("prompts", fields.get("prompt"))
            if "prompt" in fields and "prompts" in fields:
                raise HTTPError(400, "send either `prompt` or `prompts`, not both")
            if fields.get("image") is not None:
                image = self.image_from_b64(fields["image"], "`image`")
        elif ctype == "multipart/form-data":
            form = _multipart(body, content_type)
            prompts = [_form_text(v, "`prompt`") for v, _ in form.get("prompt", []) + form.get("prompts", [])]
            fields = {k: _form_text(form[k][0][0], f"`{k}`") for k in ("max_new_tokens", "max_crops") if k in form}
            if "image" in form:
                image = self.decode_image(form["image"][0][0], "`image`")
        elif ctype.startswith("image/"):
            prompts = qs.get("prompt", [])
            fields = {k: qs[k][0] for k in ("max_new_tokens", "max_crops") if k in qs}
            image = self.decode_image(body, "the body")
        else:
            raise HTTPError(415, f"Content-Type {ctype or 'missing'} is not accepted; send application/json, "
                                 "multipart/form-data or an image/* body")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is None or prompts == []:
            raise HTTPError(400, "no prompt: send `prompt` (a string) or `prompts` (a list of strings)")
        if not isinstance(prompts, list):
            raise HTTPError(400, f"`prompt` must be a string, `prompts` a list of strings (got {_type(prompts)})")
        if len(prompts) > lim.max_prompts:
            raise HTTPError(400, f"{len(prompts)} prompts; the limit is {lim.max_prompts} per request")
        prompts = [_text(p, "`prompt`", lim.max_prompt_chars) for p in prompts]
        opts = {"max_new_tokens": _int(fields, "max_new_tokens", lim.default_new_tokens, 1, lim.max_new_tokens),
                "max_crops": _int(fields, "max_crops", lim.max_crops, 1, 64)}
        frame = None
        if image is None:
            if self.worker.full():
                raise _busy(self.worker)
            frame = self.camera_frame()
            image = frame.rgb
        t_run = time.monotonic()
        answers = self.run(lambda job: self.ask_all(job, prompts, image, opts), deadline)
        info: dict[str, Any] = {"width": int(image.shape[1]), "height": int(image.shape[0]),
                                "source": "camera" if frame else "upload"}
        if frame is not None:
            info.update(frame=frame.id, timestamp=round(frame.timestamp, 3))
            self._last_camera = (frame.id, [p for a in answers for p in a.points])
        total = (time.monotonic() - t0) * 1e3
        return {"answers": [a.to_dict() for a in answers], "image": info,
                "timings": {"total": round(total, 2), "model": round(sum(sum(v for k, v in a.timings.items()
                                                                            if k != "decode_tokens_per_s") for a in answers), 2),
                            "wait": round((t_run - t0) * 1e3, 2)}}

    def parse_chat(self, body: bytes) -> tuple[str, list[tuple[str, str]], np.ndarray | None, dict[str, Any], bool, bool]:
        lim = self.limits
        d = _json_body(body)
        msgs = d.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise HTTPError(400, "`messages` must be a non-empty array of {role, content} objects")
        if len(msgs) > lim.max_messages:
            raise HTTPError(400, f"{len(msgs)} messages; the limit is {lim.max_messages}: drop older turns")
        if d.get("n") not in (None, 1):
            raise HTTPError(400, "`n` must be 1: this server returns one choice")
        if d.get("model") is not None and not isinstance(d["model"], str):
            raise HTTPError(400, f"`model` must be a string (got {_type(d['model'])})")
        turns: list[tuple[str, str]] = []
        image_uri = None
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "developer", "user", "assistant"):
                raise HTTPError(400, f"messages[{i}] must be an object with role system, user or assistant")
            content, texts = m.get("content"), []
            if isinstance(content, str):
                texts.append(content)
            elif isinstance(content, list):
                for j, part in enumerate(content):
                    kind = part.get("type") if isinstance(part, dict) else None
                    if kind == "text":
                        texts.append(_text(part.get("text"), f"messages[{i}].content[{j}].text", lim.max_prompt_chars, True))
                    elif kind == "image_url":
                        url = part.get("image_url")
                        url = url.get("url") if isinstance(url, dict) else url
                        if not isinstance(url, str) or not url.startswith("data:"):
                            raise HTTPError(400, f"messages[{i}].content[{j}].image_url must be a data: URI "
                                                 "(data:image/jpeg;base64,...); this server does not fetch URLs")
                        image_uri = (url, f"messages[{i}].content[{j}].image_url")
                    else:
                        raise HTTPError(400, f"messages[{i}].content[{j}] has type {str(kind)[:30]!r}; use text or image_url")
            elif content is not None:
                raise HTTPError(400, f"messages[{i}].content must be a string or an array of parts (got {_type(content)})")
            text = _text(" ".join(t for t in texts if t), f"messages[{i}].content", lim.max_prompt_chars, allow_empty=True)
            if m["role"] in ("user", "assistant"):
                turns.append((m["role"], text))
        if not turns or turns[-1][0] != "user":
            raise HTTPError(400, "the last message must come from the user (role \"user\")")
        prompt = turns[-1][1]
        if not prompt.strip():
            raise HTTPError(400, "the last user message has no text; ask a question about the image")
        history, pending = [], None
        for role, text in turns[:-1]:  # (question, answer) pairs; runs of one role are joined
            if role == "user":
                pending = text if pending is None else f"{pending} {text}"
            elif pending is not None:
                history.append((pending, text))
                pending = None
        if pending is not None:
            prompt = f"{pending} {prompt}"
        stop = d.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4 or
                                 not all(isinstance(s, str) and 0 < len(s) <= 100 for s in stop)):
            raise HTTPError(400, "`stop` must be a string or up to 4 strings of 1-100 characters")
        max_tok = d.get("max_completion_tokens", d.get("max_tokens"))
        opts = {"max_new_tokens": _int({"max_tokens": max_tok}, "max_tokens", lim.default_new_tokens, 1, lim.max_new_tokens),
                "temperature": _float(d, "temperature", 0.0, 0.0, 2.0), "top_p": _float(d, "top_p", 1.0, 1e-6, 1.0),
                "seed": _int(d, "seed", None, 0, 2**63 - 1), "stop": tuple(stop or ()), "history": history,
                "max_crops": _int(d, "max_crops", lim.max_crops, 1, 64)}
        stream = d.get("stream", False)
        so = d.get("stream_options") or {}
        if not isinstance(stream, bool) or not isinstance(so, dict):
            raise HTTPError(400, "`stream` must be true or false, `stream_options` an object")
        image = self.image_from_b64(image_uri[0], image_uri[1]) if image_uri else None
        return prompt, history, image, opts, stream, bool(so.get("include_usage"))

    def chat_result(self, cid: str, created: int, ans: Any) -> dict[str, Any]:
        return {"id": cid, "object": "chat.completion", "created": created, "model": self.model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                             "finish_reason": "length" if ans.stop_reason == "length" else "stop"}],
                "usage": _usage(ans), "molmo": _extras(ans)}

    def frame_jpeg(self, points: bool) -> tuple[bytes, Any]:
        import cv2
        if self.source is None:
            raise HTTPError(404, "no camera: start the server with --source URI to see frames here")
        frame = self.camera_frame()
        last = self._last_camera if points else None
        key = (frame.id, last and last[0], points)
        cached = self._jpeg
        if cached and cached[0] == key:
            return cached[1], frame
        if last:
            from molmo_edge.runtime.overlay import draw_points
            bgr = draw_points(frame.rgb, last[1])
        else:
            bgr = cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR)
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
        self._jpeg = (key, buf.tobytes())
        return self._jpeg[1], frame

    def health(self) -> dict[str, Any]:
        src = self.source
        return {"status": "ok", "model": self.model_name, "uptime_s": round(time.time() - self.started, 1),
                "queue": {"depth": self.worker.depth, "capacity": self.worker.capacity, "busy": self.worker.busy},
                "source": None if src is None else {"name": src.name, "status": src.status, "frames": src.frames,
                                                    "dropped": src.dropped, "reconnects": src.reconnects}}

    def metrics(self) -> str:
        out = ["# HELP molmo_http_requests_total HTTP requests by route and status.",
               "# TYPE molmo_http_requests_total counter"]
        with self._lock:
            reqs, hist = dict(self._requests), {k: list(v) for k, v in self._hist.items()}
        out += [f'molmo_http_requests_total{{route="{r}",code="{c}"}} {n}' for (r, c), n in sorted(reqs.items())]
        out += ["# HELP molmo_http_request_duration_seconds Time from request line to response.",
                "# TYPE molmo_http_request_duration_seconds histogram"]
        for r, h in sorted(hist.items()):
            out += [f'molmo_http_request_duration_seconds_bucket{{route="{r}",le="{b}"}} {int(h[i])}' for i, b in enumerate(_BUCKETS)]
            out += [f'molmo_http_request_duration_seconds_bucket{{route="{r}",le="+Inf"}} {int(h[-1])}',
                    f'molmo_http_request_duration_seconds_sum{{route="{r}"}} {h[-2]:.6f}',
                    f'molmo_http_request_duration_seconds_count{{route="{r}"}} {int(h[-1])}']
        stats = getattr(self.model, "stats", {})
        gauges = {"molmo_queue_depth": self.worker.depth, "molmo_queue_capacity": self.worker.capacity,
                  "molmo_model_busy": int(self.worker.busy), "molmo_connections_open": self.connections,
                  "molmo_rejected_total": self.rejected, "molmo_timeouts_total": self.timeouts,
                  "molmo_questions_total": stats.get("questions", 0), "molmo_vision_runs_total": stats.get("vision_runs", 0),
                  "process_resident_memory_bytes": _rss()}
        if self.source is not None:
            gauges.update(molmo_source_up=int(self.source.status == "running"), molmo_source_frames_total=self.source.frames,
                          molmo_source_dropped_total=self.source.dropped, molmo_source_reconnects_total=self.source.reconnects)
        for k, v in gauges.items():
            out += [f"# TYPE {k} {'counter' if k.endswith('_total') else 'gauge'}", f"{k} {v}"]
        return "\n".join(out) + "\n"


def _job_error(e: BaseException) -> HTTPError:
    if isinstance(e, _Cancelled):
        return HTTPError(504, "generation was cancelled")
    return HTTPError(400, str(e))  # MolmoEdgeError: an image or prompt the model cannot take (e.g. past its context)


def _usage(ans: Any) -> dict[str, int]:
    n = len(ans.token_ids)
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": n, "total_tokens": ans.prompt_tokens + n}


def _extras(ans: Any) -> dict[str, Any]:
    d = ans.to_dict()
    return {k: d[k] for k in ("points", "count", "timings", "image_size", "stop_reason")}


def _rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


# --- HTTP ----------------------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"       # keep-alive: a client's requests reuse one connection
    server_version = "molmo-edge"
    timeout = 30                        # seconds a socket may sit idle mid-request (slow clients)
    app: App

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def __getattr__(self, name: str) -> Any:  # any other method: 405, not http.server's 501
        if name.startswith("do_"):
            return lambda: self._dispatch(name[3:])
        raise AttributeError(name)

    def version_string(self) -> str:
        return self.server_version

    def log_message(self, fmt: str, *args: Any) -> None:
        if self.server.app.access_log:
            log.info("%s %s", self.address_string(), fmt % args)

    # --- plumbing ----------------------------------------------------------------------------------
    def _dispatch(self, method: str) -> None:
        app: App = self.server.app
        t0 = time.monotonic()
        self._body_read, self._status = False, 0
        url = urlsplit(self.path)
        route = url.path if url.path in _ROUTES else "other"
        try:
            try:
                qs = parse_qs(url.query, keep_blank_values=True, max_num_fields=20)
            except ValueError:
                raise HTTPError(400, "too many query parameters") from None
            if route != "/healthz" and not app.authorized(self.headers, qs):
                raise HTTPError(401, "missing or wrong API key: send Authorization: Bearer KEY (or X-API-Key: KEY; "
                                     "for the kiosk open /?key=KEY)", {"WWW-Authenticate": "Bearer"})
            self._route(app, method, route, url.path, qs)
        except HTTPError as e:
            self._reply_error(e.status, e.message, e.headers, e.close)
        except (ConnectionError, TimeoutError):  # the client went away or stalled: nobody to answer
            self.close_connection = True
        except Exception:
            log.exception("internal error on %s %s", method, url.path)
            self._reply_error(500, "internal server error (logged); please report it", {}, True)
        finally:
            app.record(route, self._status, time.monotonic() - t0)

    def _reply_error(self, status: int, message: str, headers: dict[str, str], close: bool) -> None:
        try:
            self._send_json(status, {"error": {"message": message, "type": _error_type(status), "code": status}}, headers, close)
        except (ConnectionError, TimeoutError):
            self.close_connection = True

    def _route(self, app: App, method: str, route: str, path: str, qs: dict[str, list[str]]) -> None:
        get = {"/": self._kiosk, "/healthz": lambda: self._send_json(200, app.health()),
               "/metrics": lambda: self._send(200, app.metrics().encode(), "text/plain; version=0.0.4; charset=utf-8"),
               "/openapi.json": lambda: self._send_json(200, openapi(app.limits)),
               "/v1/models": lambda: self._send_json(200, {"object": "list", "data": [
                   {"id": app.model_name, "object": "model", "created": int(app.started), "owned_by": "molmo-edge"}]}),
               "/v1/frame": lambda: self._frame(qs)}
        post = {"/v1/query": lambda: self._send_json(200, app.query(self._body(), self.headers.get("Content-Type", ""), qs)),
                "/v1/chat/completions": self._chat}
        if route in get and method == "GET":
            return get[route]()
        if route in post and method == "POST":
            return post[route]()
        if route in get or route in post:
            raise HTTPError(405, f"{path} takes {'GET' if route in get else 'POST'}, not {method[:20]}",
                            {"Allow": "GET" if route in get else "POST"})
        raise HTTPError(404, f"no such endpoint {path[:100]!r}; see /openapi.json")

    def _body(self) -> bytes:
        lim = self.server.app.limits
        if self.headers.get("Transfer-Encoding"):
            raise HTTPError(411, "chunked request bodies are not accepted; send Content-Length", close=True)
        cl = self.headers.get("Content-Length")
        if cl is None:
            raise HTTPError(411, "POST needs a Content-Length header", close=True)
        if not cl.strip().isdigit():
            raise HTTPError(400, f"Content-Length {cl[:30]!r} is not a number", close=True)
        n = int(cl)
        if n > lim.max_body_bytes:
            raise HTTPError(413, f"body is {n} bytes; the limit is {lim.max_body_bytes} ({lim.max_body_bytes >> 20} MiB): "
                                 "send a smaller image", close=True)
        chunks, left, deadline = [], n, time.monotonic() + lim.timeout_s
        while left > 0:
            if time.monotonic() > deadline:
                raise HTTPError(408, "the body arrived too slowly", close=True)
            b = self.rfile.read(min(left, 1 << 16))
            if not b:
                raise HTTPError(400, f"body ended after {n - left} of {n} bytes (Content-Length)", close=True)
            chunks.append(b)
            left -= len(b)
        self._body_read = True
        if self.server.app.worker.full():  # shed load before decoding an image nobody will run
            raise _busy(self.server.app.worker)
        return b"".join(chunks)

    def _drain(self) -> bool:
        """Read and drop a request body nobody read, so the connection stays usable and the client sees
        our answer (closing on unread bytes makes the kernel reset the connection instead)."""
        cl = (self.headers.get("Content-Length") or "0").strip()
        if self._body_read or cl == "0":
            return True
        if self.headers.get("Transfer-Encoding") or not cl.isdigit() or int(cl) > self.server.app.limits.max_body_bytes:
            return False
        left, deadline = int(cl), time.monotonic() + 10
        try:
            while left > 0 and time.monotonic() < deadline:
                b = self.rfile.read(min(left, 1 << 16))
                if not b:
                    return False
                left -= len(b)
        except OSError:
            return False
        self._body_read = left == 0
        return self._body_read

    def _send(self, status: int, body: bytes, ctype: str, headers: dict[str, str] | None = None, close: bool = False) -> None:
        self._status = status
        close = close or not self._drain()  # an unread body would be parsed as the next request
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Content-Type-Options", "nosniff")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None, close: bool = False) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json", headers, close)

    # --- endpoints needing the socket --------------------------------------------------------------
    def _kiosk(self) -> None:
        app: App = self.server.app
        headers = {"Cache-Control": "no-store",
                   "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                                              "script-src 'self' 'unsafe-inline'; connect-src 'self'"}
        qs = parse_qs(urlsplit(self.path).query)
        key = (qs.get("key") or [""])[0]
        if app.api_key and key and hmac.compare_digest(key.encode(), app.api_key.encode()):  # later fetches carry it as a cookie
            headers["Set-Cookie"] = f"molmo_key={key}; Path=/; HttpOnly; SameSite=Strict"
        self._send(200, app.kiosk, "text/html; charset=utf-8", headers)

    def _frame(self, qs: dict[str, list[str]]) -> None:
        points = (qs.get("points") or ["0"])[0].lower() in ("1", "true", "yes")
        jpeg, frame = self.server.app.frame_jpeg(points)
        self._send(200, jpeg, "image/jpeg", {"Cache-Control": "no-store", "X-Frame-Id": str(frame.id),
                                             "X-Frame-Timestamp": f"{frame.timestamp:.3f}"})

    def _chat(self) -> None:
        app: App = self.server.app
        t0 = time.monotonic()
        if self.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
            raise HTTPError(415, "send the chat request as application/json")
        prompt, history, image, opts, stream, usage = app.parse_chat(self._body())
        cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        deadline = t0 + app.limits.timeout_s
        if not stream:
            ans = app.run(lambda job: app.ask_all(job, [prompt], image, opts)[0], deadline)
            return self._send_json(200, app.chat_result(cid, created, ans))
        events: queue.Queue[tuple[str, Any]] = queue.Queue()
        job = app.worker.submit(lambda j: app.ask_all(j, [prompt], image, opts, on_text=lambda s: events.put(("text", s)))[0])
        job.future.add_done_callback(lambda f: events.put(("done", None)))
        kind, piece = self._next_event(events, deadline)  # headers wait for the first text, so errors stay 4xx
        if kind is None:
            if job.future.cancel():
                raise HTTPError(503, "the model is busy; retry later", {"Retry-After": str(app.worker.retry_after())})
            job.cancelled.set()
            raise HTTPError(504, f"no text within the {app.limits.timeout_s:g} s request timeout")
        failure = job.future.exception() if kind == "done" else None
        if failure is not None:
            raise _job_error(failure) if isinstance(failure, (_Cancelled, MolmoEdgeError)) else failure
        self._status = 200
        self.send_response(200)
        for k, v in (("Content-Type", "text/event-stream"), ("Cache-Control", "no-store"), ("Connection", "close"),
                     ("X-Content-Type-Options", "nosniff")):
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True  # no Content-Length: the end of the stream is the end of the body
        base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": app.model_name}

        def send(obj: Any) -> None:
            self.wfile.write(b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n")
            self.wfile.flush()
        try:
            send({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
            while True:
                if kind == "text":
                    send({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
                elif kind == "done":
                    break
                kind, piece = self._next_event(events, deadline)
                if kind is None:
                    job.cancelled.set()
                    send({"error": {"message": f"generation took longer than the {app.limits.timeout_s:g} s request timeout",
                                    "type": "timeout", "code": 504}})
                    return
            failure = job.future.exception()
            if failure is not None:  # after the headers: the error becomes the last event
                err = _job_error(failure) if isinstance(failure, (_Cancelled, MolmoEdgeError)) else HTTPError(500, "internal error")
                if err.status == 500:
                    log.error("generation failed mid-stream", exc_info=failure)
                send({"error": {"message": err.message, "type": _error_type(err.status), "code": err.status}})
                return
            ans = job.future.result()
            finish = "length" if ans.stop_reason == "length" else "stop"
            final = {**base, "choices": [{"index": 0, "delta": {}, "finish_reason": finish}], "molmo": _extras(ans)}
            if usage:
                final["usage"] = _usage(ans)
            send(final)
            send(b"[DONE]")
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            job.cancelled.set()  # the client left: free the model at the next token

    @staticmethod
    def _next_event(events: queue.Queue, deadline: float) -> tuple[str | None, Any]:
        try:
            return events.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return None, None


def _error_type(status: int) -> str:
    return {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 503: "overloaded_error",
            504: "timeout"}.get(status, "invalid_request_error" if status < 500 else "server_error")


class Server(ThreadingHTTPServer):
    """ThreadingHTTPServer with a cap on open connections (threads): beyond it, an immediate 503."""
    daemon_threads = True
    block_on_close = False
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], app: App):
        self.app = app
        self._slots = threading.BoundedSemaphore(app.limits.max_connections)
        super().__init__(address, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: 1\r\nContent-Type: application/json\r\n"
                                b"Connection: close\r\nContent-Length: 79\r\n\r\n"
                                b'{"error": {"message": "too many open connections", "type": "overloaded_error"}}')
            except OSError:
                pass
            self.app.record("other", 503, 0.0)
            self.shutdown_request(request)
            return
        with self.app._lock:
            self.app.connections += 1
        super().process_request(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):  # clients hanging up are not our errors
            return
        log.exception("error serving %s", client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self.app._lock:
                self.app.connections -= 1
            self._slots.release()


def make_server(app: App, host: str = "127.0.0.1", port: int = 8000) -> Server:
    """Bind (port 0 picks a free one: see `server.server_address`); call `serve_forever()` to run."""
    try:
        return Server((host, port), app)
    except OSError as e:
        raise MolmoEdgeError(f"cannot listen on {host}:{port} ({e.strerror}); pick another --port or stop what uses it") from None


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd's stop) raises KeyboardInterrupt like Ctrl-C, in the main thread; elsewhere a no-op."""
    import signal

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run_server(app: App, host: str = "127.0.0.1", port: int = 8000, on_ready: Callable[[str], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then close the socket, the worker and the camera."""
    server = make_server(app, host, port)
    url = f"http://{host if ':' not in host else f'[{host}]'}:{server.server_address[1]}"
    try:
        with sigterm_as_interrupt():
            if on_ready:
                on_ready(url)
            server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        app.close()
        if app.source is not None:
            app.source.close()
