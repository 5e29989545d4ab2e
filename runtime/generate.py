"""The backend-blind generation loop: greedy by default, temperature/top-p on request, stops at
EOS, at stop strings, or after max_new_tokens; streams each new piece of text to a callback."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from molmo_edge.runtime.machine import trim_heap


# Below this temperature sampling picks the most likely token anyway (its probability rounds to 1), and
# dividing the logits by a temperature near 1e-308 would overflow to inf - inf = NaN: such requests are greedy.
GREEDY_BELOW = 1e-6


@dataclass
class GenerationOptions:
    max_new_tokens: int = 200
    temperature: float = 0.0          # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop: Sequence[str] = field(default_factory=tuple)


def pick_token(logits: np.ndarray, opts: GenerationOptions, rng: np.random.Generator) -> int:
    if not opts.temperature >= GREEDY_BELOW:   # also NaN or negative: greedy, never a NaN distribution
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / opts.temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if opts.top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), opts.top_p) + 1)]
        q = np.zeros_like(p)
        q[keep] = p[keep]
        p = q / q.sum()
    return int(rng.choice(len(p), p=p))


def generate(first_logits: np.ndarray, step: Callable[[int], np.ndarray], opts: GenerationOptions, eos_id: int,
             decode: Callable[[list[int]], str], on_text: Callable[[str], None] | None = None) -> tuple[list[int], str]:
    """Returns (token ids, stop reason: "eos" | "stop" | "length"). `step(token)` runs one decode step."""
    rng = np.random.default_rng(opts.seed)
    tokens: list[int] = []
    logits, shown = first_logits, ""

    def emit(text: str, final: bool) -> str:
        # hold back a trailing partial UTF-8 character (shown as U+FFFD) until the next token completes it
        if on_text and text.startswith(shown) and len(text) > len(shown) and (final or not text.endswith("\ufffd")):
            on_text(text[len(shown):])
            return text
        return shown

    while True:
        tok = pick_token(logits, opts, rng)
        tokens.append(tok)
        text = decode(tokens)
        hit = next((s for s in opts.stop if s and s in text), None)
        visible = text[: text.index(hit)] if hit else text
        reason = "eos" if tok == eos_id else "stop" if hit else "length" if len(tokens) >= opts.max_new_tokens else ""
        shown = emit(visible, bool(reason))
        if reason:
            trim_heap()  # the question's freed activations go back to the system, not kept by glibc (machine)
            return tokens, reason
        logits = step(tok)
