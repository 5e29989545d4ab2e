"""Molmo2 image and video preprocessing in numpy, bit-compatible with HF transformers 5.24
(`Molmo2ImageProcessor`, `Molmo2VideoProcessor`; molmo2-spec.md §5 and §7).

One image becomes a low-res 378x378 view (crop 0) plus th x tw overlapping 378x378 crops of a canvas the
whole image is resized to (aspect ratio not kept), with the pooling index tensor that tells the connector
which patches each image token pools (2x2 windows, -1 = empty slot). A video becomes sampled frames, each
resized to 378x378 and pooled 3x3, with their timestamps.

The resize is torch's CPU bilinear without antialias (`resize.resize_bilinear`, bit for bit the kernel the
goldens ran). No torch here: numpy, PIL, OpenCV only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.preprocess import ImageInput, load_image, select_tiling
from molmo_edge.runtime.resize import resize_bilinear

__all__ = [
    "ImageSettings", "VideoSettings", "Molmo2Image", "Molmo2Video", "VideoError",
    "crop_geometry", "arange_for_pooling", "preprocess_image", "batch_images", "sample_frame_indices",
    "preprocess_video", "load_video", "clip_video",
]

_F32 = np.float32


class VideoError(MolmoEdgeError):
    """A video input cannot be read or sampled; the message names the problem and the fix."""


# --------------------------------------------------------------------------------------------
# Settings (preprocessor_config.json / video_preprocessor_config.json)
# --------------------------------------------------------------------------------------------

def _pair(v: Any, name: str) -> tuple[int, int]:
    if isinstance(v, (int, float)):
        return int(v), int(v)
    if isinstance(v, dict):
        return int(v["height"]), int(v["width"])
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return int(v[0]), int(v[1])
    raise MolmoEdgeError(f"processor setting {name}={v!r} is not a pair; expected [h, w] or {{'height', 'width'}}")


def _read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise MolmoEdgeError(f"{path} cannot be read ({e}); copy it again from the checkpoint") from None
    if not isinstance(d, dict):
        raise MolmoEdgeError(f"{path} is not a JSON object; copy it again from the checkpoint")
    return d


@dataclass(frozen=True)
class _CommonSettings:
    crop_size: int = 378
    patch_size: int = 14
    pooling_size: tuple[int, int] = (2, 2)
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True

    @property
    def crop_patches(self) -> int:
        return self.crop_size // self.patch_size

    def normalise(self, u8: np.ndarray) -> np.ndarray:
        """uint8 -> float32 the way HF's torchvision backend does it: rescale and normalise fused into
        (x - mean/factor) / (std/factor) in float32; only one of them, or neither (raw values as float32)."""
        x = u8.astype(_F32)
        if self.do_rescale and self.do_normalize:
            mean = (np.asarray(self.image_mean, np.float64) / self.rescale_factor).astype(_F32)
            std = (np.asarray(self.image_std, np.float64) / self.rescale_factor).astype(_F32)
            return (x - mean) / std
        if self.do_rescale:
            return x * _F32(self.rescale_factor)
        if self.do_normalize:
            return (x - np.asarray(self.image_mean, _F32)) / np.asarray(self.image_std, _F32)
        return x

    @staticmethod
    def _common(d: dict, pooling_default: tuple[int, int]) -> dict:
        size = _pair(d.get("size", {"height": 378, "width": 378}), "size")
        if size[0] != size[1]:
            raise MolmoEdgeError(f"Molmo2 needs a square crop size, the processor config says {size}; fix `size`")
        out = dict(crop_size=size[0], patch_size=int(d.get("patch_size", 14)),
                   pooling_size=_pair(d.get("pooling_size", pooling_default), "pooling_size"))
        for k in ("image_mean", "image_std"):
            if d.get(k) is not None:
                v = d[k]
                out[k] = tuple(float(x) for x in (v if isinstance(v, (list, tuple)) else [v] * 3))
        # Missing flags mean "on": AI2's processors always rescaled and normalised (see VideoSettings).
        for k in ("do_rescale", "do_normalize"):
            if d.get(k) is not None:
                out[k] = bool(d[k])
        if d.get("rescale_factor") is not None:
            out["rescale_factor"] = float(d["rescale_factor"])
        resample = d.get("resample", 2)
        if resample not in (2, "bilinear", None):
            raise MolmoEdgeError(f"processor config asks for resample={resample!r}; only bilinear (2) is implemented")
        if size[0] % out["patch_size"]:
            raise MolmoEdgeError(f"crop size {size[0]} is not a multiple of patch_size {out['patch_size']}")
        return out


@dataclass(frozen=True)
class ImageSettings(_CommonSettings):
    """`preprocessor_config.json` of a Molmo2 checkpoint (defaults = Molmo2-4B's)."""
    max_crops: int = 8
    overlap_margins: tuple[int, int] = (4, 4)

    @classmethod
    def from_dict(cls, d: dict) -> "ImageSettings":
        out = cls._common(d, (2, 2))
        out["max_crops"] = int(d.get("max_crops", 8))
        out["overlap_margins"] = _pair(d.get("overlap_margins", [4, 4]), "overlap_margins")
        return cls(**out)

    @classmethod
    def from_folder(cls, folder: str) -> "ImageSettings":
        p = os.path.join(folder, "preprocessor_config.json")
        return cls.from_dict(_read_json(p)) if os.path.exists(p) else cls()


@dataclass(frozen=True)
class VideoSettings(_CommonSettings):
    """`video_preprocessor_config.json`. Trap (spec §7): transformers 5.24's video processor has no
    do_rescale/do_normalize defaults and feeds raw uint8 when the config lacks them; AI2's processor always
    normalised, so missing keys mean True here."""
    pooling_size: tuple[int, int] = (3, 3)
    num_frames: int = 64
    max_fps: float | None = 2.0
    do_sample_frames: bool = True

    @classmethod
    def from_dict(cls, d: dict) -> "VideoSettings":
        out = cls._common(d, (3, 3))
        out["num_frames"] = int(d.get("num_frames") or 64)
        out["max_fps"] = None if d.get("max_fps", 2) is None else float(d.get("max_fps", 2))
        out["do_sample_frames"] = bool(d.get("do_sample_frames", True))
        return cls(**out)

    @classmethod
    def from_folder(cls, folder: str) -> "VideoSettings":
        p = os.path.join(folder, "video_preprocessor_config.json")
        return cls.from_dict(_read_json(p)) if os.path.exists(p) else cls()


def _patchify(crops: np.ndarray, patch: int) -> np.ndarray:
    """[N, S, S, C] -> [N, (S/p)^2, p*p*C], patches row-major, each flattened (py, px, c)."""
    n, s, _, c = crops.shape
    k = s // patch
    return crops.reshape(n, k, patch, k, patch, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, k * k, patch * patch * c)


# --------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------

def crop_geometry(height: int, width: int, settings: ImageSettings,
                  max_crops: int | None = None) -> tuple[int, int, int, int]:
    """(tiles_h, tiles_w, canvas_h, canvas_w) for an image of height x width px (spec §5.1-5.2)."""
    left, right = settings.overlap_margins
    window = (settings.crop_patches - left - right) * settings.patch_size
    margin = (left + right) * settings.patch_size
    th, tw = select_tiling(height - margin, width - margin, window, max_crops or settings.max_crops)
    return th, tw, th * window + margin, tw * window + margin


def arange_for_pooling(index_grid: np.ndarray, pool_h: int, pool_w: int) -> tuple[np.ndarray, int, int]:
    """Cut a [h, w] patch-index grid into pool_h x pool_w windows -> ([rows*cols, pool_h*pool_w], rows, cols).
    The grid is padded with -1 to a multiple of the pool, pad//2 before and the rest after."""
    ph = -index_grid.shape[0] % pool_h
    pw = -index_grid.shape[1] % pool_w
    g = np.pad(index_grid, ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)), constant_values=-1)
    rows, cols = g.shape[0] // pool_h, g.shape[1] // pool_w
    return g.reshape(rows, pool_h, cols, pool_w).transpose(0, 2, 1, 3).reshape(rows * cols, pool_h * pool_w), rows, cols


