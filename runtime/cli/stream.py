"""`molmo-edge watch` and `molmo-edge serve`: cameras and video into answers, as JSON lines or over HTTP.
Heavy imports (OpenCV, onnxruntime) stay inside the command functions."""
from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import os
import sys
from typing import Any, Iterator

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.files import say

SOURCES = "0, /dev/video0, csi://0, rtsp://..., http(s)://.../video.mjpg, clip.mp4, a folder or \"*.jpg\" glob, gst:PIPELINE"


def _quiet_opencv() -> None:
    """OpenCV's and FFmpeg's own chatter repeats what the source's one-line messages already say."""
    os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
    os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def _load(a: argparse.Namespace):
    from molmo_edge.runtime.cli.main import _backend_for, _model_folder, _runtime
    folder = _model_folder(a.bundle)
    return _runtime(folder, _backend_for(folder, a.backend or "onnxruntime"), a.precision)


def cmd_watch(a: argparse.Namespace) -> int:
    _quiet_opencv()
    from molmo_edge.runtime.cameras import open_source
    if a.every is not None and a.every < 0:
        raise MolmoEdgeError(f"--every must be 0 or more seconds (got {a.every:g})")
    if a.show:
        import cv2
        try:
            cv2.namedWindow("molmo-edge watch")
        except cv2.error:
            raise MolmoEdgeError("--show needs a display and OpenCV with GUI support (pip install opencv-python, "
                                 "not -headless); or write the video with --overlay out.mp4") from None
    # the source first: a missing camera should not wait for a big model to load
    if a.clip is not None and a.clip <= 0:
        raise MolmoEdgeError(f"--clip must be a positive number of seconds (got {a.clip:g})")
    source = open_source(a.source, loop=a.loop, retry_for=a.give_up_after, on_status=lambda m: say(f"source: {m}"),
                         history=a.clip or 0.0)
    try:
        return _watch(a, source)
    finally:
        source.close()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (systemd's stop) raises KeyboardInterrupt like Ctrl-C, in the main thread; elsewhere a no-op."""
    import signal

    def stop(*_: Any) -> None:
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: signals are not ours to take
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _watch(a: argparse.Namespace, source: Any) -> int:
    from molmo_edge.runtime.serve.watch import OverlayVideo, watch
    model = _load(a)
    out = open(a.jsonl, "a", encoding="utf-8") if a.jsonl else sys.stdout

    def emit(line: dict[str, Any]) -> None:
        out.write(json.dumps(line) + "\n")
        out.flush()
    overlay = OverlayVideo(a.overlay, fps=min(30.0, 1.0 / a.every) if a.every else 10.0) if a.overlay else None

    say(f"watching {source.name} ({len(a.prompts)} prompt(s)); Ctrl-C stops")
    try:
        with sigterm_as_interrupt():  # systemd's stop is SIGTERM: the same clean summary as Ctrl-C
            summary = watch(model, source, a.prompts, every=a.every, on_change=a.on_change,
                            change_threshold=a.change_threshold, max_new_tokens=a.max_new_tokens, max_crops=a.max_crops,
                            max_frames=a.max_frames, emit=emit, overlay=overlay, show=a.show, clip=a.clip)
    finally:
        if a.jsonl:
            out.close()
    say("summary: " + json.dumps(summary.to_dict()))
    if overlay is not None and overlay.frames:
        say(f"wrote {a.overlay} ({overlay.frames} frames)")
    if summary.error:
        raise MolmoEdgeError(summary.error)
    return 0


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _limit_malloc_arenas(n: int = 2) -> None:
    """glibc gives new threads their own malloc arenas (up to 8 per core) and keeps freed memory in each:
    a server decoding images on many connection threads then grows for minutes (measured: +40 MB in
    3 min with 16 clients; flat with 2 arenas, no loss of throughput). MALLOC_ARENA_MAX, if set, wins."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").mallopt(-8, n)  # M_ARENA_MAX; must run before the threads start
    except (OSError, AttributeError):  # not glibc
        pass


def cmd_serve(a: argparse.Namespace) -> int:
    import logging
    _limit_malloc_arenas()
    _quiet_opencv()
    try:
        from molmo_edge.runtime.serve.server import Limits, ServeState, run_server
    except ImportError as e:
        raise MolmoEdgeError(f"`molmo-edge serve` needs the server extra ({e.name} is missing): "
                             "pip install 'molmo-edge[serve]'") from None
    from molmo_edge.runtime.serve.security import check_key
    logging.basicConfig(level=logging.INFO if a.access_log else logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    for flag, value in (("--queue-size", a.queue_size), ("--timeout", a.timeout), ("--max-body-mb", a.max_body_mb),
                        ("--max-image-mp", a.max_image_mp), ("--max-prompt-chars", a.max_prompt_chars),
                        ("--default-new-tokens", a.default_new_tokens), ("--max-connections", a.max_connections),
                        ("--header-timeout", a.header_timeout), ("--body-timeout", a.body_timeout),
                        ("--max-sockets", a.max_sockets)):
        if value <= 0:
            raise MolmoEdgeError(f"{flag} must be more than 0 (got {value:g})")
    if a.max_crops is not None and a.max_crops < 1:
        raise MolmoEdgeError(f"--max-crops must be 1 or more (got {a.max_crops})")
    if a.max_images < 1:
        raise MolmoEdgeError(f"--max-images must be 1 or more (got {a.max_images})")
    if a.clip_history is not None and not a.clip_history > 0:
        raise MolmoEdgeError(f"--clip-history must be a positive number of seconds (got {a.clip_history:g})")
    if a.clip_history and not a.source:
        raise MolmoEdgeError("--clip-history keeps the last seconds of a camera: give the camera with --source URI")
    api_key = a.api_key or os.environ.get("MOLMO_EDGE_API_KEY") or None
    if api_key:
        check_key(api_key)
    if not _is_loopback(a.host) and not api_key:
        say(f"warning: serving on {a.host} without --api-key: anyone who can reach this port can use the model and camera")
    limits = Limits(max_body_bytes=int(a.max_body_mb * (1 << 20)), max_image_pixels=int(a.max_image_mp * 1e6),
                    max_prompt_chars=a.max_prompt_chars, max_new_tokens=a.max_new_tokens,
                    default_new_tokens=min(a.default_new_tokens, a.max_new_tokens), queue_size=a.queue_size,
                    timeout_s=a.timeout, max_connections=a.max_connections, max_crops=a.max_crops,
                    header_timeout_s=a.header_timeout, body_timeout_s=a.body_timeout, max_sockets=a.max_sockets,
                    max_images=a.max_images,
                    allow_hosts=tuple(a.allow_host or ()), cors_origins=tuple(a.cors_origin or ()))
    source = None
    if a.source:  # before the model: a missing camera fails at once
        from molmo_edge.runtime.cameras import open_source
        source = open_source(a.source, loop=True, on_status=lambda m: say(f"source: {m}"), history=a.clip_history or 0.0)
    try:
        model = _load(a)
        if a.clip_history and not model.cfg.is_molmo2:
            raise MolmoEdgeError("--clip-history lets queries ask about a video clip, which needs a Molmo2 bundle; "
                                 f"{a.bundle} is Molmo v1: drop --clip-history")
    except BaseException:
        if source is not None:
            source.close()
        raise
    st = ServeState(model, source, api_key=api_key, limits=limits, access_log=a.access_log)

    def ready(url: str) -> None:
        say(f"serving on {url}  (kiosk: {url}/  API: {url}/openapi.json)")
        if api_key:  # printed once, never logged: the kiosk opens it and gets a session cookie
            say(f"kiosk login link (one use): {url}/login?token={st.access.new_login_token()}")
    try:  # uvicorn stops gracefully on SIGINT/SIGTERM, then re-raises the signal: here, as KeyboardInterrupt
        with sigterm_as_interrupt():
            run_server(st, a.host, a.port, on_ready=ready)
    except KeyboardInterrupt:
        pass
    say("stopped")
    return 0


def _common(s: argparse.ArgumentParser) -> None:
    from molmo_edge.runtime.cli.main import add_runtime_options
    s.add_argument("bundle", metavar="BUNDLE", help="bundle folder made by `molmo-edge export`")
    s.add_argument("--max-crops", type=int, default=None, help="most high-res crops per frame (fewer = faster)")
    add_runtime_options(s, ("onnxruntime", "tensorrt"))


def add_commands(sub: Any) -> None:
    s = sub.add_parser("watch", help="answer questions about a camera or video, one JSON line per answer",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Ask one or more questions about frames from a source and print one JSON line per "
                                   "(frame, prompt): time, timestamp, frame id, prompt, answer, points (pixels and "
                                   "percent), count, latency_ms per stage, and frames dropped/skipped since the last "
                                   "line. Several prompts share one vision pass per frame. Ctrl-C stops with a summary.",
                       epilog="examples:\n  molmo-edge watch bundle --source 0 --prompt \"How many people are there?\" --every 2\n"
                              "  molmo-edge watch bundle --source clip.mp4 --prompt \"Point to the cups\" --overlay out.mp4\n"
                              "  molmo-edge watch bundle --source rtsp://cam/stream --prompt \"Is the door open?\" --on-change "
                              "--jsonl door.jsonl\n"
                              "  molmo-edge watch molmo2-bundle --source 0 --clip 10 --prompt \"How many people walked in?\"")
    _common(s)
    s.add_argument("--source", required=True, metavar="URI", help=f"camera, stream, file or images: {SOURCES}")
    s.add_argument("--prompt", dest="prompts", action="append", required=True, metavar="TEXT",
                   help="question to ask about each answered frame (repeatable)")
    when = s.add_mutually_exclusive_group()
    when.add_argument("--every", type=float, metavar="SECONDS", help="answer at most one frame per SECONDS")
    when.add_argument("--on-change", action="store_true", help="answer only frames whose scene changed since the last answer")
    s.add_argument("--clip", type=float, default=None, metavar="SECONDS",
                   help="Molmo2: ask about the last SECONDS of the source as a video (capture times as timestamps); "
                        "answered every SECONDS unless --every says otherwise")
    s.add_argument("--change-threshold", type=float, default=0.02, metavar="F",
                   help="--on-change sensitivity: mean difference of 32x32 gray thumbnails, 0..1 (default 0.02)")
    s.add_argument("--jsonl", metavar="FILE", help="append the JSON lines to FILE instead of printing them")
    s.add_argument("--overlay", metavar="FILE.mp4", help="write answered frames with their points drawn as a video")
    s.add_argument("--show", action="store_true", help="show answered frames in a window (needs a display)")
    s.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per answer (default 64)")
    s.add_argument("--max-frames", type=int, default=None, metavar="N", help="stop after N answered frames")
    s.add_argument("--loop", action="store_true", help="play a video file or image folder again at its end")
    s.add_argument("--give-up-after", type=float, default=None, metavar="SECONDS",
                   help="stop when a lost camera/stream cannot be reconnected for this long (default: keep trying)")
    s.set_defaults(fn=cmd_watch)

    s = sub.add_parser("serve", help="HTTP API (+ OpenAI-compatible chat) and a kiosk page for a bundle",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve a bundle over HTTP: POST /v1/query, POST /v1/chat/completions (OpenAI-compatible, "
                                   "SSE streaming), GET /v1/frame, /healthz, /metrics, /openapi.json, and a kiosk page at /. "
                                   "One model, a bounded queue (503 + Retry-After when full), limits on every input.",
                       epilog="examples:\n  molmo-edge serve bundle --source /dev/video0        # open http://127.0.0.1:8000/\n"
                              "  curl -F image=@cat.jpg -F prompt='Point to the cat' http://127.0.0.1:8000/v1/query\n"
                              "  molmo-edge serve molmo2-bundle --source 0 --clip-history 10   # then POST /v1/query\n"
                              "      {\"prompt\": \"How many people walked in?\", \"clip\": 10}\n"
                              "  MOLMO_EDGE_API_KEY=secret molmo-edge serve bundle --host 0.0.0.0 --allow-host robot.local\n"
                              "      # open the printed one-time login link on the kiosk; API clients send the key as a header")
    _common(s)
    s.add_argument("--source", metavar="URI", help=f"camera for /v1/frame, the kiosk and image-less queries: {SOURCES}")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    s.add_argument("--api-key", metavar="KEY", help="require KEY (Authorization: Bearer KEY or X-API-Key: KEY) on every path but /healthz "
                        "(or set MOLMO_EDGE_API_KEY)")
    s.add_argument("--queue-size", type=int, default=8, help="requests that may wait for the model (default 8); more get 503")
    s.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS",
                   help="most seconds a request waits in the queue (then 503), and separately the most its generation "
                        "takes (then 504, not to be retried) (default 60)")
    s.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="request line and headers must arrive within this (default 10)")
    s.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="a request body must arrive, and each piece of an answer be taken, within this (default 30)")
    s.add_argument("--max-new-tokens", type=int, default=512, help="cap on tokens per answer a client may ask for (default 512)")
    s.add_argument("--default-new-tokens", type=int, default=128, help="tokens per answer when the client does not say (default 128)")
    s.add_argument("--max-body-mb", type=float, default=16.0, help="largest request body in MiB (default 16)")
    s.add_argument("--max-image-mp", type=float, default=24.0, help="largest image in megapixels (default 24)")
    s.add_argument("--max-prompt-chars", type=int, default=2000, help="longest prompt (default 2000 characters)")
    s.add_argument("--max-images", type=int, default=4, metavar="N",
                   help="Molmo2: most images in one chat conversation (default 4; more get a 400). Molmo v1 sees one")
    s.add_argument("--clip-history", type=float, default=None, metavar="SECONDS",
                   help="Molmo2: keep the camera's last SECONDS (at up to 4 frames/s) so that /v1/query can ask about "
                        "them as a video with `clip` (at most SECONDS)")
    s.add_argument("--max-connections", type=int, default=64,
                   help="requests in progress (past their body) before new ones get 503; /healthz is exempt (default 64)")
    s.add_argument("--max-sockets", type=int, default=512, help="open TCP connections; more are closed at once (default 512)")
    s.add_argument("--allow-host", action="append", metavar="NAME",
                   help="accept requests for this Host name (repeatable; loopback names, this machine's name and IP "
                        "addresses always work; '*' turns the check off)")
    s.add_argument("--cors-origin", action="append", metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://dash.local:3000; '*' for any) call the API (default: none)")
    s.add_argument("--access-log", action="store_true", help="log every request to stderr")
    s.set_defaults(fn=cmd_serve)
