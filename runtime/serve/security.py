"""Who may talk to the server: API keys (headers only), kiosk sessions from one-time login links,
the Host allow-list (against DNS rebinding) and the Origin check (against cross-site requests)."""
from __future__ import annotations

import hmac
import ipaddress
import secrets
import socket
import threading
from collections import OrderedDict

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.serve.limits import LOOPBACK_NAMES

COOKIE = "molmo_session"


def check_key(key: str) -> str:
    """Any printable characters; no surrounding whitespace (HTTP strips it from header values)."""
    if not key or not key.isprintable() or key != key.strip():
        raise MolmoEdgeError("--api-key must be printable characters with no leading or trailing spaces "
                             "(e.g. from `python -c 'import secrets; print(secrets.token_urlsafe(24))'`)")
    return key


class Access:
    """The API key, outstanding one-time login tokens and the kiosk sessions they became."""

    def __init__(self, api_key: str | None, max_sessions: int = 64):
        self.api_key = check_key(api_key) if api_key else None
        # a header carries bytes: accept the key as UTF-8 (what clients send) or Latin-1 (what some encode)
        self._keys = [] if not api_key else list(dict.fromkeys(
            k for k in (api_key.encode("utf-8"), _latin1(api_key)) if k))
        self._tokens: set[str] = set()
        self._sessions: OrderedDict[str, None] = OrderedDict()
        self._max_sessions = max_sessions
        self._lock = threading.Lock()

    def key_matches(self, given: bytes) -> bool:
        return bool(given) and any(hmac.compare_digest(given, k) for k in self._keys)

    def authorized(self, headers: dict[bytes, bytes], cookies: dict[str, str]) -> bool:
        if not self.api_key:
            return True
        auth = headers.get(b"authorization", b"")
        bearer = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
        if self.key_matches(bearer) or self.key_matches(headers.get(b"x-api-key", b"")):
            return True
        s = cookies.get(COOKIE, "")
        with self._lock:
            return any(hmac.compare_digest(s.encode(), known.encode()) for known in self._sessions) if s else False

    def new_login_token(self) -> str:
        with self._lock:
            if len(self._tokens) >= 16:   # unused links pile up only by mistake: the oldest go
                self._tokens.pop()
            t = secrets.token_urlsafe(24)
            self._tokens.add(t)
            return t

    def redeem(self, token: str) -> str | None:
        """A new session id for a valid token (then spent), else None."""
        with self._lock:
            match = next((t for t in self._tokens if hmac.compare_digest(t.encode(), token.encode())), None)
            if match is None:
                return None
            self._tokens.discard(match)
            sid = secrets.token_urlsafe(32)
            self._sessions[sid] = None
            while len(self._sessions) > self._max_sessions:
                self._sessions.popitem(last=False)
            return sid


def _latin1(s: str) -> bytes | None:
    try:
        return s.encode("latin-1")
    except UnicodeEncodeError:
        return None


def host_name(host_header: str) -> str:
    """'example.com:8000' -> 'example.com', '[::1]:8000' -> '::1' (lowercase)."""
    h = host_header.strip().lower()
    if h.startswith("["):
        return h[1:h.find("]")] if "]" in h else h
    return h.rsplit(":", 1)[0] if h.count(":") == 1 else h


class HostCheck:
    """Host names a request may carry. IP literals are always fine (a rebinding attack needs a name that
    resolves to us); names must be loopback ones, this machine's own, or given with --allow-host."""

    def __init__(self, allow: tuple[str, ...]):
        self.any = "*" in allow
        names = {n.lower() for n in LOOPBACK_NAMES} | {a.lower() for a in allow}
        try:
            me = socket.gethostname().lower()
            names |= {me, f"{me}.local"}
        except OSError:
            pass
        self.names = names

    def allowed(self, host_header: str | None) -> bool:
        if self.any:
            return True
        if not host_header:
            return False
        name = host_name(host_header)
        if name in self.names:
            return True
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return False


def same_origin(origin: str, host_header: str | None) -> bool:
    """Origin 'http://h:p' against Host 'h:p'."""
    o = origin.lower()
    for scheme in ("http://", "https://"):
        if o.startswith(scheme):
            o = o[len(scheme):]
            break
    else:
        return False
    return bool(host_header) and o.rstrip("/") == host_header.strip().lower()