def _high_res_index_grid(th: int, tw: int, k: int, left: int, right: int) -> np.ndarray:
    """Patch index of every kept canvas patch: crop c patch (r, q) -> c*k*k + r*k + q, overlap margins
    dropped except at the canvas border, laid out as the canvas patch grid."""
    g = np.arange(th * tw * k * k, dtype=np.int32).reshape(th, tw, k, k)
    if left:
        g[1:, :, :left, :] = -1
        g[:, 1:, :, :left] = -1
    if right:
        g[:-1, :, -right:, :] = -1
        g[:, :-1, :, -right:] = -1
    g = g.transpose(0, 2, 1, 3).reshape(-1)
    g = g[g >= 0]
    return g.reshape(th * (k - left - right) + left + right, -1)


@dataclass
class Molmo2Image:
    """One preprocessed image: crops (low-res view first), its pooling windows (indices into its own
    patches, i.e. not yet offset by earlier images), and the pooled grid [low_h, low_w, high_h, high_w]."""
    pixel_values: np.ndarray        # float32 [1 + th*tw, patches_per_crop, patch*patch*3]
    token_pooling: np.ndarray       # int32 [low_h*low_w + high_h*high_w, pool_h*pool_w], -1 = empty
    grid: tuple[int, int, int, int]
    tiling: tuple[int, int]
    size: tuple[int, int]           # (height, width) of the original image, for mapping points back

    @property
    def num_crops(self) -> int:
        return int(self.pixel_values.shape[0])

    @property
    def num_tokens(self) -> int:
        lh, lw, hh, hw = self.grid
        return lh * lw + hh * hw


