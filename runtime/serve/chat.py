"""POST /v1/chat/completions: OpenAI's chat API on one Molmo, plain or streamed (server-sent events)."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.serve.bodies import SECURITY_HEADERS, disconnect_watcher, json_response, read_body
from molmo_edge.runtime.serve.conversation import Conversation, Media, conversation
from molmo_edge.runtime.serve.errors import APIError, error_body
from molmo_edge.runtime.serve.images import b64_image_bytes, decode_image
from molmo_edge.runtime.serve.schemas import check_unsupported, validation_error
from molmo_edge.runtime.serve.state import ServeState
from molmo_edge.runtime.serve.worker import Cancelled, Job, run_job

log = logging.getLogger("molmo_edge.server")
NO_RETRY = {"x-should-retry": "false"}   # the OpenAI SDKs honour this: a timed-out generation would time out again


def timeout_error(st: ServeState) -> APIError:
    return APIError(504, f"generation took longer than the {st.limits.timeout_s:g} s limit (--timeout) and was stopped; "
                         "retrying will not help: ask for fewer tokens (max_tokens) or fewer crops (max_crops)",
                    None, "generation_timeout", NO_RETRY)


def parse(st: ServeState, body: bytes) -> Conversation:
    try:
        raw = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise APIError(400, f"body is not valid JSON ({str(e)[:100]}); send a JSON object", None, "invalid_json") from None
    if not isinstance(raw, dict):
        raise APIError(400, "body must be a JSON object", None, "invalid_json")
    if isinstance(raw.get("model"), str) and raw["model"] not in st.model_names:
        raise APIError(404, f"model `{raw['model'][:80]}` is not served here; use {' or '.join(st.model_names)} "
                            "(GET /v1/models)", "model", "model_not_found")
    check_unsupported(raw)
    try:
        req = st.schemas.ChatRequest.model_validate_json(json.dumps(raw))
    except ValidationError as e:
        raise validation_error(e) from None
    return conversation(req, st.limits, st.model_name, st.images_cap)


def _usage(ans: Any) -> dict[str, int]:
    n = len(ans.token_ids)
    return {"prompt_tokens": ans.prompt_tokens, "completion_tokens": n, "total_tokens": ans.prompt_tokens + n}


def _extras(ans: Any) -> dict[str, Any]:
    d = ans.to_dict()
    return {k: d[k] for k in ("points", "count", "timings", "image_size", "stop_reason")}


def _finish(ans: Any) -> str:
    return "length" if ans.stop_reason == "length" else "stop"


async def chat_completions(request: Request) -> Response:
    st: ServeState = request.app.state.serve
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != "application/json":
        raise APIError(415, "send the chat request as application/json", None, "unsupported_media_type")
    conv = parse(st, await read_body(request))
    conv.options["max_crops"] = conv.options["max_crops"] or st.default_crops
    images = []
    for uri, param in conv.images:   # in order; each checked and decoded before any model work
        data = b64_image_bytes(uri, param, param)
        images.append(await run_in_threadpool(decode_image, data, st.limits, param, param))
    try:
        media = await run_in_threadpool(st.context.media, images, conv.options["max_crops"])
        await run_in_threadpool(st.context.check, conv.prompt, conv.history, media, conv.options["max_new_tokens"],
                                "max_completion_tokens", "messages")
    except MolmoEdgeError as e:
        raise APIError(400, str(e), None, "model_refused") from None
    cid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
    if conv.stream:
        return await _stream(request, st, conv, media, cid, created)

    def work(job: Job) -> Any:
        return st.model.ask(conv.prompt, on_text=job.check, **media.kwargs, **conv.options)
    try:
        ans = await run_job(st.worker, work, st.limits.timeout_s, st.limits.timeout_s, disconnect_watcher(request))
    except Cancelled as c:
        if c.why == "timeout":
            raise timeout_error(st) from None
        return Response(status_code=499)   # the client is gone: nobody reads this
    except MolmoEdgeError as e:
        raise APIError(400, str(e), None, "model_refused") from None
    return json_response({"id": cid, "object": "chat.completion", "created": created, "model": st.model_name,
                          "choices": [{"index": 0, "message": {"role": "assistant", "content": ans.text},
                                       "finish_reason": _finish(ans)}],
                          "usage": _usage(ans), "molmo": _extras(ans)})


async def _stream(request: Request, st: ServeState, conv: Conversation, media: Media, cid: str, created: int) -> Response:
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    def work(job: Job) -> Any:
        def on_text(piece: str) -> None:
            job.check()
            loop.call_soon_threadsafe(events.put_nowait, ("text", piece))
        return st.model.ask(conv.prompt, on_text=on_text, **media.kwargs, **conv.options)

    async def run() -> Any:
        try:
            return await run_job(st.worker, work, st.limits.timeout_s, st.limits.timeout_s)
        finally:
            events.put_nowait(("done", None))
    task = asyncio.ensure_future(run())
    # the headers wait for the first text, so that a full queue or a refused request is still a 4xx/5xx status
    watch = asyncio.ensure_future(disconnect_watcher(request)())
    first = asyncio.ensure_future(events.get())
    try:
        done, _ = await asyncio.wait([first, watch], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if first not in done:
        first.cancel()
        task.cancel()
        return Response(status_code=499)
    kind, piece = first.result()
    if kind == "done":
        try:
            task.result()
        except Cancelled as c:
            if c.why == "timeout":
                raise timeout_error(st) from None
            return Response(status_code=499)
        except MolmoEdgeError as e:
            raise APIError(400, str(e), None, "model_refused") from None
    base = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": st.model_name}
    usage_null = {"usage": None} if conv.include_usage else {}

    def sse(obj: Any) -> bytes:
        return b"data: " + (obj if isinstance(obj, bytes) else json.dumps(obj).encode()) + b"\n\n"

    async def body() -> AsyncIterator[bytes]:
        nonlocal kind, piece
        try:
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "finish_reason": None}], **usage_null})
            while kind == "text":
                yield sse({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}],
                           **usage_null})
                kind, piece = await events.get()
            try:
                ans = await task
            except Exception as e:   # after the headers: the error becomes the last event
                err = timeout_error(st) if isinstance(e, Cancelled) and e.why == "timeout" else \
                    APIError(400, str(e), None, "model_refused") if isinstance(e, MolmoEdgeError) else \
                    APIError(500, "internal error (logged); please report it", None, "internal_error")
                if err.status == 500:
                    log.error("generation failed mid-stream", exc_info=e)
                yield sse(error_body(err.status, err.message, err.param, err.code))
                return
            yield sse({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": _finish(ans)}],
                       "molmo": _extras(ans), **usage_null})
            if conv.include_usage:
                yield sse({**base, "choices": [], "usage": _usage(ans)})
            yield sse(b"[DONE]")
        finally:
            if not task.done():   # the client left (or the server stops): free the model at the next token
                task.cancel()
    return StreamingResponse(body(), 200, {**SECURITY_HEADERS, "X-Accel-Buffering": "no"}, "text/event-stream")
