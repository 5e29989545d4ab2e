"""Molmo image preprocessing, bit-compatible with the Hugging Face Molmo processor (molmo-spec.md §3).

Pipeline for one image (HF "overlap-and-resize-c2", torchvision resizer):

1. decode to uint8 RGB (EXIF orientation is ignored, as in HF);
2. choose a rows x cols tiling of 336 px crops that overlap by 4 patches on each side (§3.2);
3. resize (bilinear + antialias, float32, torch semantics: runtime/resize.py) into the tiling canvas, centre it on a
   zero canvas, normalise *after* padding, cut the overlapping crops (§3.3-3.4);
4. resize the whole image the same way to 336x336 for the global view, which goes first;
5. emit the image token ids and, for every pooled feature, the token position that receives it
   (§3.5-3.6), plus the per-patch padding masks with the legacy off-by-one.

Only numpy and PIL are used here; torch is never imported (the runtime must not depend on it).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence, Union

import numpy as np
from PIL import Image, UnidentifiedImageError

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.resize import resize_into

if TYPE_CHECKING:
    from molmo_edge.runtime.config import MolmoConfig

__all__ = [
    "ImageError", "ImageCrops", "load_image", "select_tiling",
    "resize_and_pad", "preprocess_image", "build_inputs",
]

ImageInput = Union[str, "os.PathLike[str]", bytes, bytearray, np.ndarray, Image.Image]

_F32 = np.float32
IGNORE_INDEX = -100  # image_input_idx value of a pooled feature that is discarded


class ImageError(MolmoEdgeError):
    """An input cannot be turned into an RGB image; the one-line message names the problem and the fix.
    (A ValueError, via MolmoEdgeError, so the CLI prints it without a traceback.)"""


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------

def _pil_to_rgb(img: Image.Image) -> np.ndarray:
    with warnings.catch_warnings():  # palette-transparency chatter, as the HF processor does
        warnings.simplefilter("ignore")
        rgb = img.convert("RGB")
    arr = np.array(rgb, dtype=np.uint8)  # a writeable copy (np.asarray of a PIL image is read-only)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.size == 0:
        raise ImageError(f"image has size {img.size}; pass an image with at least one pixel")
    return np.ascontiguousarray(arr)


def _decode(opener: Any, what: str) -> np.ndarray:
    try:
        with Image.open(opener) as img:
            img.load()
            return _pil_to_rgb(img)
    except ImageError:
        raise
    except UnidentifiedImageError:
        raise ImageError(f"{what} is not a readable image (unknown format or corrupt); "
                         "pass a PNG/JPEG/WebP/BMP/TIFF file") from None
    except Image.DecompressionBombError as e:
        raise ImageError(f"{what} is too large to decode safely ({e}); downscale it first") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{what} could not be decoded ({e}); the file is truncated or corrupt, "
                         "re-export or re-download it") from None


def _array_to_rgb(a: np.ndarray, bgr: bool) -> np.ndarray:
    if a.size == 0:
        raise ImageError(f"image array is empty (shape {a.shape}); pass an array with at least one pixel")
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if a.ndim == 2:
        gray = True
    elif a.ndim == 3 and a.shape[2] in (3, 4):
        gray = False
    else:
        raise ImageError(f"image array has shape {a.shape}; pass HxW (grayscale), HxWx3 (RGB, or BGR with "
                         "bgr=True) or HxWx4 (RGBA/BGRA)")

    # dtype -> uint8
    if a.dtype == np.uint8:
        u8 = a
    elif a.dtype == np.bool_:
        u8 = a.astype(np.uint8) * np.uint8(255)
    elif a.dtype == np.uint16:
        # round(x / 257): maps 0..65535 onto 0..255 exactly like a 16->8 bit conversion should
        u8 = ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.floating):
        f = a.astype(np.float64, copy=False)
        if not np.isfinite(f).all():
            raise ImageError("float image array contains NaN or inf; pass finite values in [0, 1]")
        lo, hi = float(f.min()), float(f.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f"float image array has values in [{lo:g}, {hi:g}]; float images must be in [0, 1] "
                             "(divide 0-255 data by 255 or pass it as uint8)")
        u8 = np.rint(f * 255.0).astype(np.uint8)
    elif np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"{a.dtype} image array has values in [{lo}, {hi}]; pass uint8 0-255 "
                             "(or uint16 0-65535, or floats in [0, 1])")
        u8 = a.astype(np.uint8)
    else:
        raise ImageError(f"image array has dtype {a.dtype}; pass uint8, uint16, bool or float in [0, 1]")

    if gray:
        return np.ascontiguousarray(np.repeat(u8[:, :, None], 3, axis=2))
    rgb = u8[:, :, 2::-1] if bgr else u8[:, :, :3]  # alpha is dropped, like PIL convert("RGB")
    return np.ascontiguousarray(rgb)


def load_image(src: ImageInput, *, bgr: bool = False) -> np.ndarray:
    """Return `src` as a contiguous uint8 HxWx3 RGB array.

    `src` may be a file path, the encoded bytes of an image file, a PIL image (``.convert("RGB")``,
    as the HF processor does) or a numpy array: HxWx3 RGB (BGR when ``bgr=True``, e.g. straight from
    OpenCV), HxW / HxWx1 grayscale, HxWx4 RGBA/BGRA (alpha dropped); uint8, uint16 (scaled by 1/257),
    bool, or float in [0, 1]. EXIF orientation is not applied, matching the HF processor.
    ``bgr`` only affects numpy arrays. A contiguous uint8 RGB array is returned as is (not copied).
    Raises ImageError on anything unusable.
    """
    if isinstance(src, np.ndarray):
        return _array_to_rgb(src, bgr)
    if isinstance(src, Image.Image):
        if src.width == 0 or src.height == 0:
            raise ImageError(f"PIL image has size {src.size}; pass an image with at least one pixel")
        return _pil_to_rgb(src)
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise ImageError("image bytes are empty; pass the contents of an image file")
        import io
        return _decode(io.BytesIO(bytes(src)), "image bytes")
    if isinstance(src, (str, os.PathLike)):
        path = os.fspath(src)
        if not os.path.exists(path):
            raise ImageError(f"image file not found: {path!r}; check the path")
        if os.path.isdir(path):
            raise ImageError(f"{path!r} is a directory; pass an image file")
        if os.path.getsize(path) == 0:
            raise ImageError(f"image file {path!r} is empty (0 bytes); re-export or re-download it")
        return _decode(path, f"image file {path!r}")
    raise ImageError(f"cannot use a {type(src).__name__} as an image; pass a file path, bytes, "
                     "a PIL.Image or a numpy array")


# --------------------------------------------------------------------------------------------
# Tiling, resize-and-pad
# --------------------------------------------------------------------------------------------

def select_tiling(h: int, w: int, patch_size: int, max_crops: int) -> tuple[int, int]:
    """Choose (rows, cols) for an image of h x w px tiled by `patch_size` px windows (spec §3.2).

    As in HF, `h`/`w` are the image size minus the total overlap margin (112 px for Molmo) and
    `patch_size` the crop window (224 px). Candidates (i, j) with i*j <= max_crops, sorted by
    (i*j, i); the scale each needs is computed in float32. If all need downscaling the least
    downscaling wins, else the smallest scale >= 1 (ties: first in order).
    """
    if max_crops < 1:
        raise ValueError(f"max_crops must be >= 1, got {max_crops}")
    cands = sorted(((i, j) for i in range(1, max_crops + 1) for j in range(1, max_crops + 1) if i * j <= max_crops),
                   key=lambda t: (t[0] * t[1], t[0]))
    tilings = np.array(cands, dtype=np.int32)
    res = (tilings * patch_size).astype(_F32)
    size = np.array([h, w], dtype=_F32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.min(res / size, axis=-1)
    if np.all(scale < 1):
        ix = int(np.argmax(scale))
    else:
        ix = int(np.argmin(np.where(scale < 1.0, _F32(1e10), scale)))
    return int(tilings[ix, 0]), int(tilings[ix, 1])


def _scaled_size(h: int, w: int, out_h: int, out_w: int) -> tuple[int, int]:
    """HF's float32 aspect-preserving size (truncation), never below 1 px (HF would crash there)."""
    s = min(_F32(out_h) / _F32(h), _F32(out_w) / _F32(w))
    return max(int(_F32(h) * s), 1), max(int(_F32(w) * s), 1)