def preprocess_image(image: ImageInput, settings: ImageSettings | None = None, *, max_crops: int | None = None,
                     bgr: bool = False) -> Molmo2Image:
    """Crops, pooling windows and grid of one image (path, bytes, PIL image or numpy array; spec §5)."""
    s = settings or ImageSettings()
    if max_crops is not None and max_crops < 1:
        raise MolmoEdgeError(f"max_crops must be >= 1, got {max_crops}")
    rgb = load_image(image, bgr=bgr)
    h, w = rgb.shape[:2]
    k, crop = s.crop_patches, s.crop_size
    left, right = s.overlap_margins
    stride = (k - left - right) * s.patch_size
    th, tw, ch, cw = crop_geometry(h, w, s, max_crops)
    canvas = s.normalise(resize_bilinear(rgb, ch, cw))
    crops = np.empty((1 + th * tw, crop, crop, 3), _F32)
    crops[0] = s.normalise(resize_bilinear(rgb, crop, crop))
    for r in range(th):
        for c in range(tw):
            crops[1 + r * tw + c] = canvas[r * stride:r * stride + crop, c * stride:c * stride + crop]
    ph, pw = s.pooling_size
    low, lh, lw = arange_for_pooling(np.arange(k * k, dtype=np.int32).reshape(k, k), ph, pw)
    high, hh, hw = arange_for_pooling(_high_res_index_grid(th, tw, k, left, right), ph, pw)
    high = np.where(high >= 0, high + k * k, -1).astype(np.int32)  # high-res crops follow the low-res view
    return Molmo2Image(_patchify(crops, s.patch_size), np.concatenate([low, high]).astype(np.int32),
                       (lh, lw, hh, hw), (th, tw), (h, w))


def batch_images(images: Sequence[Molmo2Image]) -> dict[str, np.ndarray]:
    """Several images of one sample -> HF's `pixel_values`, `image_token_pooling` (indices offset by the
    patches of the earlier images), `image_grids`, `image_num_crops`."""
    pooled, offset = [], 0
    for im in images:
        pooled.append(np.where(im.token_pooling >= 0, im.token_pooling + offset, -1).astype(np.int32))
        offset += im.pixel_values.shape[0] * im.pixel_values.shape[1]
    return {
        "pixel_values": np.concatenate([im.pixel_values for im in images]),
        "image_token_pooling": np.concatenate(pooled),
        "image_grids": np.array([im.grid for im in images], dtype=np.int64),
        "image_num_crops": np.array([im.num_crops for im in images], dtype=np.int64),
    }


# --------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------

