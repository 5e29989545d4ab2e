"""The checkpoint's tokenizer (via the `tokenizers` package) plus Molmo's prompt format.

Molmo applies no chat template: a turn is `" User: {prompt} Assistant:"` (leading space, role
format), earlier answers end with EOS, and the sequence starts with BOS (= EOS for OLMo and
Qwen2 tokenizers, which have no BOS). Image special tokens follow the text vocabulary.
"""
from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from molmo_edge.runtime.config import IMAGE_TOKENS, MolmoConfig
from molmo_edge.runtime.errors import MolmoEdgeError


class TokenizerError(MolmoEdgeError):
    """The tokenizer files are missing or do not fit the model."""


def _special_name(entry) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def load_tokenizer_json(folder: str):
    """The folder's tokenizer.json as a `tokenizers.Tokenizer`, and its path."""
    from tokenizers import Tokenizer

    path = os.path.join(folder, "tokenizer.json")
    if not os.path.exists(path):
        raise TokenizerError(f"no tokenizer.json in {folder}: copy the checkpoint's tokenizer.json "
                             "(and tokenizer_config.json) into it, or re-export the bundle")
    try:
        return Tokenizer.from_file(path), path
    except Exception as e:  # the Rust error text is long; keep its first line
        raise TokenizerError(f"{path} cannot be read ({str(e).splitlines()[0]}); re-download it") from None


def read_tokenizer_meta(folder: str) -> dict:
    """special_tokens_map.json and tokenizer_config.json merged (the latter wins), None values dropped."""
    meta: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            with open(p, encoding="utf-8") as f:
                meta.update({k: v for k, v in json.load(f).items() if v is not None})
    return meta


class MolmoTokenizer:
    def __init__(self, folder: str, cfg: MolmoConfig):
        self._tok, path = load_tokenizer_json(folder)
        self.cfg = cfg
        meta = read_tokenizer_meta(folder)
        # Image tokens: the tokenizer's own ids when it has them, else the config's rule (right after the vocab).
        rule = cfg.image_token_ids()
        self.image_token_ids = {name: self._tok.token_to_id(name) if self._tok.token_to_id(name) is not None else rule[name]
                                for name in IMAGE_TOKENS}
        eos_name = _special_name(meta.get("eos_token")) or "<|endoftext|>"
        eos = self._tok.token_to_id(eos_name)
        if eos is None:
            eos = cfg.eos_token_id
        if eos is None:
            raise TokenizerError(f"cannot find the EOS token {eos_name!r} in {path}; is this the checkpoint's tokenizer?")
        self.eos_id = int(eos)
        bos_name = _special_name(meta.get("bos_token"))
        bos = self._tok.token_to_id(bos_name) if bos_name else None
        self.bos_id = int(bos) if bos is not None else self.eos_id  # HF: bos_token_id or eos_token_id
        specials = {int(k) for k, v in meta.get("added_tokens_decoder", {}).items() if v.get("special")}
        self._skip = specials | set(self.image_token_ids.values()) | {self.eos_id, self.bos_id}
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    # --- text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._skip and 0 <= i < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""

    # --- prompts -------------------------------------------------------------------------------
    def format_prompt(self, prompt: str, history: Sequence[tuple[str, str]] = ()) -> str:
        """`" User: q1 Assistant: a1<eos> User: q2 Assistant:"` (history = earlier (question, answer) turns)."""
        pre = self.cfg.preprocess
        if pre.message_format not in ("role", "none", None):
            raise TokenizerError(f"message_format {pre.message_format!r} is not supported (use 'role' or 'none')")
        role = pre.message_format == "role"
        eos_text = self.token_text(self.eos_id)
        parts = []
        for q, a in history:
            parts.append((f"User: {q} Assistant: {a}" if role else f"{q} {a}") + eos_text)
        parts.append(f"User: {prompt} Assistant:" if role else prompt)
        text = " ".join(parts) if role else "".join(parts)
        if pre.always_start_with_space:
            text = " " + text
        return text

    def encode_prompt(self, prompt: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
        """Token ids of the formatted prompt, without BOS (the processor prepends it)."""
        return self.encode(self.format_prompt(prompt, history))


# Molmo2 (molmo2-spec.md §6): Qwen3's tokenizer plus these added special tokens, looked up by name.
MOLMO2_TOKENS = ("<im_start>", "<im_end>", "<im_patch>", "<im_col>", "<low_res_im_start>", "<|image|>", "<im_low>",
                 "<frame_start>", "<frame_end>", "<|video|>")


class Molmo2Tokenizer:
    """Molmo2's tokenizer: `bos` = `eos` = `<|im_end|>` (from the tokenizer config), the image/video special
    tokens by name (`token_ids`), and decoding that drops every special token by default."""

    def __init__(self, folder: str):
        self._tok, path = load_tokenizer_json(folder)
        meta = read_tokenizer_meta(folder)
        ids = {name: self._tok.token_to_id(name) for name in MOLMO2_TOKENS}
        missing = [n for n, i in ids.items() if i is None]
        if missing:
            raise TokenizerError(f"{path} lacks Molmo2's added tokens {', '.join(missing)}; use the Molmo2 "
                                 "checkpoint's tokenizer.json")
        self.token_ids: dict[str, int] = {n: int(i) for n, i in ids.items()}

        def special(key: str, default: str | None) -> int | None:
            name = _special_name(meta.get(key)) or default
            i = self._tok.token_to_id(name) if name else None
            return int(i) if i is not None else None

        eos = special("eos_token", "<|im_end|>")
        if eos is None:
            raise TokenizerError(f"cannot find the EOS token in {path}; is this the checkpoint's tokenizer?")
        self.eos_id: int = eos
        self.bos_id: int = special("bos_token", None) or eos  # HF Molmo2Processor: bos_token or eos_token
        self.pad_id: int | None = special("pad_token", "<|endoftext|>")
        self.bos_text: str = self.token_text(self.bos_id)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (special tokens written in it are matched first, no BOS added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self._tok.id_to_token(int(token_id)) or ""
