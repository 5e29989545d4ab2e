"""What one server holds: the model and its worker, the camera, limits, schemas, access and metrics."""
from __future__ import annotations

import os
import threading
import time
from typing import Any

from molmo_edge.runtime.serve import schemas
from molmo_edge.runtime.serve.conversation import ContextCheck, is_molmo2
from molmo_edge.runtime.serve.errors import APIError
from molmo_edge.runtime.serve.limits import Limits
from molmo_edge.runtime.serve.metrics import Metrics
from molmo_edge.runtime.serve.security import Access, HostCheck
from molmo_edge.runtime.serve.worker import ModelWorker

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")


def _served_name(model: Any) -> str:
    manifest = getattr(getattr(model, "bundle", None), "manifest", None) or {}
    return (manifest.get("model") or {}).get("name") or "molmo"


def _model_crops(model: Any) -> int:
    return int(getattr(getattr(getattr(model, "cfg", None), "preprocess", None), "max_crops", 12) or 12)


class ServeState:
    def __init__(self, model: Any, source: Any = None, *, api_key: str | None = None, limits: Limits | None = None,
                 model_name: str | None = None, access_log: bool = False):
        self.model, self.source = model, source
        self.limits = lim = limits or Limits()
        self.model_name = model_name or _served_name(model)
        self.model_names = list(dict.fromkeys([self.model_name, "molmo"]))
        self.crops_cap = min(lim.max_crops, _model_crops(model)) if lim.max_crops else _model_crops(model)
        # with --max-crops, a request that does not say gets the cap too (not the model's larger default)
        self.default_crops = self.crops_cap if lim.max_crops else None
        self.molmo2 = is_molmo2(model)
        self.family = "Molmo2" if self.molmo2 else "Molmo v1"
        self.images_cap = lim.max_images if self.molmo2 else schemas.IMAGES_PER_CONVERSATION
        # seconds of camera history a query may ask about as a video (None: no clips here)
        history = float(getattr(source, "history", 0.0) or 0.0)
        self.clip_cap = history if self.molmo2 and history > 0 else None
        self.schemas = schemas.build(lim, self.model_names, self.crops_cap, self.images_cap, self.family, self.clip_cap)
        self.access = Access(api_key)
        self.hosts = HostCheck(lim.allow_hosts)
        self.access_log = access_log
        self.worker = ModelWorker(lim.queue_size)
        self.context = ContextCheck(model)
        self.started = time.time()
        self.in_progress = 0                 # requests holding a slot (see --max-connections)
        self.open_sockets = lambda: 0        # set by the server
        self.metrics = Metrics(self._live)
        self._last_camera: tuple[int, list[Any]] | None = None   # (frame id, points) of the last camera answer
        self._jpeg: tuple[Any, bytes] | None = None               # one encoded frame, shared by viewers
        self._jpeg_lock = threading.Lock()
        with open(os.path.join(STATIC, "kiosk.html"), "rb") as f:
            self.kiosk = f.read()
        if source is not None:
            source.start()  # the kiosk's live view needs frames before the first question

    @property
    def api_key(self) -> str | None:
        return self.access.api_key

    def close(self) -> None:
        self.worker.close(timeout=5)

    def _live(self) -> dict[str, float]:
        stats = getattr(self.model, "stats", {}) or {}
        live = {"molmo_queue_depth": self.worker.depth, "molmo_queue_capacity": self.worker.capacity,
                "molmo_model_busy": int(self.worker.busy), "molmo_requests_in_progress": self.in_progress,
                "molmo_connections_open": self.open_sockets(), "molmo_rejected_total": self.metrics.rejected,
                "molmo_timeouts_total": self.metrics.timeouts, "molmo_questions_total": stats.get("questions", 0),
                "molmo_vision_runs_total": stats.get("vision_runs", 0)}
        src = self.source
        if src is not None:
            live.update(molmo_source_up=int(src.status == "running"), molmo_source_frames_total=src.frames,
                        molmo_source_dropped_total=src.dropped, molmo_source_reconnects_total=src.reconnects)
        return live

    # --- camera ------------------------------------------------------------------------------------
    def camera_frame(self) -> Any:
        """The latest frame (waits up to 2 s for a camera that just started); blocking: call from a thread."""
        if self.source is None:
            raise APIError(400, "no image given and no camera: send an image, or start the server with --source URI",
                           "image", "no_image")
        frame, deadline = self.source.latest(), time.monotonic() + 2.0
        while frame is None and self.source.status == "running" and time.monotonic() < deadline:
            time.sleep(0.05)
            frame = self.source.latest()
        if frame is None:
            raise APIError(503, f"the camera ({self.source.name}) has not delivered a frame yet ({self.source.status}); "
                                "retry shortly", None, "camera_not_ready", {"Retry-After": "1"})
        return frame

    def check_clip(self) -> None:
        """A 400 that says why, where this server offers no clips (`clip` on /v1/query)."""
        if not self.molmo2:
            raise APIError(400, f"`clip` asks about the camera's last seconds as a video, which needs a Molmo2 bundle; "
                                f"{self.model_name} is {self.family}: omit `clip` to ask about the latest frame",
                           "clip", "clip_unsupported")
        if self.source is None:
            raise APIError(400, "`clip` asks about the camera's last seconds, but this server has no camera: start it "
                                "with --source URI --clip-history SECONDS", "clip", "no_clip_history")
        if self.clip_cap is None:
            raise APIError(400, f"this server keeps no history of its camera ({self.source.name}): restart it with "
                                "--clip-history SECONDS to ask about clips", "clip", "no_clip_history")

    def camera_clip(self, seconds: float) -> tuple[Any, Any, dict[str, Any]]:
        """(the last `seconds` of the camera as a preprocessed Molmo2 video, its newest frame, a description:
        frames kept, seconds covered, start, end). Blocking: call from a thread."""
        from molmo_edge.runtime.serve.watch import clip_media
        self.check_clip()
        # a clip shorter than the time between kept frames holds one frame: a one-frame video, still an answer
        got = clip_media(self.model, self.source, seconds, min_frames=1)
        if got is None:
            raise APIError(503, f"the camera ({self.source.name}) has not delivered a frame yet ({self.source.status}); "
                                "retry shortly", None, "camera_not_ready", {"Retry-After": "1"})
        return got

    def remember_camera_points(self, frame_id: int, points: list[Any]) -> None:
        self._last_camera = (frame_id, points)

    def frame_jpeg(self, points: bool) -> tuple[bytes, Any]:
        import cv2
        if self.source is None:
            raise APIError(404, "no camera: start the server with --source URI to see frames here", None, "no_camera")
        frame = self.camera_frame()
        last = self._last_camera if points else None
        key = (frame.id, last and last[0], points)
        with self._jpeg_lock:
            if self._jpeg and self._jpeg[0] == key:
                return self._jpeg[1], frame
            if last:
                from molmo_edge.runtime.overlay import draw_points
                bgr = draw_points(frame.rgb, last[1])
            else:
                bgr = cv2.cvtColor(frame.rgb, cv2.COLOR_RGB2BGR)
            ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 85])
            self._jpeg = (key, buf.tobytes())
            return self._jpeg[1], frame

    def health(self) -> dict[str, Any]:
        src = self.source
        return {"status": "ok", "model": self.model_name, "uptime_s": round(time.time() - self.started, 1),
                "queue": {"depth": self.worker.depth, "capacity": self.worker.capacity, "busy": self.worker.busy},
                "source": None if src is None else {"name": src.name, "status": src.status, "frames": src.frames,
                                                    "dropped": src.dropped, "reconnects": src.reconnects,
                                                    "clip_history_s": float(getattr(src, "history", 0.0) or 0.0)}}