def sample_frame_indices(total_frames: int, fps: float | None, settings: VideoSettings | None = None, *,
                         num_frames: int | None = None) -> np.ndarray:
    """Which frames the model sees (spec §7): up to `num_frames` (64), and at most `max_fps` per second of
    video when the video is faster; `arange(0, N, N/target)` in float, truncated (torch's arange computes
    in double and stores float32, reproduced here)."""
    s = settings or VideoSettings()
    if total_frames < 1:
        raise VideoError("the video has no frames; pass a video with at least one frame")
    if not s.do_sample_frames and num_frames is None:
        return np.arange(total_frames, dtype=np.int64)
    fps = float(fps) if fps else (s.max_fps or 1.0)
    target = int(num_frames or s.num_frames)
    if s.max_fps is not None and fps > s.max_fps:
        target = min(target, int(total_frames / fps * s.max_fps))
    target = max(min(target, total_frames), 1)
    step = total_frames / target
    n = int(np.ceil(total_frames / step))
    return (np.arange(n, dtype=np.float64) * step).astype(_F32).astype(np.int64)


@dataclass
class Molmo2Video:
    """Sampled, preprocessed frames of one video, with the timestamps (seconds) the prompt shows."""
    pixel_values: np.ndarray        # float32 [frames, patches_per_crop, patch*patch*3]
    token_pooling: np.ndarray       # int64 [frames * rows * cols, pool_h*pool_w]
    grid: tuple[int, int, int]      # (frames, rows, cols)
    timestamps: list[float]
    frame_indices: list[int] = field(default_factory=list)
    size: tuple[int, int] = (0, 0)  # (height, width) of the original frames

    @property
    def num_tokens(self) -> int:
        f, r, c = self.grid
        return f * r * c


def preprocess_video(frames: np.ndarray | Sequence[np.ndarray], timestamps: Sequence[float],
                     settings: VideoSettings | None = None, *, frame_indices: Sequence[int] | None = None,
                     bgr: bool = False) -> Molmo2Video:
    """Already-sampled frames (uint8 [T, H, W, 3] or a list of images) and their times in seconds -> the
    video inputs. Use `sample_frame_indices` (or `load_video`) to pick the frames of a clip."""
    s = settings or VideoSettings()
    frames = [load_image(f, bgr=bgr) for f in frames]
    if not frames:
        raise VideoError("no video frames given; pass at least one frame")
    if len(timestamps) != len(frames):
        raise VideoError(f"{len(frames)} frames but {len(timestamps)} timestamps; pass one time per frame")
    k, crop = s.crop_patches, s.crop_size
    pix = np.empty((len(frames), k * k, s.patch_size * s.patch_size * 3), _F32)
    for i, f in enumerate(frames):
        pix[i] = _patchify(s.normalise(resize_bilinear(f, crop, crop))[None], s.patch_size)[0]
    pool, rows, cols = arange_for_pooling(np.arange(k * k, dtype=np.int64).reshape(k, k), *s.pooling_size)
    offsets = (np.arange(len(frames), dtype=np.int64) * k * k)[:, None, None]
    pooled = np.where(pool[None] >= 0, pool[None] + offsets, -1).reshape(-1, pool.shape[1]).astype(np.int64)
    idx = list(frame_indices) if frame_indices is not None else list(range(len(frames)))
    return Molmo2Video(pix, pooled, (len(frames), rows, cols), [float(t) for t in timestamps], idx,
                       frames[0].shape[:2])


def clip_video(frames: np.ndarray | Sequence[np.ndarray], times: Sequence[float], settings: VideoSettings | None = None,
               *, num_frames: int | None = None) -> Molmo2Video:
    """A camera clip (frames with capture times in seconds, e.g. `cameras.clip_arrays`) -> sampled video inputs.
    The clip's real rate (frames / covered time) drives the model's sampling, and the prompt shows each sampled
    frame's capture time since the first frame, not index / nominal fps."""
    s = settings or VideoSettings()
    t = np.asarray(times, np.float64)
    if len(t) != len(frames) or len(t) == 0:
        raise VideoError(f"{len(frames)} frames but {len(t)} capture times; pass one time per frame")
    t = t - t[0]
    step = float(np.median(np.diff(t))) if len(t) > 1 else 0.0
    duration = float(t[-1]) + step
    fps = len(t) / duration if duration > 0 else None
    idx = sample_frame_indices(len(t), fps, s, num_frames=num_frames)
    return preprocess_video([frames[int(i)] for i in idx], [float(t[i]) for i in idx], s,
                            frame_indices=[int(i) for i in idx])


