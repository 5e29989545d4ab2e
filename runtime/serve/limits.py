"""Every limit the server enforces, in one place (the CLI fills it from its options)."""
from __future__ import annotations

from dataclasses import dataclass, field

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1", "[::1]")


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
    timeout_s: float = 60.0            # queue wait + generation of one request
    header_timeout_s: float = 10.0     # request line + headers must arrive within this
    body_timeout_s: float = 30.0       # the whole body must arrive within this
    keep_alive_s: float = 5.0          # idle keep-alive connections are closed after this
    max_connections: int = 64          # requests in progress past their headers (healthz exempt); more get 503
    max_sockets: int = 512             # open TCP connections of any kind; more are closed at once
    max_crops: int | None = None       # server-wide cap on crops per image (None: the model's own)
    max_images: int = 4                # images per chat conversation (Molmo2; Molmo v1 sees one)
    allow_hosts: tuple[str, ...] = field(default_factory=tuple)    # Host names accepted beyond the loopback ones
    cors_origins: tuple[str, ...] = field(default_factory=tuple)   # origins allowed cross-site ("*": any)
