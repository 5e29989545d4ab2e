"""Prompt + images / video -> Molmo2's model inputs, as HF transformers 5.24's `Molmo2Processor` returns them
(names and dtypes; molmo2-spec.md §6-7), from a checkpoint's or bundle's processor files.

Files read: `tokenizer.json` (+ `tokenizer_config.json`, `special_tokens_map.json`), `preprocessor_config.json`,
`video_preprocessor_config.json`, `processor_config.json`, `chat_template.jinja`. The chat template is not
executed (no jinja2 dependency): `render_chat` writes what the Molmo2 template writes for its message shapes
and takes the template's DEMO_STYLES list from the file.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.molmo2_preprocess import (ImageSettings, Molmo2Image, Molmo2Video, VideoSettings,
                                                 batch_images, clip_video, load_video, preprocess_image)
from molmo_edge.runtime.pointing import Point, VideoTimeline, parse_points
from molmo_edge.runtime.tokenizer import Molmo2Tokenizer

__all__ = ["is_molmo2_config", "is_molmo2_folder", "render_chat", "messages_for", "Molmo2Request", "Molmo2Processor",
           "process_inputs", "MM_TOKENS"]

IMAGE_PLACEHOLDER, VIDEO_PLACEHOLDER = "<|image|>", "<|video|>"
# Tokens with mm_token_type_ids == 1: the one bidirectional block at prefill (spec §6, §8).
MM_TOKENS = ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<frame_start>", "<im_end>",
             "<frame_end>", "<im_low>")
_PROCESSOR_FLAGS = {"image_use_col_tokens": True, "use_single_crop_col_tokens": None,
                    "use_single_crop_start_token": True, "video_use_col_tokens": False,
                    "use_frame_special_tokens": True}


def is_molmo2_config(cfg: dict) -> bool:
    """True for a Molmo2 config.json: the hub layout (`vit_config`/`adapter_config`/`text_config`), the native
    transformers layout (`model_type` molmo2), or a bundle manifest's config that says `family: molmo2`."""
    if not isinstance(cfg, dict):
        return False
    if str(cfg.get("model_type", "")).lower() == "molmo2" or str(cfg.get("family", "")).lower() == "molmo2":
        return True
    if any("molmo2" in str(a).lower() for a in cfg.get("architectures") or ()):
        return True
    return all(k in cfg for k in ("vit_config", "adapter_config", "text_config"))


def is_molmo2_folder(folder: str) -> bool:
    """A checkpoint (config.json) or bundle (manifest.json's `config`) of the Molmo2 family."""
    for name, key in (("config.json", None), ("manifest.json", "config")):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            try:
                with open(p, encoding="utf-8") as f:
                    d = json.load(f)
            except (OSError, json.JSONDecodeError):
                continue
            if is_molmo2_config(d.get(key, {}) if key else d) or (key and is_molmo2_config(d)):
                return True
    return False


# --------------------------------------------------------------------------------------------
# Chat template
# --------------------------------------------------------------------------------------------