def _read_npz_video(path: str) -> tuple[np.ndarray, float | None]:
    try:
        with np.load(path) as z:
            if "frames" not in z.files:
                raise VideoError(f"{path} has no `frames` array; save uint8 [T, H, W, 3] frames as `frames` "
                                 "(and the frame rate as `fps`)")
            frames = z["frames"]
            fps = float(z["fps"]) if "fps" in z.files else None
    except VideoError:
        raise
    except Exception as e:
        raise VideoError(f"{path} is not a readable .npz ({type(e).__name__}); re-save it with numpy.savez") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise VideoError(f"{path}: `frames` is {frames.dtype} {list(frames.shape)}; it must be uint8 [T, H, W, 3] RGB")
    return frames, fps


def load_video(src: str | os.PathLike | np.ndarray, settings: VideoSettings | None = None, *,
               fps: float | None = None, num_frames: int | None = None) -> Molmo2Video:
    """A video file (decoded with OpenCV), an .npz with `frames` uint8 [T, H, W, 3] (RGB) and `fps`, or a
    uint8 [T, H, W, 3] RGB array (pass `fps`) -> sampled, preprocessed frames with timestamps index/fps."""
    s = settings or VideoSettings()
    if isinstance(src, np.ndarray):
        if src.ndim != 4 or src.shape[-1] != 3:
            raise VideoError(f"video array has shape {list(src.shape)}; pass uint8 [T, H, W, 3] RGB frames")
        frames, file_fps = src, None
    else:
        path = os.fspath(src)
        if not os.path.isfile(path):
            raise VideoError(f"video file not found: {path!r}; check the path")
        if path.lower().endswith(".npz"):
            frames, file_fps = _read_npz_video(path)
        else:
            return _load_video_file(path, s, fps, num_frames)
    fps = fps or file_fps
    idx = sample_frame_indices(len(frames), fps, s, num_frames=num_frames)
    fps = fps or s.max_fps or 1.0
    return preprocess_video(frames[idx], [int(i) / fps for i in idx], s, frame_indices=[int(i) for i in idx])


def _load_video_file(path: str, s: VideoSettings, fps: float | None, num_frames: int | None) -> Molmo2Video:
    """Decode only the sampled frames. OpenCV's frame count is a container estimate: the pass that keeps the
    sampled frames also counts them all, and when the estimate was wrong a second pass samples the true count."""
    import cv2

    cap = cv2.VideoCapture(path)
    if not cap.isOpened():
        raise VideoError(f"OpenCV cannot open {path!r} as a video; pass an .mp4/.avi/.mkv it can decode, "
                         "or an .npz with `frames` and `fps`")
    fps = fps or float(cap.get(cv2.CAP_PROP_FPS)) or None
    estimate = int(cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
    cap.release()
    total = max(estimate, 1)
    for _ in range(2):
        idx = sample_frame_indices(total, fps, s, num_frames=num_frames)
        frames, count = _read_frames(path, {int(i) for i in idx})
        if count == total and len(frames) == len(idx):
            break
        if count == 0:
            raise VideoError(f"OpenCV decoded no frames from {path!r}; re-encode it (ffmpeg -i IN -c:v libx264 OUT.mp4)")
        total = count
    else:
        raise VideoError(f"{path!r}: OpenCV could not decode every sampled frame the same way twice; re-encode "
                         "the video (ffmpeg -i IN -c:v libx264 OUT.mp4)")
    fps = fps or s.max_fps or 1.0
    return preprocess_video([frames[i] for i in sorted(frames)], [int(i) / fps for i in idx], s,
                            frame_indices=[int(i) for i in idx], bgr=True)


def _read_frames(path: str, wanted: set[int]) -> tuple[dict[int, np.ndarray], int]:
    """The wanted frames (BGR) of one sequential pass, and how many frames the pass found."""
    import cv2

    cap = cv2.VideoCapture(path)
    frames, i = {}, 0
    while cap.grab():
        if i in wanted:
            ok, bgr = cap.retrieve()
            if ok:
                frames[i] = bgr
        i += 1
    cap.release()
    return frames, i
