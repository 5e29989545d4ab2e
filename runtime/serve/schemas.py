"""Request and response models (pydantic v2). They validate what clients send and are the source of
`/openapi.json`, so the schema and the server cannot drift. Built per server, because the limits
(prompt length, tokens, crops, the served model's names) are part of the schema."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.json_schema import SkipJsonSchema

from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.limits import Limits

IMAGE_URI_FORMAT = "image-data-uri"      # custom string formats: a real image, as a data: URI or bare base64
IMAGE_B64_FORMAT = "image-base64"
IMAGES_PER_CONVERSATION = 1              # Molmo v1 sees one image per conversation (Molmo2: --max-images)
# "not only whitespace", spelled so that JSON Schema (ECMA-262) and pydantic (Rust regex) agree: their
# `\S` differ on characters such as U+0085
NOT_BLANK = r"[^\x09-\x0d\x20]"

# OpenAI parameters this server does not implement: (the values that mean "off", why not). A request
# with any other value gets a 400 naming the parameter instead of a 200 that silently ignores it.
UNSUPPORTED: dict[str, tuple[tuple[Any, ...], str]] = {
    "response_format": (({"type": "text"},), "constrained (JSON) output is not implemented; ask for JSON in the prompt"),
    "tools": (([],), "tool calling is not supported by Molmo"),
    "tool_choice": (("none",), "tool calling is not supported by Molmo"),
    "parallel_tool_calls": ((False,), "tool calling is not supported by Molmo"),
    "functions": (([],), "function calling is not supported by Molmo"),
    "function_call": (("none",), "function calling is not supported by Molmo"),
    "logprobs": ((False,), "log probabilities are not returned by this server"),
    "top_logprobs": ((0,), "log probabilities are not returned by this server"),
    "frequency_penalty": ((0, 0.0), "repetition penalties are not implemented"),
    "presence_penalty": ((0, 0.0), "repetition penalties are not implemented"),
    "logit_bias": (({},), "logit bias is not implemented"),
    "audio": ((), "audio output is not supported"),
    "modalities": ((["text"],), "only text output is supported"),
    "prediction": ((), "predicted outputs are not supported"),
    "reasoning_effort": ((), "Molmo is not a reasoning model"),
    "web_search_options": ((), "web search is not available offline"),
    "store": ((False,), "this server stores nothing"),
    "metadata": (({},), "this server stores nothing"),
    "service_tier": (("auto", "default"), "there is one service tier"),
    "n": ((1,), "this server returns one choice: use n=1"),
}


def _integral(v: Any) -> Any:
    """346.0 is an integer in JSON Schema; true and "5" are not (strict mode refuses those)."""
    return int(v) if isinstance(v, float) and v.is_integer() and abs(v) < 2**63 else v


def int_in(lo: int, hi: int, **kw: Any) -> Any:
    return Annotated[int, Field(ge=lo, le=hi, **kw), BeforeValidator(_integral)]


class Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class Open(BaseModel):
    model_config = ConfigDict(extra="allow")


@dataclass
class Schemas:
    """The model classes of one server."""
    ChatRequest: type[BaseModel]
    QueryJSON: type[BaseModel]
    QueryForm: type[BaseModel]
    QueryParams: type[BaseModel]
    responses: dict[str, type[BaseModel]]


def _described(text: str, **extra: Any) -> ConfigDict:
    """Strict models whose description is built at run time (it names this server's limits)."""
    return ConfigDict(strict=True, extra="forbid", json_schema_extra={"description": text, **extra})


def build(lim: Limits, model_names: list[str], crops_cap: int, images_cap: int = IMAGES_PER_CONVERSATION,
          family: str = "Molmo v1", clip_cap: float | None = None) -> Schemas:
    """Models whose bounds are this server's limits. `images_cap`: images per chat conversation (1 for Molmo v1);
    `clip_cap`: the seconds of camera history a query may ask about as a video (None: `clip` is not offered, and is
    kept out of the schema, but still read, so that the handler can say why it is refused)."""
    Tokens = int_in(1, lim.max_new_tokens)
    Crops = int_in(1, crops_cap, description=f"crops per image, at most this server's --max-crops ({crops_cap})")
    Text = Annotated[str, Field(max_length=lim.max_prompt_chars)]
    Prompt = Annotated[str, Field(min_length=1, max_length=lim.max_prompt_chars, pattern=NOT_BLANK)]
    ImageURI = Annotated[str, Field(json_schema_extra={"format": IMAGE_URI_FORMAT},
                                    description="an image as a data: URI (data:image/jpeg;base64,...); URLs are not fetched")]

    class TextPart(Strict):
        type: Literal["text"]
        text: Text

    class ImageURL(Strict):
        url: ImageURI
        detail: Literal["auto", "low", "high"] | None = None

    class ImagePart(Strict):
        type: Literal["image_url"]
        image_url: ImageURL

    UserPart = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]

    class SystemMessage(Strict):
        """Instructions. Molmo's prompt format has no system role: the text goes before the first question."""
        role: Literal["system", "developer"]
        content: Union[Text, Annotated[list[TextPart], Field(max_length=8)]]

    class UserMessage(Strict):
        role: Literal["user"]
        content: Union[Text, Annotated[list[UserPart], Field(min_length=1, max_length=8)]]

    class AssistantMessage(Strict):
        role: Literal["assistant"]
        content: Union[Text, Annotated[list[TextPart], Field(max_length=8)]]

    Message = Annotated[Union[SystemMessage, UserMessage, AssistantMessage], Field(discriminator="role")]

    class StreamOptions(Strict):
        include_usage: bool = False

    images = ("at most one image (Molmo v1)" if images_cap == 1 else
              f"up to {images_cap} images in all ({family}; --max-images), shown to the model in the order given")

    class ChatRequest(BaseModel):
        model_config = _described(f"OpenAI chat completion request. The last message must come from the user; the "
                                  f"conversation may hold {images}; system messages go before the first question.")
        model: Literal[tuple(model_names)] | None = Field(None, description="the served model or an alias (GET /v1/models)")
        messages: Annotated[list[Message], Field(min_length=1, max_length=lim.max_messages)]
        max_tokens: Tokens | None = Field(None, description="deprecated alias of max_completion_tokens")
        max_completion_tokens: Tokens | None = Field(None, description=f"default {lim.default_new_tokens}; with "
                                                     "max_tokens too, the smaller applies")
        temperature: Annotated[float, Field(ge=0, le=2)] | None = Field(
            None, description="default 0 (greedy; so is anything below 1e-6)")
        top_p: Annotated[float, Field(gt=0, le=1)] | None = None
        seed: int_in(0, 2**63 - 1) | None = None
        n: Literal[1] | None = None
        stop: Union[Annotated[str, Field(max_length=100)],
                    Annotated[list[Annotated[str, Field(max_length=100)]], Field(max_length=4)], None] = None
        stream: bool | None = False
        stream_options: StreamOptions | None = None
        user: Annotated[str, Field(max_length=256, description="accepted and not used")] | None = None
        max_crops: Crops | None = None

    if clip_cap is not None:
        Clip: Any = Annotated[float, Field(gt=0, le=clip_cap, description=(
            f"ask about the last this many seconds of the camera as a video ({family}; at most --clip-history, "
            f"{clip_cap:g} s), instead of its latest frame; not with `image`"))] | None
        clip_text = " With `clip`, the last seconds of the camera as a video (not with `image`)."
        # a clip is about the camera: not with an uploaded image (both given is a 400 naming `clip`)
        not_both = {"not": {"required": ["clip", "image"], "properties": {"clip": {"type": "number"},
                                                                           "image": {"type": "string"}}}}
    else:   # not offered by this server; read anyway so that a request using it gets a 400 that says why
        Clip, clip_text, not_both = SkipJsonSchema[Any], "", {}

    class QueryJSON(BaseModel):
        model_config = _described("Prompts about one image: `image` (base64 or a data: URI), or the latest camera frame "
                                  "when omitted." + clip_text + " At least one prompt in all, from `prompt`, `prompts` "
                                  "and the query string (all are asked, in that order).", **not_both)
        prompt: Prompt | None = None
        prompts: Annotated[list[Prompt], Field(min_length=1, max_length=lim.max_prompts)] | None = None
        image: Annotated[str, Field(json_schema_extra={"format": IMAGE_B64_FORMAT})] | None = None
        max_new_tokens: Tokens | None = Field(None, description=f"default {lim.default_new_tokens}")
        max_crops: Crops | None = None
        clip: Clip = None

    class QueryForm(BaseModel):
        model_config = _described("multipart/form-data: `image` (a file; omitted: the camera frame), `prompt` "
                                  "(repeatable) and options." + clip_text, **not_both)
        image: Annotated[bytes, Field(json_schema_extra={"format": "binary", "type": "string"})] = None
        prompt: Annotated[list[Prompt], Field(min_length=1, max_length=lim.max_prompts)]
        max_new_tokens: Tokens = None
        max_crops: Crops = None
        clip: Clip = None

    class QueryParams(Strict):
        """The query string of POST /v1/query: prompts and options (with a raw image/* body, the only way to send
        them; with JSON or a form, added to the body's prompts and used where the body does not set an option)."""
        prompt: Annotated[list[Prompt], Field(max_length=lim.max_prompts)] = []
        max_new_tokens: Tokens = None
        max_crops: Crops = None
        clip: SkipJsonSchema[Any] = None   # a body option only; read to say so

    # --- responses -------------------------------------------------------------------------------
    class ErrorDetail(Open):
        message: str
        type: str
        param: str | None
        code: str | None

    class Error(Open):
        error: ErrorDetail

    class Point(Open):
        x: float
        y: float
        x_pct: float
        y_pct: float
        label: str | None = None
        image: int | None = None     # Molmo2: which image / video frame / object the point belongs to
        time: float | None = None
        frame: int | None = None
        object: int | None = None

    class Extras(Open):
        """molmo-edge's own fields: points (pixels and percent of the image), count, timings (ms)."""
        points: list[Point]
        count: int | None
        timings: dict[str, float]
        image_size: list[int] | None
        stop_reason: str

    class Usage(Open):
        prompt_tokens: int
        completion_tokens: int
        total_tokens: int

    class ChatMessage(Open):
        role: Literal["assistant"]
        content: str

    class Choice(Open):
        index: int
        message: ChatMessage
        finish_reason: Literal["stop", "length"]

    class ChatCompletion(Open):
        id: str
        object: Literal["chat.completion"]
        created: int
        model: str
        choices: list[Choice]
        usage: Usage
        molmo: Extras

    class Answer(Open):
        prompt: str
        text: str
        token_ids: list[int]
        points: list[Point]
        count: int | None
        stop_reason: str
        timings: dict[str, float]

    class QueryResponse(Open):
        answers: list[Answer]
        image: dict[str, Any]
        timings: dict[str, float]

    class Model(Open):
        id: str
        object: Literal["model"]
        created: int
        owned_by: str

    class ModelList(Open):
        object: Literal["list"]
        data: list[Model]

    class Health(Open):
        status: Literal["ok"]
        model: str
        uptime_s: float
        queue: dict[str, Any]
        source: dict[str, Any] | None

    class LoginLink(Open):
        url: str

    return Schemas(ChatRequest, QueryJSON, QueryForm, QueryParams, {
        "Error": Error, "ChatCompletion": ChatCompletion, "QueryResponse": QueryResponse, "Model": Model,
        "ModelList": ModelList, "Health": Health, "LoginLink": LoginLink, "Usage": Usage})


