"""POST /v1/query: prompts about an uploaded image (JSON base64, multipart, or a raw image/* body), the
latest camera frame, or (Molmo2, `clip`) the camera's last seconds as a video -> answers with points, count
and timings."""
from __future__ import annotations

import re
import time
from typing import Any

from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request
from starlette.responses import Response

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.serve.bodies import disconnect_watcher, json_response, read_body
from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.images import b64_image_bytes, decode_image
from molmo_edge.runtime.serve.schemas import validation_error
from molmo_edge.runtime.serve.state import ServeState
from molmo_edge.runtime.serve.worker import Cancelled, Job, run_job

_NUMBER = re.compile(r"\s*-?\d{1,19}\s*")
_DECIMAL = re.compile(r"\s*-?(\d{1,19}(\.\d{0,19})?|\.\d{1,19})([eE][-+]?\d{1,3})?\s*")
OPTIONS = ("max_new_tokens", "max_crops")


def _typed(v: str) -> Any:
    """Form fields and query strings are text; integers in them count as integers, other numbers (clip=2.5, 1e-3)
    as floats."""
    return int(v) if _NUMBER.fullmatch(v) else float(v) if _DECIMAL.fullmatch(v) else v


def _validate(model: Any, fields: dict[str, Any]) -> Any:
    try:
        return model.model_validate(fields)
    except ValidationError as e:
        raise validation_error(e) from None


async def _multipart(body: bytes, headers: Headers, st: ServeState) -> dict[str, Any]:
    async def stream():
        yield body
    try:
        form = await MultiPartParser(headers, stream(), max_files=1, max_fields=32,
                                     max_part_size=st.limits.max_body_bytes).parse()
    except MultiPartException as e:
        raise APIError(400, f"malformed multipart body ({e.message}); send form fields `image`, `prompt`", None,
                       "invalid_multipart") from None
    fields: dict[str, Any] = {}
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            if name != "image":
                raise APIError(400, f"unknown file field `{name[:40]}`; send the image as `image`", name[:40],
                               "unknown_parameter")
            fields["image"] = await value.read()
        elif name in ("prompt", "prompts"):
            fields.setdefault("prompt", []).append(value)
        elif name == "image":
            raise APIError(400, "`image` must be a file part (filename=...), not a text field", "image", "invalid_image")
        else:
            fields[name] = _typed(value)
    return fields


async def query(request: Request) -> Response:
    st: ServeState = request.app.state.serve
    lim = st.limits
    t0 = time.monotonic()
    content_type = request.headers.get("content-type", "")
    ctype = content_type.split(";")[0].strip().lower()
    if ctype not in ("application/json", "multipart/form-data") and not ctype.startswith("image/"):
        raise APIError(415, f"Content-Type {ctype[:60] or 'missing'} is not accepted; send application/json, "
                            "multipart/form-data or an image/* body", None, "unsupported_media_type")
    qs = request.query_params
    params = _validate(st.schemas.QueryParams, {**{k: _typed(qs[k]) for k in qs if k != "prompt"},
                                                **({"prompt": qs.getlist("prompt")} if "prompt" in qs else {})})
    body = await read_body(request)
    image_bytes: bytes | None = None
    if ctype == "application/json":
        try:
            q = st.schemas.QueryJSON.model_validate_json(body)
        except ValidationError as e:
            raise validation_error(e) from None
        prompts = ([q.prompt] if q.prompt is not None else []) + (q.prompts or [])
        if q.image is not None:
            image_bytes = b64_image_bytes(q.image, "`image`", "image")
        opts = {"max_new_tokens": q.max_new_tokens, "max_crops": q.max_crops, "clip": q.clip}
        what = "`image`"
    elif ctype == "multipart/form-data":
        f = _validate(st.schemas.QueryForm, await _multipart(body, request.headers, st))
        prompts, image_bytes, what = f.prompt, f.image, "`image`"
        opts = {"max_new_tokens": f.max_new_tokens, "max_crops": f.max_crops, "clip": f.clip}
    else:
        prompts, image_bytes, what = [], body, "the body"
        opts = {"max_new_tokens": None, "max_crops": None, "clip": None}
    prompts = prompts + params.prompt
    if params.clip is not None:   # a clip is about the camera, never about an image body: a body option only
        st.check_clip()
        raise APIError(400, "`clip` goes in the body (a JSON field or a form field), not in the query string", "clip",
                       "invalid_value")
    opts = {k: v if v is not None else getattr(params, k) for k, v in opts.items()}
    if not prompts:
        raise APIError(400, "no prompt: send `prompt` (a string) or `prompts` (a list of strings)", "prompt",
                       "missing_parameter")
    opts["max_new_tokens"] = opts["max_new_tokens"] or lim.default_new_tokens
    opts["max_crops"] = opts["max_crops"] or st.default_crops
    clip = opts.pop("clip")
    frame, clip_info = None, None
    try:
        if clip is not None:
            st.check_clip()
            if image_bytes is not None:
                raise APIError(400, "`clip` asks about the camera's last seconds: send it without an image (or send the "
                                    "image without `clip`)", "clip", "invalid_value")
            video, frame, clip_info = await run_in_threadpool(st.camera_clip, float(clip))
            media = await run_in_threadpool(st.context.media, (), None, video)
            width, height = video.size[1], video.size[0]
            clip_info["sampled"] = int(video.grid[0])   # the frames the model sees, at their capture times
        else:
            if image_bytes is not None:
                image = await run_in_threadpool(decode_image, image_bytes, lim, what, "image")
            else:
                frame = await run_in_threadpool(st.camera_frame)
                image = frame.rgb
            media = await run_in_threadpool(st.context.media, [image], opts["max_crops"])
            height, width = image.shape[:2]
        for p in prompts:   # each prompt is its own question about the image or clip
            await run_in_threadpool(st.context.check, p, [], media, opts["max_new_tokens"], "max_new_tokens", "prompt")
    except MolmoEdgeError as e:
        raise APIError(400, str(e), None, "model_refused") from None
    t_run = time.monotonic()

    def work(job: Job) -> list[Any]:
        return [st.model.ask(p, on_text=job.check, **media.kwargs, **opts) for p in prompts]
    try:
        answers = await run_job(st.worker, work, lim.timeout_s, lim.timeout_s, disconnect_watcher(request))
    except Cancelled as c:
        if c.why == "timeout":
            raise APIError(504, f"generation took longer than the {lim.timeout_s:g} s limit (--timeout) and was stopped; "
                                "retrying will not help: ask for fewer tokens (max_new_tokens), fewer prompts or crops",
                           None, "generation_timeout", {"x-should-retry": "false"}) from None
        return Response(status_code=499)
    except MolmoEdgeError as e:
        raise APIError(400, str(e), None, "model_refused") from None
    info: dict[str, Any] = {"width": int(width), "height": int(height),
                            "source": "camera" if frame is not None else "upload"}
    if frame is not None:
        info.update(frame=frame.id, timestamp=round(frame.timestamp, 3))
    if clip_info is not None:   # points carry their frame's time; the latest frame's overlay would misplace them
        info["clip"] = clip_info
    elif frame is not None:
        st.remember_camera_points(frame.id, [p for a in answers for p in a.points])
    model_ms = sum(sum(v for k, v in a.timings.items() if k != "decode_tokens_per_s") for a in answers)
    return json_response({"answers": [a.to_dict() for a in answers], "image": info,
                          "timings": {"total": round((time.monotonic() - t0) * 1e3, 2), "model": round(model_ms, 2),
                                      "wait": round((t_run - t0) * 1e3, 2)}})