def _unit_float(image: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 [H, W*3] in [0, 1]; x / 255 in float32 like convert_image_dtype."""
    h, w = image.shape[:2]
    return np.divide(image, _F32(255.0), dtype=_F32).reshape(h, w * 3)


def _resize_pad_normalise(x01: np.ndarray, in_hw: tuple[int, int], out_hw: tuple[int, int], mean: np.ndarray,
                          std: np.ndarray) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Normalised float32 HxWx3 canvas and the (top, left, height, width) box of real pixels.

    `x01` is the image from _unit_float ([H, W*3], not modified). Same arithmetic as HF: resize,
    clip to [0, 1], zero-pad (centred), then (x - mean) / std in float32, so pads hold -mean/std.
    """
    out_h, out_w = int(out_hw[0]), int(out_hw[1])
    h, w = in_hw
    nh, nw = _scaled_size(h, w, out_h, out_w)
    top, left = (out_h - nh) // 2, (out_w - nw) // 2
    canvas = np.empty((out_h, out_w, 3), dtype=_F32)
    rows = canvas.reshape(out_h, out_w * 3)
    inner = rows[top:top + nh, left * 3:(left + nw) * 3]
    resize_into(x01, 3, nh, nw, inner)
    np.clip(inner, _F32(0.0), _F32(1.0), out=inner)
    np.subtract(inner, np.tile(mean, nw), out=inner)
    np.divide(inner, np.tile(std, nw), out=inner)
    pad = np.tile((_F32(0.0) - mean) / std, out_w)
    rows[:top] = pad
    rows[top + nh:] = pad
    rows[top:top + nh, :left * 3] = pad[:left * 3]
    rows[top:top + nh, (left + nw) * 3:] = pad[(left + nw) * 3:]
    return canvas, (top, left, nh, nw)


def _as_f32_triplet(v: Sequence[float]) -> np.ndarray:
    a = np.asarray(v, dtype=_F32).reshape(-1)
    if a.shape != (3,):
        raise ValueError(f"mean/std must have 3 values, got {v!r}")
    return a


def resize_and_pad(image_uint8: np.ndarray, out_hw: tuple[int, int], mean: Sequence[float],
                   std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Aspect-preserving resize into `out_hw`, centred with zero padding, then normalised (spec §3.3).

    Returns the float32 HxWx3 normalised canvas (pad pixels = -mean/std) and the bool HxW mask of
    real pixels.
    """
    img = np.asarray(image_uint8)
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3 or img.size == 0:
        raise ImageError(f"resize_and_pad needs a non-empty uint8 HxWx3 array, got {img.dtype} {img.shape}; "
                         "use load_image() first")
    canvas, (top, left, nh, nw) = _resize_pad_normalise(_unit_float(img), img.shape[:2], out_hw,
                                                        _as_f32_triplet(mean), _as_f32_triplet(std))
    mask = np.zeros(canvas.shape[:2], dtype=bool)
    mask[top:top + nh, left:left + nw] = True
    return canvas, mask


# --------------------------------------------------------------------------------------------
# Crops, tokens, indices
# --------------------------------------------------------------------------------------------

@dataclass
class ImageCrops:
    """One preprocessed image, in the HF processor's layout (before BOS is prepended).

    images: float32 [n_crops, n_patches, patch_dim], global view first.
    image_tokens: int64 [n_image_tokens]: global block then high-res block.
    image_input_idx: int32 [n_crops, tokens_per_crop]: position in `image_tokens` receiving each
        pooled feature (crop-major, raster), -100 = discarded.
    image_masks: float32 [n_crops, n_patches] valid-pixel fraction with HF's legacy off-by-one
        (high-res crops' masks, then a row of -1); None when the config disables padding masks.
    tiling: (rows, cols) of the high-res crops. image_size: original (height, width).
    """
    images: np.ndarray
    image_tokens: np.ndarray
    image_input_idx: np.ndarray
    image_masks: np.ndarray | None
    tiling: tuple[int, int]
    image_size: tuple[int, int] = (0, 0)

    @property
    def n_crops(self) -> int:
        return int(self.images.shape[0])

    @property
    def n_image_tokens(self) -> int:
        return int(self.image_tokens.shape[0])


def _patchify_into(dst: np.ndarray, canvas: np.ndarray, y0s: Sequence[int], x0s: Sequence[int],
                   crop: int, patch: int) -> None:
    """Write crops canvas[y0:y0+crop, x0:x0+crop] for every (y0, x0) on the grid into dst
    [len(y0s)*len(x0s), (crop/patch)^2, patch*patch*C] in '(h dh)(w dw) c -> (h w)(dh dw c)' order."""
    n_r, n_c = len(y0s), len(x0s)
    c = canvas.shape[2]
    g = crop // patch
    sy, sx, sc = canvas.strides
    step_y = y0s[1] - y0s[0] if n_r > 1 else 0  # crops sit on a regular grid
    step_x = x0s[1] - x0s[0] if n_c > 1 else 0
    base = canvas[y0s[0]:, x0s[0]:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=(n_r, n_c, g, g, patch, patch, c),
        strides=(step_y * sy, step_x * sx, patch * sy, patch * sx, sy, sx, sc), writeable=False)
    np.copyto(dst.reshape(n_r, n_c, g, g, patch, patch, c), view)


def _crop_layout(cfg: "MolmoConfig") -> dict[str, int]:
    v, p = cfg.vision, cfg.preprocess
    base_h, base_w = v.input_size
    if base_h != base_w:
        raise ValueError(f"vision input_size {v.input_size} is not square; the Molmo processor assumes square crops")
    patch = v.patch_size
    pool_h, pool_w = cfg.image_pooling
    left_m, right_m = p.overlap_margins
    crop_patches = base_h // patch
    tok_h, tok_w = p.image_token_length_h, p.image_token_length_w
    if (left_m % pool_h or right_m % pool_h or left_m % pool_w or right_m % pool_w
            or (crop_patches + pool_h - 1) // pool_h != tok_h or (crop_patches + pool_w - 1) // pool_w != tok_w
            or crop_patches * patch != base_h):
        raise ValueError(f"inconsistent preprocess config: crop {base_h}px / patch {patch}, margins {p.overlap_margins}, "
                         f"pooling {cfg.image_pooling}, tokens {tok_h}x{tok_w}")
    window_patches = crop_patches - left_m - right_m
    return dict(crop=base_h, patch=patch, pool_h=pool_h, pool_w=pool_w, left_m=left_m, right_m=right_m,
                crop_patches=crop_patches, window_patches=window_patches, window_px=window_patches * patch,
                margin_px=patch * (left_m + right_m), tok_h=tok_h, tok_w=tok_w)


def _kept_ranges(n_tiles: int, crop_patches: int, left_m: int, right_m: int, pool: int) -> list[tuple[int, int]]:
    """Per tile along one axis: (first kept pooled index, number kept) (spec §3.5)."""
    out = []
    for t in range(n_tiles):
        n = crop_patches - left_m - right_m
        if t == 0:
            n += left_m
        if t == n_tiles - 1:
            n += right_m
        start = 0 if t == 0 else left_m // pool
        out.append((start, (n + pool - 1) // pool))
    return out


def _block_tokens(n_rows: int, n_cols: int, ids: dict[str, int]) -> np.ndarray:
    row = np.full(n_cols + 1, ids["<im_patch>"], dtype=np.int64)
    row[-1] = ids["<im_col>"]
    return np.concatenate([[ids["<im_start>"]], np.tile(row, n_rows), [ids["<im_end>"]]]).astype(np.int64)


def _patch_fraction(lo: int, hi: int, starts: np.ndarray, patch: int) -> np.ndarray:
    """Number of pixels of each [s, s+patch) inside [lo, hi)."""
    return np.clip(np.minimum(starts + patch, hi) - np.maximum(starts, lo), 0, patch)


def preprocess_image(image: ImageInput, cfg: "MolmoConfig", *, max_crops: int | None = None,
                     bgr: bool = False) -> ImageCrops:
    """Turn one image into Molmo's crops, image tokens, feature positions and masks (spec §3).

    `max_crops` overrides cfg.preprocess.max_crops (fewer crops = fewer tokens = faster);
    `bgr=True` marks a numpy input as BGR (OpenCV). Tokens, indices and masks equal the HF
    processor's exactly; pixels agree to float32 rounding (usually bit for bit).
    """
    img = load_image(image, bgr=bgr)
    lay = _crop_layout(cfg)
    pp = cfg.preprocess
    n_max = pp.max_crops if max_crops is None else int(max_crops)
    if n_max < 1:
        raise MolmoEdgeError(f"max_crops must be >= 1, got {max_crops}; pass 1-{pp.max_crops} (fewer = faster)")
    mean, std = _as_f32_triplet(pp.image_mean), _as_f32_triplet(pp.image_std)
    h, w = img.shape[:2]
    crop, patch, tok_h, tok_w = lay["crop"], lay["patch"], lay["tok_h"], lay["tok_w"]
    win, margin = lay["window_px"], lay["margin_px"]

    rows, cols = select_tiling(h - margin, w - margin, win, n_max)
    n_hr = rows * cols
    g = crop // patch
    n_patches, patch_dim = g * g, patch * patch * 3

    images = np.empty((1 + n_hr, n_patches, patch_dim), dtype=_F32)
    # global view first
    x01 = _unit_float(img)
    glob, _ = _resize_pad_normalise(x01, (h, w), (crop, crop), mean, std)
    _patchify_into(images[:1], glob, [0], [0], crop, patch)
    # high-res crops
    canvas_hw = (rows * win + margin, cols * win + margin)
    canvas, (top, left, nh, nw) = _resize_pad_normalise(x01, (h, w), canvas_hw, mean, std)
    y0s, x0s = [i * win for i in range(rows)], [j * win for j in range(cols)]
    _patchify_into(images[1:], canvas, y0s, x0s, crop, patch)

    masks: np.ndarray | None = None
    if pp.image_padding_mask:
        masks = np.empty((1 + n_hr, n_patches), dtype=_F32)
        offs = np.arange(g) * patch
        for i, y0 in enumerate(y0s):
            ny = _patch_fraction(top, top + nh, y0 + offs, patch)
            for j, x0 in enumerate(x0s):
                nx = _patch_fraction(left, left + nw, x0 + offs, patch)
                cnt = (ny[:, None] * nx[None, :]).reshape(-1).astype(_F32)
                masks[i * cols + j] = cnt / _F32(patch * patch)
        masks[n_hr] = -1.0  # legacy: the mask rows are shifted by one against the crops

    # tokens: global block, then the stitched high-res grid
    ids = cfg.image_token_ids()
    rk = _kept_ranges(rows, lay["crop_patches"], lay["left_m"], lay["right_m"], lay["pool_h"])
    ck = _kept_ranges(cols, lay["crop_patches"], lay["left_m"], lay["right_m"], lay["pool_w"])
    grid_h, grid_w = sum(n for _, n in rk), sum(n for _, n in ck)
    glob_tokens = _block_tokens(tok_h, tok_w, ids)
    tokens = np.concatenate([glob_tokens, _block_tokens(grid_h, grid_w, ids)])

    idx = np.full((1 + n_hr, tok_h, tok_w), IGNORE_INDEX, dtype=np.int32)
    yy, xx = np.meshgrid(np.arange(tok_h), np.arange(tok_w), indexing="ij")
    idx[0] = 1 + yy * (tok_w + 1) + xx
    hr_start = len(glob_tokens) + 1  # first <im_patch> of the high-res block
    row_off = np.cumsum([0] + [n for _, n in rk])
    col_off = np.cumsum([0] + [n for _, n in ck])
    for i, (sy, ny) in enumerate(rk):
        for j, (sx, nx) in enumerate(ck):
            gy = row_off[i] + np.arange(ny)
            gx = col_off[j] + np.arange(nx)
            idx[1 + i * cols + j, sy:sy + ny, sx:sx + nx] = hr_start + gy[:, None] * (grid_w + 1) + gx[None, :]

    return ImageCrops(images=images, image_tokens=tokens, image_input_idx=idx.reshape(1 + n_hr, tok_h * tok_w),
                      image_masks=masks, tiling=(rows, cols), image_size=(h, w))


def build_inputs(text_ids: Sequence[int] | np.ndarray, crops: ImageCrops | None, bos_id: int) -> dict[str, np.ndarray]:
    """The HF processor's output: [BOS] + image tokens + text ids, image inserted at the start.

    With an image: input_ids int64, images float32, image_input_idx int32 (shifted +1 for BOS where
    >= 0), image_masks float32 (when present). Text only: input_ids int32 alone (as HF).
    """
    text = np.asarray(text_ids, dtype=np.int64).reshape(-1)
    if crops is None:
        return {"input_ids": np.concatenate([[bos_id], text]).astype(np.int32)}
    input_ids = np.concatenate([np.array([bos_id], dtype=np.int64), crops.image_tokens.astype(np.int64), text])
    idx = crops.image_input_idx.astype(np.int32)
    out = {
        "input_ids": input_ids,
        "images": crops.images,
        "image_input_idx": np.where(idx >= 0, idx + 1, idx).astype(np.int32),
    }
    if crops.image_masks is not None:
        out["image_masks"] = crops.image_masks
    return out