def _read_chat_template(folder: str) -> str | None:
    p = os.path.join(folder, "chat_template.jinja")
    if os.path.exists(p):
        with open(p, encoding="utf-8") as f:
            return f.read()
    for name in ("chat_template.json", "tokenizer_config.json", "processor_config.json"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                t = json.load(f).get("chat_template")
            if isinstance(t, str):
                return t
    return None


def demo_styles(template: str | None) -> tuple[str, ...] | None:
    """The template's DEMO_STYLES (styles written without a `style: ` prefix); None without a template."""
    if template is None:
        return None
    m = re.search(r"set\s+DEMO_STYLES\s*=\s*\[([^\]]*)\]", template)
    if not m or "<|image|>" not in template:
        raise MolmoEdgeError("the chat template is not Molmo2's (no DEMO_STYLES / <|image|>); copy the checkpoint's "
                             "chat_template.jinja into the model folder")
    return tuple(re.findall(r"'([^']*)'", m.group(1)))


def _is_image(part: dict) -> bool:
    return part.get("type") == "image" or "image" in part or "image_url" in part


def _is_video(part: dict) -> bool:
    return part.get("type") == "video" or "video" in part or "video_url" in part


def render_chat(messages: Sequence[dict], *, add_generation_prompt: bool = True,
                styles: Sequence[str] | None = None) -> str:
    """What Molmo2's chat template writes for `messages` (HF message dicts: `role`, `content` a string or a list
    of `{"type": "text"|"image"|"video", ...}` parts; an optional first `subtitle` message). Every image and
    video placeholder goes first (`<|image|>`, or `Image 1<|image|>Image 2<|image|>...`, then `<|video|>` per
    video); user turns are `<|im_start|>user\\n{text}<|im_end|>\\n`, a later user turn starts with
    `<|im_end|>\\n`; assistant turns are ` <|im_start|>assistant\\n{text}` (the template has a literal space
    there) and stay open; text parts join with a space, a part whose `style` is not in `styles` (the template's
    DEMO_STYLES) is written `style: text`."""
    n_img = n_vid = 0
    for m in messages:
        if not isinstance(m.get("content"), str):
            for part in m.get("content") or ():
                if _is_image(part):
                    n_img += 1
                elif _is_video(part):
                    n_vid += 1
    out = [IMAGE_PLACEHOLDER] if n_img == 1 else [f"Image {i + 1}{IMAGE_PLACEHOLDER}" for i in range(n_img)]
    out += [VIDEO_PLACEHOLDER] * n_vid
    has_subtitle = bool(messages) and str(messages[0].get("role", "")).lower() == "subtitle"
    if has_subtitle:
        out.append(str(messages[0]["content"]))
    for index, m in enumerate(messages, 1):
        role = str(m.get("role", "")).lower()
        if role == "subtitle":
            continue
        conv = index - (1 if has_subtitle else 0)
        if (conv % 2 == 1 and role != "user") or (conv % 2 == 0 and role != "assistant"):
            raise MolmoEdgeError("Conversation roles must alternate user/assistant/user/assistant/... "
                                 f"(message {index} is {role!r})")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        else:
            segs = []
            for part in content or ():
                if part.get("type") != "text":
                    continue
                style = part.get("style", None) if "style" in part else None
                if "style" in part and (styles is None or style not in styles):
                    if styles is None:
                        raise MolmoEdgeError("a text part has a `style` but the model folder has no chat template "
                                             "to say which styles are written bare; copy chat_template.jinja")
                    segs.append(f"{style}: {part['text']}")
                else:
                    segs.append(str(part["text"]))
            text = " ".join(segs)
        if role == "user":
            if index != (2 if has_subtitle else 1):
                out.append("<|im_end|>\n")
            out.append(f"<|im_start|>user\n{text}<|im_end|>\n")
        else:  # the template has a literal space before its assistant tag (`{% else %} {# assistant #}`)
            out.append(f" <|im_start|>assistant\n{text}")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n")
    return "".join(out)


def messages_for(prompt: str, n_images: int = 0, video: bool = False,
                 history: Sequence[tuple[str, str]] = ()) -> list[dict]:
    """HF-style messages for a question about `n_images` images (and a video), after earlier (q, a) turns;
    the media go in the first user message, as the golden prompts were made."""
    media = [{"type": "image"}] * n_images + ([{"type": "video"}] if video else [])
    msgs: list[dict] = []
    for q, a in history:
        msgs += [{"role": "user", "content": [{"type": "text", "text": q}]}, {"role": "assistant", "content": a}]
    msgs.append({"role": "user", "content": [{"type": "text", "text": prompt}]})
    msgs[0]["content"] = media + msgs[0]["content"]
    return msgs


# --------------------------------------------------------------------------------------------
# Processor
# --------------------------------------------------------------------------------------------

@dataclass
class Molmo2Request:
    """The model inputs of one prompt (`arrays`, HF names and dtypes, batch of one) plus what the runtime needs
    to map answers back: the preprocessed images (sizes) and video (timestamps, frame indices, size)."""
    arrays: dict[str, np.ndarray]
    text: str                                   # chat-template output, before the bos and token expansion
    images: list[Molmo2Image] = field(default_factory=list)
    video: Molmo2Video | None = None

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        """(width, height) of each image, in prompt order."""
        return [(im.size[1], im.size[0]) for im in self.images]

    @property
    def timeline(self) -> VideoTimeline | None:
        """The video's frame size, timestamps and frame indices, for `parse_points(..., video=)`."""
        v = self.video
        return None if v is None else VideoTimeline(v.size[1], v.size[0], list(v.timestamps), list(v.frame_indices))

    def parse_points(self, text: str) -> list[Point]:
        """Points of an answer to this request, in pixels of its images / video frames."""
        return parse_points(text, images=self.image_sizes, video=self.timeline)


class Molmo2Processor:
    """Molmo2's processor from a model folder (checkpoint or bundle holding the processor files)."""

    def __init__(self, folder: str):
        self.folder = folder
        self.tokenizer = Molmo2Tokenizer(folder)
        self.image_settings = ImageSettings.from_folder(folder)
        self.video_settings = VideoSettings.from_folder(folder)
        flags = dict(_PROCESSOR_FLAGS)
        p = os.path.join(folder, "processor_config.json")
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                flags.update({k: v for k, v in json.load(f).items() if k in _PROCESSOR_FLAGS})
        self.flags = flags
        self.styles = demo_styles(_read_chat_template(folder))
        t = self.tokenizer.token_ids
        self._mm_ids = np.array([t[n] for n in MM_TOKENS], np.int64)

    # --- media ---------------------------------------------------------------------------------
    def image(self, image: Any, *, max_crops: int | None = None, bgr: bool = False) -> Molmo2Image:
        """Crops and pooling windows of one image (path, bytes, PIL image, numpy array)."""
        return preprocess_image(image, self.image_settings, max_crops=max_crops, bgr=bgr)

    def video(self, video: Any, *, fps: float | None = None, num_frames: int | None = None) -> Molmo2Video:
        """Sampled, preprocessed frames of a video file, an .npz (`frames`, `fps`), a [T, H, W, 3] array (with
        `fps`), or a camera clip `(frames, capture_times)` (timestamps = capture times)."""
        if isinstance(video, tuple) and len(video) == 2:
            return clip_video(video[0], video[1], self.video_settings, num_frames=num_frames)
        return load_video(video, self.video_settings, fps=fps, num_frames=num_frames)

    # --- token layout ----------------------------------------------------------------------------
    def image_token_ids(self, im: Molmo2Image) -> np.ndarray:
        """`<low_res_im_start>` + rows of `<im_patch>` (+ `<im_col>`) + `<im_end>`, then the same for the
        high-res grid with `<im_start>` (spec §6)."""
        t, f = self.tokenizer.token_ids, self.flags
        lh, lw, hh, hw = im.grid
        low_col = f["use_single_crop_col_tokens"]
        if low_col is None:  # falls back to the high-res setting, as in HF
            low_col = f["image_use_col_tokens"]
        low_start = t["<low_res_im_start>"] if f["use_single_crop_start_token"] else t["<im_start>"]
        return np.concatenate([
            self._block(low_start, lh, lw, bool(low_col), t["<im_end>"]),
            self._block(t["<im_start>"], hh, hw, bool(f["image_use_col_tokens"]), t["<im_end>"]),
        ])

    def _block(self, start: int, rows: int, cols: int, col_token: bool, end: int) -> np.ndarray:
        t = self.tokenizer.token_ids
        row = [t["<im_patch>"]] * cols + ([t["<im_col>"]] if col_token else [])
        return np.array([start] + row * rows + [end], np.int64)

    def video_token_ids(self, vid: Molmo2Video) -> np.ndarray:
        """Per frame `f"{t:.1f} "` + `<frame_start>` + rows x cols `<im_patch>` + `<frame_end>`, frames joined by
        one space (spec §7); timestamps are real text, tokenised like the rest of the prompt."""
        t, f = self.tokenizer.token_ids, self.flags
        start = t["<frame_start>"] if f["use_frame_special_tokens"] else t["<im_start>"]
        end = t["<frame_end>"] if f["use_frame_special_tokens"] else t["<im_end>"]
        _, rows, cols = vid.grid
        frame = self._block(start, rows, cols, bool(f["video_use_col_tokens"]), end)
        parts = []
        for i, ts in enumerate(vid.timestamps):
            parts.append(np.array(self.tokenizer.encode((" " if i else "") + f"{ts:.1f} "), np.int64))
            parts.append(frame)
        return np.concatenate(parts)

    # --- prompts -> arrays ---------------------------------------------------------------------
    def encode(self, text: str, images: Sequence[Molmo2Image] = (), video: Molmo2Video | None = None
               ) -> dict[str, np.ndarray]:
        """Chat-template text with `<|image|>`/`<|video|>` placeholders -> HF's arrays. The bos `<|im_end|>` is
        prepended unless the text starts with it; each placeholder is expanded to its tokens."""
        bos = self.tokenizer.bos_text
        if not text.startswith(bos):
            text = bos + text
        pieces = re.split(f"({re.escape(IMAGE_PLACEHOLDER)}|{re.escape(VIDEO_PLACEHOLDER)})", text)
        n_img = pieces.count(IMAGE_PLACEHOLDER)
        n_vid = pieces.count(VIDEO_PLACEHOLDER)
        if n_img != len(images):
            raise MolmoEdgeError(f"the prompt has {n_img} image placeholders but {len(images)} images were given; "
                                 "pass one image per <|image|>")
        if n_vid != (video is not None):
            raise MolmoEdgeError(f"the prompt has {n_vid} video placeholders but {int(video is not None)} videos were "
                                 "given; Molmo2 takes at most one video per prompt")
        ids, it = [], iter(images)
        for piece in pieces:
            if piece == IMAGE_PLACEHOLDER:
                ids.append(self.image_token_ids(next(it)))
            elif piece == VIDEO_PLACEHOLDER:
                ids.append(self.video_token_ids(video))
            elif piece:
                ids.append(np.array(self.tokenizer.encode(piece), np.int64))
        input_ids = np.concatenate(ids)[None]
        out = {"input_ids": input_ids, "attention_mask": np.ones_like(input_ids),
               "mm_token_type_ids": np.isin(input_ids, self._mm_ids).astype(np.int64)}
        if images:
            out.update(batch_images(images))
        if video is not None:
            out.update({"pixel_values_videos": video.pixel_values, "video_token_pooling": video.token_pooling,
                        "video_grids": np.array([video.grid], np.int64)})
        return out

    def prepare(self, prompt: str | None = None, images: Sequence[Any] = (), video: Any = None, *,
                messages: Sequence[dict] | None = None, history: Sequence[tuple[str, str]] = (),
                max_crops: int | None = None, bgr: bool = False) -> Molmo2Request:
        """Inputs for a question (or HF-style `messages`) about `images` and an optional `video`. Images may be
        anything `image()` takes or already-preprocessed `Molmo2Image`s (reuse them across prompts); the video
        a file, .npz, frame array or a `Molmo2Video`."""
        ims = [im if isinstance(im, Molmo2Image) else self.image(im, max_crops=max_crops, bgr=bgr) for im in images]
        vid = video if (video is None or isinstance(video, Molmo2Video)) else self.video(video)
        if messages is None:
            if prompt is None:
                raise MolmoEdgeError("no prompt given: pass a question (or HF-style messages)")
            messages = messages_for(prompt, len(ims), vid is not None, history)
        text = render_chat(messages, styles=self.styles)
        return Molmo2Request(self.encode(text, ims, vid), text, ims, vid)

    def process(self, prompt: str | None = None, images: Sequence[Any] = (), video: Any = None,
                **kw: Any) -> dict[str, np.ndarray]:
        """`prepare(...).arrays`: exactly the arrays HF's Molmo2Processor returns."""
        return self.prepare(prompt, images, video, **kw).arrays


def process_inputs(folder: str, prompt: str, images: Sequence[Any] = (), video: Any = None, *,
                   max_crops: int | None = None) -> dict[str, np.ndarray]:
    """The CLI's `preprocess` for Molmo2: model folder + prompt + images + optional video -> HF's arrays
    (`input_ids`, `attention_mask`, `mm_token_type_ids`; `pixel_values`, `image_token_pooling`, `image_grids`,
    `image_num_crops` with images; `pixel_values_videos`, `video_token_pooling`, `video_grids` with a video)."""
    return Molmo2Processor(folder).process(prompt, images, video, max_crops=max_crops)