_UNION_TAGS = {"str", "int", "float", "bool", "bytes", "list", "none", "system", "user", "assistant", "developer", "text",
               "image_url"}


def _where(loc: tuple[Any, ...]) -> str:
    """('messages', 0, 'user', 'content', 'constrained-str') -> 'messages[0].content' (pydantic adds union branches)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS or not str(part).isidentifier():
            continue
        else:
            out += ("." if out else "") + str(part)
    return out or "body"


def validation_error(e: ValidationError) -> APIError:
    """The first (most useful) problem of a pydantic error, as one line naming the parameter."""
    errs = e.errors(include_url=False)
    extra = next((x for x in errs if x["type"] == "extra_forbidden"), None)
    # in a union: the branch that got furthest, and one that matched the type over one that did not
    err = extra or max(errs, key=lambda x: (len(x["loc"]), not x["type"].endswith("_type")))
    where = _where(tuple(err["loc"]))
    if err["type"] == "extra_forbidden":
        return APIError(400, f"unknown parameter `{where}`: this server does not take it; see /openapi.json", where,
                        "unknown_parameter")
    if err["type"] == "missing":
        return APIError(400, f"`{where}` is required", where, "missing_parameter")
    if err["type"] == "json_invalid":
        return APIError(400, f"body is not valid JSON ({err['msg'][:100]}); send a JSON object", None, "invalid_json")
    if err["type"] == "model_type" and not err["loc"]:
        return APIError(400, "body must be a JSON object", None, "invalid_json")
    return APIError(400, f"`{where}`: {err['msg'][:200]}", where, "invalid_value")


def check_unsupported(d: dict[str, Any]) -> None:
    """A 400 for any OpenAI parameter this server cannot honour (unless it is set to its "off" value, then dropped)."""
    for k in list(d):
        if k in UNSUPPORTED:
            off, why = UNSUPPORTED[k]
            if d[k] is None or any(d[k] == v and type(d[k]) is type(v) for v in off):
                del d[k]
                continue
            raise APIError(400, f"`{k}` is not supported: {why}; remove it", k, "unsupported_parameter")
