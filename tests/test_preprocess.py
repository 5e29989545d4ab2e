"""Image preprocessing: exact agreement with the HF Molmo processor (golden case), the torch resizer,
the tiling rule, the token/index layout invariants of molmo-spec §3, and input handling."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from molmo_edge.runtime.config import MolmoConfig, load_config
from molmo_edge.runtime.preprocess import (
    ImageCrops, ImageError, build_inputs, load_image, preprocess_image, resize_and_pad, select_tiling,
)
from molmo_edge.runtime.resize import resize_bilinear_aa

GOLDEN = Path(os.environ.get("MOLMO_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))

# MolmoE-1B ids: <im_start> 50280, <im_end> 50281, <im_patch> 50282, <im_col> 50283 (spec §3.7)
CFG = MolmoConfig(layout="molmoe", d_model=64, n_heads=4, n_kv_heads=4, n_layers=1, head_dim=16, ffn_hidden=64,
                  vocab_size=50280, embedding_size=50304, moe_num_experts=8, moe_top_k=2, eos_token_id=50279)
IDS = CFG.image_token_ids()
START, END, PATCH, COL = IDS["<im_start>"], IDS["<im_end>"], IDS["<im_patch>"], IDS["<im_col>"]
MEAN = np.array(CFG.preprocess.image_mean, np.float32)
STD = np.array(CFG.preprocess.image_std, np.float32)
PAD = (np.float32(0) - MEAN) / STD


def _rand_img(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _golden_case(name: str) -> Path:
    p = GOLDEN / "cases" / f"{name}.preprocess.npz"
    if not p.exists():
        pytest.skip(f"golden reference outputs not found at {GOLDEN} (set MOLMO_GOLDEN to the shared/golden folder)")
    return p


# ---------------------------------------------------------------------------------------------
# Golden: the HF processor's own output
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("as_", ["path", "pil", "array"])
def test_golden_astronaut_exact(as_):
    ref = np.load(_golden_case("astronaut_default"))
    cfg = load_config(str(GOLDEN / "molmoe-tiny"))
    png = GOLDEN / "cases" / "astronaut.png"
    src = {"path": png, "pil": Image.open(png), "array": np.asarray(Image.open(png).convert("RGB"))}[as_]
    crops = preprocess_image(src, cfg)
    assert crops.tiling == (2, 2) and crops.n_crops == 5
    text = ref["input_ids"][1 + crops.n_image_tokens:]
    assert text.tolist() == [11447, 27, 3666, 19268, 436, 2460, 15, 17762, 27]  # " User: Describe this image. Assistant:"
    out = build_inputs(text, crops, cfg.eos_token_id)
    assert sorted(out) == sorted(ref.files)
    for k in ref.files:
        assert out[k].dtype == ref[k].dtype, k
        assert out[k].shape == ref[k].shape, k
    np.testing.assert_array_equal(out["input_ids"], ref["input_ids"])
    np.testing.assert_array_equal(out["image_input_idx"], ref["image_input_idx"])
    np.testing.assert_array_equal(out["image_masks"], ref["image_masks"])
    assert np.abs(out["images"] - ref["images"]).max() <= 1e-4


def test_golden_text_only():
    ref = np.load(_golden_case("text_only"))["input_ids"]
    out = build_inputs(ref[1:].tolist(), None, 50279)
    assert list(out) == ["input_ids"]
    assert out["input_ids"].dtype == ref.dtype == np.int32
    np.testing.assert_array_equal(out["input_ids"], ref)


# ---------------------------------------------------------------------------------------------
# Resizer vs torch
# ---------------------------------------------------------------------------------------------

RESIZE_CASES = [
    (480, 640, 560, 746), (480, 640, 252, 336), (512, 512, 560, 560), (512, 512, 336, 336),
    (1, 1, 5, 7), (5, 7, 1, 1), (1, 100, 3, 300), (100, 1, 1000, 2), (7, 3, 1000, 2), (1000, 30, 17, 900),
    (333, 777, 111, 259), (2, 2, 3, 3), (64, 48, 64, 48), (300, 300, 299, 301), (3, 4000, 9, 336),
    (2000, 37, 336, 6), (13, 17, 13, 400), (720, 1280, 336, 189),
]


@pytest.mark.parametrize("ih,iw,oh,ow", RESIZE_CASES)
def test_resize_matches_torch(ih, iw, oh, ow):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    rng = np.random.default_rng(ih * 7919 + iw)
    x = rng.random((ih, iw, 3), dtype=np.float32)
    ref = F.interpolate(torch.from_numpy(x).permute(2, 0, 1)[None], size=(oh, ow), mode="bilinear",
                        antialias=True, align_corners=False)[0].permute(1, 2, 0).numpy()
    got = resize_bilinear_aa(x, oh, ow)
    assert got.shape == (oh, ow, 3) and got.dtype == np.float32
    assert np.abs(got - ref).max() <= 1e-5
    # grayscale (2-D) input
    g = resize_bilinear_aa(x[:, :, 1], oh, ow)
    assert g.shape == (oh, ow)
    assert np.abs(g - ref[:, :, 1]).max() <= 1e-5


def test_resize_leaves_input_alone_and_rejects_bad_sizes():
    x = np.random.default_rng(0).random((20, 30, 3), dtype=np.float32)
    before = x.copy()
    y = resize_bilinear_aa(x, 20, 30)
    np.testing.assert_array_equal(y, x)
    assert y is not x
    np.testing.assert_array_equal(x, before)
    with pytest.raises(ValueError):
        resize_bilinear_aa(x, 0, 5)


# ---------------------------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------------------------

ALL_TILINGS = [(r, c) for r in range(1, 13) for c in range(1, 13) if r * c <= 12]


@pytest.mark.parametrize("rows,cols", ALL_TILINGS)
def test_select_tiling_reaches_every_tiling(rows, cols):
    # an image that fits (rows, cols) exactly needs scale 1 there; larger tilings tie at 1 but come later
    assert select_tiling(rows * 224, cols * 224, 224, 12) == (rows, cols)
    # a bit smaller still picks it (the smallest upscale >= 1)
    assert select_tiling(rows * 224 - 50, cols * 224 - 50, 224, 12) == (rows, cols)


def test_select_tiling_rules():
    assert select_tiling(-50, -50, 224, 12) == (1, 1)      # image smaller than the margins
    assert select_tiling(0, 0, 224, 12) == (1, 1)          # exactly the margins: infinite scales
    assert select_tiling(400, 400, 224, 12) == (2, 2)      # 512x512 -> 2x2 (golden case)
    assert select_tiling(368, 528, 224, 12) == (2, 3)      # 640x480 -> 2 rows x 3 cols (spec §3.8)
    assert select_tiling(10000, 10000, 224, 12) == (3, 3)  # all downscale: least downscaling, fewest crops
    assert select_tiling(10000, 50, 224, 12) == (12, 1)
    rng = np.random.default_rng(1)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(-150, 4000, 2))
        for m in (1, 2, 3, 5, 6, 7, 12, 16):
            r, c = select_tiling(h, w, 224, m)
            assert 1 <= r * c <= m


# ---------------------------------------------------------------------------------------------
# Structure of the outputs
# ---------------------------------------------------------------------------------------------

def _kept(n_tiles: int) -> list[tuple[int, int]]:
    """(first kept pooled row/col, count) per tile, from the spec's words: a crop keeps its 16-patch
    window plus the 4-patch margin on image borders; pooled 2x2 -> counts 10, 8, ..., 8, 10 (12 alone)."""
    if n_tiles == 1:
        return [(0, 12)]
    return [(0, 10)] + [(2, 8)] * (n_tiles - 2) + [(2, 10)]


def _reference_input_idx(tokens: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """The HF bookkeeping, re-derived: number the kept pooled features crop by crop, find the order in
    which the stitched grid visits them (rows of crops, then pooled rows, then crops left to right),
    and send feature n to the <im_patch> whose rank in the high-res block is its place in that order."""
    numbering = np.full((rows, cols, 12, 12), -1, dtype=np.int64)
    n = 0
    for i, (y0, ny) in enumerate(_kept(rows)):
        for j, (x0, nx) in enumerate(_kept(cols)):
            numbering[i, j, y0:y0 + ny, x0:x0 + nx] = np.arange(n, n + ny * nx).reshape(ny, nx)
            n += ny * nx
    visit = numbering.transpose(0, 2, 1, 3).reshape(-1)
    visit = visit[visit >= 0]                        # grid raster position -> feature number
    rank = np.empty(n, dtype=np.int64)
    rank[visit] = np.arange(n)                       # feature number -> grid raster position
    patch_pos = np.nonzero(tokens == PATCH)[0]
    glob, hires = patch_pos[:144], patch_pos[144:]
    assert len(hires) == n
    out = np.full((1 + rows * cols, 144), -100, dtype=np.int64)
    out[0] = glob
    flat = numbering.reshape(rows * cols, 144)
    out[1:] = np.where(flat >= 0, hires[rank[np.maximum(flat, 0)]], -100)
    return out


def _check_structure(c: ImageCrops, expect_tokens: int | None = None) -> None:
    rows, cols = c.tiling
    n = 1 + rows * cols
    assert c.images.shape == (n, 576, 588) and c.images.dtype == np.float32
    assert np.isfinite(c.images).all()
    assert c.image_input_idx.shape == (n, 144) and c.image_input_idx.dtype == np.int32
    assert c.image_masks is not None and c.image_masks.shape == (n, 576) and c.image_masks.dtype == np.float32
    t = c.image_tokens
    assert t.ndim == 1 and np.issubdtype(t.dtype, np.integer)
    if expect_tokens is not None:
        assert len(t) == expect_tokens
    # global block: <im_start> (12 x <im_patch> + <im_col>) x 12 <im_end>
    row = [PATCH] * 12 + [COL]
    assert t[:158].tolist() == [START] + row * 12 + [END]
    # high-res block
    gh, gw = (12 if rows == 1 else rows * 8 + 4), (12 if cols == 1 else cols * 8 + 4)
    assert t[158:].tolist() == [START] + ([PATCH] * gw + [COL]) * gh + [END]
    assert len(t) == 158 + 2 + gh * (gw + 1)
    # every <im_patch> receives exactly one feature; indices point at <im_patch> tokens only
    idx = c.image_input_idx.reshape(-1)
    valid = idx[idx >= 0]
    assert (idx[idx < 0] == -100).all()
    assert len(np.unique(valid)) == len(valid)
    assert (t[valid] == PATCH).all()
    assert set(valid.tolist()) == set(np.nonzero(t == PATCH)[0].tolist())
    assert (idx == -100).sum() == n * 144 - (t == PATCH).sum()
    # global view's 144 features go, in order, to the first 144 <im_patch> tokens
    np.testing.assert_array_equal(c.image_input_idx[0], np.nonzero(t == PATCH)[0][:144])
    # independent re-derivation of the crop -> stitched-grid ordering
    np.testing.assert_array_equal(c.image_input_idx, _reference_input_idx(t, rows, cols))
    # masks: legacy off-by-one leaves a row of -1 last; the rest are pixel fractions
    assert (c.image_masks[-1] == -1).all()
    m = c.image_masks[:-1]
    assert ((m >= 0) & (m <= 1)).all()
    np.testing.assert_array_equal(m, np.round(m * 196).astype(np.float32) / np.float32(196))  # k/196, as HF's mean


SPEC_COUNTS = [  # (H, W) of the array, tiling, crops, image tokens  (spec §3.8)
    ((480, 640), (2, 3), 7, 740),
    ((640, 480), (3, 2), 7, 748),
    ((720, 1280), (3, 4), 13, 1196),
    ((1080, 1920), (3, 4), 13, 1196),
    ((336, 336), (1, 1), 2, 316),
    ((100, 200), (1, 1), 2, 316),
    ((1, 1), (1, 1), 2, 316),
    ((12 * 224 + 112, 336), (12, 1), 13, 1460),
]


@pytest.mark.parametrize("hw,tiling,n_crops,n_tokens", SPEC_COUNTS)
def test_spec_token_counts(hw, tiling, n_crops, n_tokens):
    c = preprocess_image(_rand_img(*hw), CFG)
    assert c.tiling == tiling and c.n_crops == n_crops and c.n_image_tokens == n_tokens
    assert c.image_size == hw
    _check_structure(c, n_tokens)


def test_structure_many_sizes_and_max_crops():
    rng = np.random.default_rng(7)
    sizes = [(480, 640), (33, 900), (900, 33), (1, 500), (500, 1), (2, 2), (250, 1000), (777, 333), (300, 301)]
    sizes += [tuple(int(v) for v in rng.integers(1, 1100, 2)) for _ in range(6)]
    for k, (h, w) in enumerate(sizes):
        for m in (1, 2, 4, 6, 12):
            c = preprocess_image(_rand_img(h, w, k), CFG, max_crops=m)
            assert c.tiling[0] * c.tiling[1] <= m
            assert c.tiling == select_tiling(h - 112, w - 112, 224, m)
            _check_structure(c)


@pytest.mark.parametrize("rows,cols", [(2, 3), (3, 2), (1, 4), (4, 1), (3, 3), (2, 5)])
def test_crop_features_land_on_their_grid_cell(rows, cols):
    """Each kept pooled cell of crop (i, j) at pooled (y, x) covers canvas pixels from
    (i*224 + 28y, j*224 + 28x); it must be sent to grid cell (i*8 + y, j*8 + x) of the high-res block,
    so stitching the kept cells back by their token positions must rebuild the canvas exactly once."""
    h, w = rows * 224 + 112, cols * 224 + 112  # exact fit: no resize, no padding, canvas == image
    img = _rand_img(h, w, rows * 10 + cols)
    c = preprocess_image(img, CFG)
    assert c.tiling == (rows, cols)
    canvas, mask = resize_and_pad(img, (h, w), MEAN, STD)
    assert mask.all()
    gw = cols * 8 + 4 if cols > 1 else 12
    hr_start = 158 + 1
    rebuilt = np.full_like(canvas, np.nan)
    filled = np.zeros(canvas.shape[:2], dtype=int)
    for k in range(rows * cols):
        i, j = divmod(k, cols)
        crop = c.images[1 + k].reshape(24, 24, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(336, 336, 3)
        np.testing.assert_array_equal(crop, canvas[i * 224:i * 224 + 336, j * 224:j * 224 + 336])
        for y in range(12):
            for x in range(12):
                p = int(c.image_input_idx[1 + k, y * 12 + x])
                if p < 0:
                    continue
                gy, gx = divmod(p - hr_start, gw + 1)
                assert (gy, gx) == (i * 8 + y, j * 8 + x)
                cell = crop[28 * y:28 * y + 28, 28 * x:28 * x + 28]
                rebuilt[28 * gy:28 * gy + 28, 28 * gx:28 * gx + 28] = cell
                filled[28 * gy:28 * gy + 28, 28 * gx:28 * gx + 28] += 1
    assert (filled == 1).all()
    np.testing.assert_array_equal(rebuilt, canvas)


def test_resize_and_pad_640x480():
    img = _rand_img(480, 640)
    canvas, mask = resize_and_pad(img, (560, 784), MEAN, STD)
    assert canvas.shape == (560, 784, 3) and canvas.dtype == np.float32 and mask.dtype == bool
    cols = np.nonzero(mask.any(0))[0]
    assert (cols[0], cols[-1] + 1) == (19, 765) and mask[:, 19:765].all()  # 746x560
    np.testing.assert_array_equal(canvas[~mask], np.broadcast_to(PAD, ((~mask).sum(), 3)))
    real = canvas[mask] * STD + MEAN
    assert real.min() >= -1e-6 and real.max() <= 1 + 1e-6


@pytest.mark.parametrize("hw", [(480, 640), (200, 900), (1000, 150), (7, 5), (2800, 336)])
def test_images_match_plain_torch_pipeline(hw):
    """The HF steps written out plainly with torch's resizer: float32 size, x/255, resize, clip,
    centred zero pad, normalise, 336 px crops at stride 224, '(h dh)(w dw) c -> (h w)(dh dw c)'."""
    torch = pytest.importorskip("torch")
    img = _rand_img(*hw, seed=hw[0])
    c = preprocess_image(img, CFG)
    rows, cols = c.tiling

    def canvas(th, tw):
        h, w = img.shape[:2]
        s = min(np.float32(th) / np.float32(h), np.float32(tw) / np.float32(w))
        nh, nw = int(np.float32(h) * s), int(np.float32(w) * s)
        t = torch.from_numpy(img).permute(2, 0, 1).to(torch.float32) / 255
        t = torch.nn.functional.interpolate(t[None], size=(nh, nw), mode="bilinear", antialias=True,
                                            align_corners=False)[0].clamp(0, 1)
        x = t.permute(1, 2, 0).numpy()
        top, left = (th - nh) // 2, (tw - nw) // 2
        x = np.pad(x, [(top, th - nh - top), (left, tw - nw - left), (0, 0)])
        return (x - MEAN) / STD

    def patches(x):
        return x.reshape(24, 14, 24, 14, 3).transpose(0, 2, 1, 3, 4).reshape(576, 588)

    want = [patches(canvas(336, 336))]
    big = canvas(rows * 224 + 112, cols * 224 + 112)
    want += [patches(big[i * 224:i * 224 + 336, j * 224:j * 224 + 336]) for i in range(rows) for j in range(cols)]
    assert np.abs(c.images - np.stack(want)).max() <= 1e-5


def test_float32_truncation_of_scaled_size():
    """HF sizes the resize in float32 and truncates: 480 * float32(336/640) = 251.99998 -> 251 rows, so
    640x480's global view is 336x251 with 42 pad rows on top and 43 below (exact arithmetic says 252)."""
    img = _rand_img(480, 640)
    _, mask = resize_and_pad(img, (336, 336), MEAN, STD)
    real_rows = np.nonzero(mask.any(1))[0]
    assert (real_rows[0], real_rows[-1] + 1) == (42, 293) and mask.any(0).all()
    glob = preprocess_image(img, CFG).images[0].reshape(24, 24, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(336, 336, 3)
    np.testing.assert_array_equal(glob, resize_and_pad(img, (336, 336), MEAN, STD)[0])
    assert (glob[:42] == PAD).all() and (glob[293:] == PAD).all() and not (glob[42] == PAD).all()


def test_pad_pixels_and_masks_agree():
    c = preprocess_image(_rand_img(200, 900), CFG)  # wide: canvas 336x1008, image 224x1008, 56 px pad rows
    rows, cols = c.tiling
    assert c.tiling == (1, 4)
    for k in range(rows * cols):
        mask = c.image_masks[k]                      # legacy: row k is the mask of high-res crop k ...
        crop = c.images[1 + k]                       # ... which sits at images[1 + k]
        empty = mask == 0
        assert empty.any()
        np.testing.assert_array_equal(crop[empty].reshape(-1, 3), np.broadcast_to(PAD, (empty.sum() * 196, 3)))
        full = mask == 1
        assert not np.isclose(crop[full].reshape(-1, 3), PAD).all(axis=1).all()


@pytest.mark.parametrize("hw", [(200, 900), (480, 640), (640, 480), (1000, 150), (30, 40)])
def test_masks_match_pixel_mask_means(hw):
    """HF's way: cut the bool canvas mask like the image, patchify, float32 mean per patch; then
    the legacy layout (crop masks first, a row of -1 last)."""
    img = _rand_img(*hw)
    c = preprocess_image(img, CFG)
    rows, cols = c.tiling
    _, mask = resize_and_pad(img, (rows * 224 + 112, cols * 224 + 112), MEAN, STD)
    want = []
    for i in range(rows):
        for j in range(cols):
            m = mask[i * 224:i * 224 + 336, j * 224:j * 224 + 336]
            want.append(m.reshape(24, 14, 24, 14).transpose(0, 2, 1, 3).reshape(576, 196).astype(np.float32).mean(-1))
    want.append(np.full(576, -1, np.float32))
    np.testing.assert_array_equal(c.image_masks, np.stack(want))


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

def test_bgr_flag_equals_rgb_flipped():
    rgb = _rand_img(123, 321, 3)
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    np.testing.assert_array_equal(load_image(bgr, bgr=True), rgb)
    a, b = preprocess_image(rgb, CFG), preprocess_image(bgr, CFG, bgr=True)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.image_input_idx, b.image_input_idx)
    bgra = np.concatenate([bgr, np.full((123, 321, 1), 7, np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(bgra, bgr=True), rgb)


def test_array_kinds():
    rgb = _rand_img(20, 30)
    out = load_image(rgb)
    np.testing.assert_array_equal(out, rgb)
    assert out.dtype == np.uint8 and out.flags.c_contiguous
    gray = rgb[:, :, 0]
    np.testing.assert_array_equal(load_image(gray), np.asarray(Image.fromarray(gray).convert("RGB")))
    np.testing.assert_array_equal(load_image(gray[:, :, None]), np.repeat(gray[:, :, None], 3, 2))
    rgba = np.concatenate([rgb, np.zeros((20, 30, 1), np.uint8)], axis=2)
    np.testing.assert_array_equal(load_image(rgba), np.asarray(Image.fromarray(rgba, "RGBA").convert("RGB")))
    u16 = np.array([[[0, 128, 129], [257, 65535, 32896]]], dtype=np.uint16)
    np.testing.assert_array_equal(load_image(u16), [[[0, 0, 1], [1, 255, 128]]])
    np.testing.assert_array_equal(load_image(rgb.astype(np.uint16) * 257), rgb)
    f = np.array([[[0.0, 0.5, 1.0], [0.2, 0.998, 0.002]]], dtype=np.float32)
    np.testing.assert_array_equal(load_image(f), [[[0, 128, 255], [51, 254, 1]]])
    np.testing.assert_array_equal(load_image(rgb / np.float64(255)), rgb)
    np.testing.assert_array_equal(load_image(np.array([[True, False]])), [[[255] * 3, [0] * 3]])
    np.testing.assert_array_equal(load_image(rgb.astype(np.int64)), rgb)
    view = rgb[::2, ::-1]
    np.testing.assert_array_equal(load_image(view), view)
    before = rgb.copy()
    load_image(rgb, bgr=True)
    np.testing.assert_array_equal(rgb, before)


@pytest.mark.parametrize("bad", [
    np.zeros((0, 5, 3), np.uint8), np.zeros((5, 0), np.uint8), np.zeros(5, np.uint8), np.zeros((2, 2, 2, 2), np.uint8),
    np.zeros((4, 4, 2), np.uint8), np.full((2, 2, 3), 2.0, np.float32), np.full((2, 2, 3), np.nan),
    np.full((2, 2, 3), -3, np.int32), np.zeros((2, 2, 3), np.complex64), 5, None,
])
def test_bad_arrays_raise_image_error(bad):
    with pytest.raises(ImageError) as e:
        load_image(bad)
    assert "\n" not in str(e.value) and len(str(e.value)) > 20


def test_pil_inputs():
    rgb = _rand_img(17, 29)
    for mode in ("RGB", "L", "RGBA", "P", "CMYK", "I;16", "1"):
        im = Image.fromarray(rgb).convert(mode)
        np.testing.assert_array_equal(load_image(im), np.asarray(im.convert("RGB")))
    c = preprocess_image(Image.fromarray(rgb), CFG)
    np.testing.assert_array_equal(c.images, preprocess_image(rgb, CFG).images)


def test_files(tmp_path):
    rgb = _rand_img(40, 60)
    p = tmp_path / "x.png"
    Image.fromarray(rgb).save(p)
    np.testing.assert_array_equal(load_image(p), rgb)
    np.testing.assert_array_equal(load_image(str(p)), rgb)
    np.testing.assert_array_equal(load_image(p.read_bytes()), rgb)
    # EXIF orientation is ignored (as in HF): a "rotate 90" tag must not swap height and width
    exif = Image.Exif()
    exif[0x0112] = 6
    j = tmp_path / "rot.jpg"
    Image.fromarray(rgb).save(j, exif=exif, quality=95)
    assert Image.open(j).getexif()[0x0112] == 6
    got = load_image(j)
    assert got.shape == (40, 60, 3)
    np.testing.assert_array_equal(got, np.asarray(Image.open(j).convert("RGB")))


def test_bad_files(tmp_path):
    with pytest.raises(ImageError, match="not found"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageError, match="directory"):
        load_image(tmp_path)
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(ImageError, match="empty"):
        load_image(tmp_path / "empty.png")
    (tmp_path / "junk.jpg").write_bytes(os.urandom(300))
    with pytest.raises(ImageError, match="not a readable image"):
        load_image(tmp_path / "junk.jpg")
    buf = io.BytesIO()
    Image.fromarray(_rand_img(64, 64)).save(buf, "PNG")
    (tmp_path / "cut.png").write_bytes(buf.getvalue()[:200])
    with pytest.raises(ImageError) as e:
        load_image(tmp_path / "cut.png")
    assert "\n" not in str(e.value)
    with pytest.raises(ImageError):
        load_image(b"")
    with pytest.raises(ImageError):
        preprocess_image(tmp_path / "junk.jpg", CFG)
    assert issubclass(ImageError, ValueError)


# ---------------------------------------------------------------------------------------------
# build_inputs and the no-torch rule
# ---------------------------------------------------------------------------------------------

def test_build_inputs_shapes_and_shift():
    c = preprocess_image(_rand_img(480, 640), CFG)
    text = [11447, 27, 3666]
    out = build_inputs(text, c, 50279)
    ids = out["input_ids"]
    assert ids.dtype == np.int64 and ids[0] == 50279 and ids[-3:].tolist() == text
    assert len(ids) == 1 + 740 + 3
    np.testing.assert_array_equal(ids[1:741], c.image_tokens)
    idx = out["image_input_idx"]
    assert idx.dtype == np.int32
    np.testing.assert_array_equal(idx, np.where(c.image_input_idx >= 0, c.image_input_idx + 1, -100))
    assert (ids[idx[idx >= 0]] == PATCH).all()
    assert out["images"].dtype == np.float32 and out["image_masks"].dtype == np.float32
    t = build_inputs(np.array(text), None, 50279)
    assert set(t) == {"input_ids"} and t["input_ids"].dtype == np.int32


def test_max_crops_must_be_positive():
    with pytest.raises(ValueError):
        preprocess_image(_rand_img(10, 10), CFG, max_crops=0)


def test_preprocess_does_not_import_torch():
    code = "import sys, molmo_edge.runtime.preprocess; sys.exit(1 if 'torch' in sys.modules else 0)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
