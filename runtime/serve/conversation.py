"""An OpenAI chat request -> what Molmo is asked: the prompt, earlier (question, answer) turns, the images
and the generation options; and the context check that runs before any vision work."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.limits import Limits
from molmo_edge.runtime.serve.schemas import IMAGES_PER_CONVERSATION


@dataclass
class Conversation:
    prompt: str
    history: list[tuple[str, str]]
    images: list[tuple[str, str]] = field(default_factory=list)   # (data URI, parameter path), in order
    options: dict[str, Any] = field(default_factory=dict)        # Molmo.ask keyword arguments
    stream: bool = False
    include_usage: bool = False


def _text(content: Any) -> tuple[str, list[Any]]:
    """(the text parts joined, the image parts) of a message's content."""
    if isinstance(content, str):
        return content, []
    texts = [p.text for p in content if p.type == "text"]
    return " ".join(t for t in texts if t), [p for p in content if p.type == "image_url"]


def conversation(req: Any, lim: Limits, model_name: str) -> Conversation:
    """A validated ChatRequest -> Conversation; a 400 for what Molmo cannot do, never a silent drop."""
    system: list[str] = []
    turns: list[tuple[str, str]] = []
    images: list[tuple[str, str]] = []
    for i, m in enumerate(req.messages):
        text, parts = _text(m.content)
        for j, p in enumerate(m.content if parts else []):
            if p.type == "image_url":
                images.append((p.image_url.url, f"messages[{i}].content[{j}].image_url.url"))
        if m.role in ("system", "developer"):
            if text.strip():
                system.append(text.strip())
        else:
            turns.append((m.role, text))
    if len(images) > IMAGES_PER_CONVERSATION:
        raise APIError(400, f"this conversation has {len(images)} images; {model_name} (Molmo v1) sees one image per "
                            "conversation: send one, or ask about each image in its own request",
                       images[IMAGES_PER_CONVERSATION][1], "too_many_images")
    if not turns or turns[-1][0] != "user":
        last = len(req.messages) - 1
        raise APIError(400, "the last message must come from the user (role \"user\"); this server does not continue "
                            "a partial assistant answer", f"messages[{last}].role", "invalid_conversation")
    history, pending = [], None
    for role, text in turns[:-1]:   # (question, answer) pairs; runs of one role are joined
        if role == "user":
            pending = text if pending is None else f"{pending} {text}"
        elif pending is not None:
            history.append((pending, text))
            pending = None
        else:                          # an answer with no question before it: pair it with an empty one
            history.append(("", text))
    prompt = turns[-1][1] if pending is None else f"{pending} {turns[-1][1]}"
    if system:  # Molmo's format has no system role: instructions go before the first question
        sys_text = " ".join(system)
        if history:
            history[0] = (f"{sys_text} {history[0][0]}".strip(), history[0][1])
        else:
            prompt = f"{sys_text} {prompt}".strip()
    caps = [v for v in (req.max_tokens, req.max_completion_tokens) if v is not None]
    stop = req.stop if isinstance(req.stop, list) else [req.stop] if req.stop else []
    opts = {"max_new_tokens": min(caps) if caps else lim.default_new_tokens,
            # below 1e-6 sampling is greedy anyway, and 1e-308 would overflow the division by the temperature
            "temperature": 0.0 if req.temperature is None or req.temperature < 1e-6 else float(req.temperature),
            "top_p": 1.0 if req.top_p is None else float(req.top_p), "seed": req.seed,
            "stop": tuple(s for s in stop if s), "history": history, "max_crops": req.max_crops}
    so = req.stream_options
    return Conversation(prompt, history, images, opts, bool(req.stream), bool(so and so.include_usage))


class ContextCheck:
    """Tokens a request will need, counted before any vision work: prompt + image tokens + new tokens must fit
    the model's context. Image token counts depend only on (height, width, crops) and are remembered."""

    def __init__(self, model: Any):
        self.model = model
        self._image_tokens: OrderedDict[tuple[int, int, int | None], int] = OrderedDict()

    def limit(self) -> int | None:
        cache = getattr(self.model, "cache", None)
        return getattr(cache, "max_len", None)

    def image_tokens(self, shape: tuple[int, ...], max_crops: int | None) -> int:
        key = (shape[0], shape[1], max_crops)
        if key not in self._image_tokens:
            crops = self.model.processor.image(np.zeros((shape[0], shape[1], 3), np.uint8), max_crops=max_crops)
            self._image_tokens[key] = len(crops.image_tokens)
            while len(self._image_tokens) > 64:
                self._image_tokens.popitem(last=False)
        return self._image_tokens[key]

    def check(self, prompt: str, history: list[tuple[str, str]], image: np.ndarray | None, max_crops: int | None,
              max_new_tokens: int, token_param: str, text_param: str) -> None:
        limit = self.limit()
        tok = getattr(self.model, "tokenizer", None)
        if limit is None or tok is None or not hasattr(self.model, "processor"):
            return   # a model object without these (a wrapper): the session's own check still applies
        n_text = len(tok.encode_prompt(prompt, history)) + 1   # + BOS
        n_image = self.image_tokens(image.shape, max_crops) if image is not None else 0
        need = n_text + n_image + max_new_tokens
        if need > limit:
            param = token_param if n_text + n_image < limit else text_param
            raise APIError(400, f"this request needs {need} tokens ({n_text} of text, {n_image} of image, up to "
                                f"{max_new_tokens} new) but the model's context is {limit}: shorten the conversation, "
                                "use fewer crops (max_crops) or ask for fewer tokens", param, "context_length_exceeded")
