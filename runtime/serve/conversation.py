"""An OpenAI chat request -> what Molmo is asked: the prompt, earlier (question, answer) turns, the images
and the generation options; the media of a request made ready for `Molmo.ask`; and the context check that runs
before any vision work."""
from __future__ import annotations

import re
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.limits import Limits


def is_molmo2(model: Any) -> bool:
    """A Molmo2 model (several images, video) rather than Molmo v1 (one image per question)."""
    return bool(getattr(getattr(model, "cfg", None), "is_molmo2", False))


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


def conversation(req: Any, lim: Limits, model_name: str, images_cap: int = 1) -> Conversation:
    """A validated ChatRequest -> Conversation; a 400 for what Molmo cannot do, never a silent drop.
    `images_cap`: images the served model may see in one conversation (1: Molmo v1; Molmo2: --max-images)."""
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
    if len(images) > 1 and images_cap == 1:
        raise APIError(400, f"this conversation has {len(images)} images; {model_name} (Molmo v1) sees one image per "
                            "conversation: send one, or ask about each image in its own request",
                       images[1][1], "too_many_images")
    if len(images) > images_cap:
        raise APIError(400, f"this conversation has {len(images)} images; this server takes at most {images_cap} "
                            f"(--max-images {images_cap}): send fewer, or restart it with a higher --max-images",
                       images[images_cap][1], "too_many_images")
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
            "temperature": 0.0 if req.temperature is None else float(req.temperature),  # < 1e-6: greedy (generate.py)
            "top_p": 1.0 if req.top_p is None else float(req.top_p), "seed": req.seed,
            "stop": tuple(s for s in stop if s), "history": history, "max_crops": req.max_crops}
    so = req.stream_options
    return Conversation(prompt, history, images, opts, bool(req.stream), bool(so and so.include_usage))


@dataclass
class Media:
    """What a request shows the model, ready for `Molmo.ask(prompt, **kwargs)`: Molmo v1 `image` (an RGB array);
    Molmo2 `images` (preprocessed, in order) or `video` (a preprocessed clip); nothing for text only. `tokens`:
    how many prompt tokens the media take, known before any vision work."""
    kwargs: dict[str, Any] = field(default_factory=dict)
    tokens: int = 0


class ContextCheck:
    """Tokens a request will need, counted before any vision work: prompt + image tokens + new tokens must fit
    the model's context. Molmo v1 image token counts depend only on (height, width, crops) and are remembered;
    Molmo2 media are preprocessed here (off the model's thread) and handed to `ask` as they are, so the count
    is exact and the work is not done twice."""

    def __init__(self, model: Any):
        self.model = model
        self.molmo2 = is_molmo2(model)
        self._image_tokens: OrderedDict[tuple[int, int, int | None], int] = OrderedDict()

    def limit(self) -> int | None:
        cache = getattr(self.model, "cache", None)
        return getattr(cache, "max_len", None)

    def _processor(self) -> Any:
        from molmo_edge.runtime import molmo2_session
        return molmo2_session.processor(self.model)

    def image_tokens(self, shape: tuple[int, ...], max_crops: int | None) -> int:
        """Molmo v1: the image tokens of an image of this shape (a zero image of that size is preprocessed)."""
        key = (shape[0], shape[1], max_crops)
        if key not in self._image_tokens:
            crops = self.model.processor.image(np.zeros((shape[0], shape[1], 3), np.uint8), max_crops=max_crops)
            self._image_tokens[key] = len(crops.image_tokens)
            while len(self._image_tokens) > 64:
                self._image_tokens.popitem(last=False)
        return self._image_tokens[key]

    def media(self, images: Sequence[np.ndarray] = (), max_crops: int | None = None, video: Any = None) -> Media:
        """Decoded RGB images (several: Molmo2 only), or a Molmo2 video (a preprocessed `Molmo2Video`) -> Media.
        Blocking (Molmo2 preprocessing): call from a thread."""
        if not self.molmo2:
            if video is not None or len(images) > 1:
                raise ValueError("Molmo v1 takes one image per question")   # the handlers refuse these first
            if not images:
                return Media()
            n = self.image_tokens(images[0].shape, max_crops) if getattr(self.model, "processor", None) else 0
            return Media({"image": images[0]}, n)
        proc = self._processor()
        if video is not None:
            return Media({"video": video}, len(proc.video_token_ids(video)))
        if not images:
            return Media()
        ims = [proc.image(rgb, max_crops=max_crops) for rgb in images]
        return Media({"images": ims}, sum(len(proc.image_token_ids(im)) for im in ims))

    def text_tokens(self, prompt: str, history: Sequence[tuple[str, str]], media: Media) -> int | None:
        """Prompt tokens besides the media's (with BOS and the chat format); None for a model without a tokenizer."""
        if self.molmo2:
            from molmo_edge.runtime.molmo2_processor import (IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER, messages_for,
                                                             render_chat)
            proc = self._processor()
            tok = proc.tokenizer
            n_images = len(media.kwargs.get("images", ()))
            text = render_chat(messages_for(prompt, n_images, "video" in media.kwargs, history), styles=proc.styles)
            text = text if text.startswith(tok.bos_text) else tok.bos_text + text   # as Molmo2Processor.encode does
            pieces = re.split(f"{re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)}", text)
            return sum(len(tok.encode(p)) for p in pieces if p)
        tok = getattr(self.model, "tokenizer", None)
        if tok is None or not hasattr(self.model, "processor"):
            return None
        return len(tok.encode_prompt(prompt, history)) + 1   # + BOS

    def check(self, prompt: str, history: Sequence[tuple[str, str]], media: Media, max_new_tokens: int,
              token_param: str, text_param: str) -> None:
        limit = self.limit()
        n_text = self.text_tokens(prompt, history, media) if limit is not None else None
        if n_text is None:
            return   # a model object without these (a wrapper): the session's own check still applies
        n_media = media.tokens
        need = n_text + n_media + max_new_tokens
        if need > limit:
            what = "video" if "video" in media.kwargs else "image"
            fewer = "fewer images or crops (max_crops), a shorter clip" if self.molmo2 else "fewer crops (max_crops)"
            param = token_param if n_text + n_media < limit else text_param
            raise APIError(400, f"this request needs {need} tokens ({n_text} of text, {n_media} of {what}, up to "
                                f"{max_new_tokens} new) but the model's context is {limit}: shorten the conversation, "
                                f"use {fewer} or ask for fewer tokens", param, "context_length_exceeded")
