"""Molmo2 preprocessing and processor: the golden cases (HF transformers 5.24 on the tiny checkpoint) reproduced,
and cases outside the golden set checked by invariants of the spec (molmo2-spec.md §5-7)."""
import json
import math
from pathlib import Path

import numpy as np
import pytest

from molmo_edge.runtime.errors import MolmoEdgeError
from molmo_edge.runtime.molmo2_preprocess import (ImageSettings, VideoSettings, arange_for_pooling,
                                                  crop_geometry, load_video, preprocess_image, sample_frame_indices)
from molmo_edge.runtime.molmo2_processor import Molmo2Processor, is_molmo2_config, is_molmo2_folder, render_chat
from molmo_edge.runtime.resize import resize_bilinear

import molmo2_hf_cases as hf
from conftest import GOLDEN

M2 = GOLDEN / "molmo2"
CKPT = M2 / "ckpt-qwen3-tiny"
HF_CASES = Path(__file__).parent / "data" / "molmo2_hf_cases.npz"
LEVEL = 1 / 127.5  # one uint8 level after (x - 127.5) / 127.5


def _need_golden():
    if not (CKPT / "tokenizer.json").exists():
        pytest.skip(f"Molmo2 golden data not found at {M2} (set MOLMO_GOLDEN to the shared/golden folder)")


@pytest.fixture(scope="module")
def proc():
    _need_golden()
    return Molmo2Processor(str(CKPT))


def assert_pixels_close(got, want):
    """The golden README's rule: every value within 1e-4, except at most 0.5 % one uint8 level off."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.float32
    d = np.abs(got.astype(np.float64) - want)
    off = d > 1e-4
    assert off.mean() <= 0.005, off.mean()
    assert np.all(np.abs(d[off] - LEVEL) <= 1e-4), d.max()


_rand_image = hf.rand_image


# --------------------------------------------------------------------------------------------
# Golden cases
# --------------------------------------------------------------------------------------------

CASES = {"chelsea_point": (["chelsea.png"], None), "video_pan": ([], "video_astronaut_pan.npz"),
         "text_only": ([], None)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_case(proc, case):
    want = np.load(M2 / "cases" / f"{case}.preprocess.npz")
    images, video = CASES[case]
    req = proc.prepare(str(want["user_prompt"]), [str(M2 / "inputs" / i) for i in images],
                       str(M2 / "inputs" / video) if video else None)
    got = req.arrays
    arrays = {k for k in want.files if want[k].dtype.kind not in "US" and not k.startswith("video_") or
              k in ("video_token_pooling", "video_grids")}
    assert set(got) == arrays
    for k, v in got.items():
        if k.startswith("pixel_values"):
            assert_pixels_close(v, want[k])
        else:
            assert v.dtype == want[k].dtype and np.array_equal(v, want[k]), k
    assert req.text == str(want["prompt_text"])
    assert proc.tokenizer.decode(got["input_ids"][0], skip_special_tokens=False) == str(want["expanded_text"])
    if video:
        assert req.video.frame_indices == want["video_frames_indices"].tolist()
        assert req.video.timestamps == want["video_timestamps"].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_tokenizer_decodes_golden_generations(proc, case):
    g = json.loads((M2 / "cases" / "q3" / f"{case}.generate.json").read_text())
    tok = proc.tokenizer
    assert tok.decode(g["token_ids"], skip_special_tokens=False) == g["text"]
    assert tok.decode(g["token_ids"]) == g["text_skip_special"]
    assert [tok.token_text(i) for i in g["token_ids"]] == g["tokens"]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (151645, 151645, 151643)
    assert tok.encode("Hello world") == [9707, 1879] and tok.encode("Point to the eyes.") == [2609, 311, 279, 6414, 13]


def test_molmo2_detection():
    _need_golden()
    assert is_molmo2_config(json.loads((CKPT / "config.json").read_text()))
    assert is_molmo2_folder(str(CKPT))
    assert is_molmo2_config({"model_type": "molmo2", "vision_config": {}})
    assert is_molmo2_config({"family": "molmo2"})
    assert not is_molmo2_config({"model_type": "molmo", "d_model": 2048, "vision_backbone": {}})
    assert not is_molmo2_config({"hidden_size": 3584, "num_hidden_layers": 28})


# --------------------------------------------------------------------------------------------
# Resize and tiling
# --------------------------------------------------------------------------------------------

def test_resize_matches_torch_bit_for_bit():
    """torch's CPU bilinear (one thread, 3 channels: its channels-last kernel) is the reference the goldens use."""
    torch = pytest.importorskip("torch")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for (h, w), (oh, ow) in [((300, 451), (378, 644)), ((144, 192), (378, 378)), ((480, 640), (644, 910)),
                                 ((37, 500), (378, 378)), ((512, 300), (644, 378)), ((378, 378), (378, 378))]:
            img = _rand_image(h, w, seed=h)
            t = torch.from_numpy(img).permute(2, 0, 1)[None].contiguous().float()
            ref = torch.nn.functional.interpolate(t, size=(oh, ow), mode="bilinear", align_corners=False)
            ref = ref.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
            assert np.array_equal(resize_bilinear(img, oh, ow), ref), (h, w, oh, ow)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("wh,max_crops,tiling", [((512, 512), 8, (2, 2)), ((451, 300), 8, (1, 2)),
                                                 ((1280, 720), 8, (2, 4)), ((1000, 872), 8, (2, 3)),
                                                 ((300, 512), 8, (2, 1)), ((512, 512), 2, (1, 1))])
def test_tiling_examples_of_the_spec(wh, max_crops, tiling):
    w, h = wh
    th, tw, ch, cw = crop_geometry(h, w, ImageSettings(), max_crops)
    assert (th, tw) == tiling and (ch, cw) == (th * 266 + 112, tw * 266 + 112)


def test_arange_for_pooling_pads_bottom_right():
    idx, rows, cols = arange_for_pooling(np.arange(27 * 27).reshape(27, 27), 2, 2)
    assert (rows, cols) == (14, 14) and idx.shape == (196, 4)
    assert idx[0].tolist() == [0, 1, 27, 28] and idx[13].tolist() == [26, -1, 53, -1]
    assert idx[-1].tolist() == [728, -1, -1, -1]
    idx, rows, cols = arange_for_pooling(np.arange(5 * 4).reshape(5, 4), 3, 3)  # pad 1 row / 2 cols: 0+1, 1+1
    assert (rows, cols) == (2, 2) and idx[0].tolist() == [-1, 0, 1, -1, 4, 5, -1, 8, 9]


# --------------------------------------------------------------------------------------------
# Images outside the golden set: invariants
# --------------------------------------------------------------------------------------------

def _check_image_invariants(im, s: ImageSettings, rgb):
    th, tw = im.tiling
    k = s.crop_patches
    lh, lw, hh, hw = im.grid
    ch, cw = th * 266 + 112, tw * 266 + 112
    assert im.pixel_values.shape == (1 + th * tw, 729, 588) and im.pixel_values.dtype == np.float32
    assert (lh, lw) == (14, 14) and (hh, hw) == (math.ceil(ch / 14 / 2), math.ceil(cw / 14 / 2))
    pool = im.token_pooling
    assert pool.dtype == np.int32 and pool.shape == (lh * lw + hh * hw, 4)
    low, high = pool[:lh * lw], pool[lh * lw:]
    # the low-res view pools each of its own 729 patches once; the high-res rows each canvas patch once
    assert sorted(low[low >= 0].tolist()) == list(range(k * k))
    hi = high[high >= 0]
    assert len(hi) == len(set(hi.tolist())) == (ch // 14) * (cw // 14) and hi.min() >= k * k
    assert hi.max() < im.num_crops * k * k
    win = high.reshape(hh, hw, 4)
    assert np.all(win[0, :, 0] >= 0) and np.all(win[:, 0, 0] >= 0)  # -1 padding goes bottom/right only
    # Crops and indices agree: gathering the kept patches by the pooling order rebuilds the canvas.
    patches = im.pixel_values.reshape(-1, 588)
    canvas = np.full(((hh * 2) * 14, (hw * 2) * 14, 3), np.nan, np.float32)
    grid = high.reshape(hh, hw, 2, 2).transpose(0, 2, 1, 3).reshape(hh * 2, hw * 2)
    for r, c in zip(*np.nonzero(grid >= 0)):
        canvas[r * 14:(r + 1) * 14, c * 14:(c + 1) * 14] = patches[grid[r, c]].reshape(14, 14, 3)
    direct = s.normalise(resize_bilinear(rgb, ch, cw))
    assert np.array_equal(canvas[:ch, :cw], direct)
    low_view = im.pixel_values[0].reshape(27, 27, 14, 14, 3).transpose(0, 2, 1, 3, 4).reshape(378, 378, 3)
    assert np.array_equal(low_view, s.normalise(resize_bilinear(rgb, 378, 378)))


@pytest.mark.parametrize("hw,max_crops", [((720, 1280), 8), ((512, 300), 8), ((90, 700), 8), ((1000, 1000), 3),
                                          ((600, 800), 1), ((400, 400), 2)])
def test_image_invariants(hw, max_crops):
    s = ImageSettings()
    rgb = _rand_image(*hw, seed=sum(hw))
    im = preprocess_image(rgb, s, max_crops=max_crops)
    assert im.num_crops <= max_crops + 1
    assert im.tiling == crop_geometry(hw[0], hw[1], s, max_crops)[:2]
    _check_image_invariants(im, s, rgb)


def test_several_images_offsets_and_tokens(proc):
    rgbs = [_rand_image(300, 451, 1), _rand_image(720, 1280, 2), _rand_image(512, 300, 3)]
    req = proc.prepare("Point to the cups.", rgbs, max_crops=4)
    a = req.arrays
    singles = [proc.image(r, max_crops=4) for r in rgbs]
    offset, start = 0, 0
    for im in singles:
        rows = a["image_token_pooling"][start:start + len(im.token_pooling)]
        assert np.array_equal(rows, np.where(im.token_pooling >= 0, im.token_pooling + offset, -1))
        offset += im.num_crops * 729
        start += len(im.token_pooling)
    assert start == len(a["image_token_pooling"]) and a["pixel_values"].shape[0] == offset // 729
    assert a["image_num_crops"].tolist() == [im.num_crops for im in singles]
    assert a["image_grids"].tolist() == [list(im.grid) for im in singles]
    ids = a["input_ids"][0]
    t = proc.tokenizer.token_ids
    assert (ids == t["<im_patch>"]).sum() == len(a["image_token_pooling"])  # one pooled row per <im_patch>
    assert req.text.startswith("Image 1<|image|>Image 2<|image|>Image 3<|image|><|im_start|>user\n")
    # "Image 2" is text between the image blocks (Image 1906, space 220, 2 17), outside the mm block
    end1 = np.nonzero(ids == t["<im_end>"])[0][1]
    assert ids[end1 + 1:end1 + 4].tolist() == [1906, 220, 17]
    mm = {t[n] for n in ("<im_patch>", "<im_col>", "<im_start>", "<low_res_im_start>", "<im_end>")}
    assert np.array_equal(a["mm_token_type_ids"][0], np.isin(ids, list(mm)).astype(np.int64))
    assert req.image_sizes == [(451, 300), (1280, 720), (300, 512)]


def test_preprocessed_image_is_reused(proc):
    im = proc.image(_rand_image(200, 260, 5))
    a1 = proc.process("What is this?", [im])
    a2 = proc.process("What is this?", [_rand_image(200, 260, 5)])
    assert all(np.array_equal(a1[k], a2[k]) for k in a1)


def test_text_only_and_history(proc):
    a = proc.process("Thanks. And Germany?", history=[("What is the capital of France?", "Paris.")])
    assert set(a) == {"input_ids", "attention_mask", "mm_token_type_ids"} and not a["mm_token_type_ids"].any()
    want = ("<|im_end|><|im_start|>user\nWhat is the capital of France?<|im_end|>\n <|im_start|>assistant\nParis."
            "<|im_end|>\n<|im_start|>user\nThanks. And Germany?<|im_end|>\n<|im_start|>assistant\n")
    assert a["input_ids"][0].tolist() == proc.tokenizer.encode(want)
    assert a["input_ids"].dtype == np.int64 and a["attention_mask"].tolist() == [[1] * a["input_ids"].shape[1]]


def _hf_data():
    _need_golden()
    return np.load(HF_CASES)


def _hf_templates():
    if not HF_CASES.exists():
        return []
    with np.load(HF_CASES) as d:
        return [json.loads(str(d[k])) for k in sorted(d.files) if k.startswith("template/")]


@pytest.mark.parametrize("t", _hf_templates(), ids=lambda t: str(len(t["messages"])))
def test_render_chat_matches_the_template(proc, t):
    """Message shapes rendered by transformers 5.24's apply_chat_template (note the literal space before an
    assistant turn's tag)."""
    assert render_chat(t["messages"], styles=proc.styles) == t["gen"]
    assert render_chat(t["messages"], add_generation_prompt=False, styles=proc.styles) == t["nogen"]


@pytest.mark.parametrize("case", sorted(hf.CASES))
def test_matches_hf_processor_outside_golden_set(proc, case):
    """Other sizes, reduced max_crops, several images, video at other rates, image + video, history: exactly what
    transformers 5.24's Molmo2Processor returned for them (tests/molmo2_hf_cases.py)."""
    ref = _hf_data()
    c = hf.CASES[case]
    images = hf.images_of(c, str(M2))
    video = None
    if "video" in c:
        frames, fps = hf.frames_of(c)
        video = proc.video(frames, fps=fps)
    req = proc.prepare(c["prompt"], images, video, history=[tuple(h) for h in c.get("history", [])],
                       max_crops=c.get("max_crops"))
    assert req.text == str(ref[f"{case}/prompt_text"])
    names = {k.split("/", 1)[1].split(".")[0] for k in ref.files if k.startswith(case + "/")} - {"prompt_text"}
    assert set(req.arrays) == names
    for k, v in req.arrays.items():
        if k.startswith("pixel_values"):
            assert list(v.shape) == ref[f"{case}/{k}.shape"].tolist() and v.dtype == np.float32
            got = v.reshape(-1)[hf.sample_positions(f"{case}/{k}", v.size)].astype(np.float64) * 127.5 + 127.5
            d = np.abs(got - ref[f"{case}/{k}.levels"])
            assert d.max() <= 1 + 1e-3 and (d > 1e-3).mean() <= 0.005, (k, d.max())
        else:
            assert v.dtype == ref[f"{case}/{k}"].dtype and np.array_equal(v, ref[f"{case}/{k}"]), k


def test_render_chat_checks(proc):
    assert "point_count" in proc.styles and len(proc.styles) == 41
    with pytest.raises(MolmoEdgeError, match="alternate"):
        render_chat([{"role": "assistant", "content": "hi"}])
    with pytest.raises(MolmoEdgeError, match="placeholders"):
        proc.encode("<|image|><|image|>hi", [proc.image(_rand_image(50, 50))])


# --------------------------------------------------------------------------------------------
# Video outside the golden set
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n,fps", [(16, 4.0), (10, 30.0), (100, 1.0), (301, 29.97), (7, 2.0), (200, 2.5), (1000, 60.0)])
def test_frame_sampling_matches_torch_arange(n, fps):
    s = VideoSettings()
    got = sample_frame_indices(n, fps, s)
    target = s.num_frames if fps <= s.max_fps else min(s.num_frames, int(n / fps * s.max_fps))
    target = max(min(target, n), 1)
    torch = pytest.importorskip("torch")
    assert got.tolist() == torch.arange(0, n, n / target).int().tolist()
    assert got[0] == 0 and got[-1] < n and np.all(np.diff(got) > 0)


def test_video_array_and_file(proc, tmp_path):
    cv2 = pytest.importorskip("cv2")
    frames = np.stack([_rand_image(96, 128, i) for i in range(12)])
    np.savez(tmp_path / "clip.npz", frames=frames, fps=np.float64(6.0))
    req = proc.prepare("What happens?", video=str(tmp_path / "clip.npz"))
    v, a = req.video, req.arrays
    assert v.frame_indices == [0, 3, 6, 9] and v.timestamps == [0.0, 0.5, 1.0, 1.5]  # 2 s at 6 fps -> 4 frames
    assert a["video_grids"].tolist() == [[4, 9, 9]] and a["video_token_pooling"].dtype == np.int64
    pool = a["video_token_pooling"].reshape(4, 81, 9)
    assert np.array_equal(pool - (np.arange(4) * 729)[:, None, None], np.broadcast_to(pool[0], pool.shape))
    assert sorted(pool[0].ravel().tolist()) == list(range(729))
    assert_pixels_close(a["pixel_values_videos"][1], preprocess_image(frames[3]).pixel_values[0])
    ids, t = a["input_ids"][0], proc.tokenizer.token_ids
    assert (ids == t["<im_patch>"]).sum() == 4 * 81 and (ids == t["<frame_start>"]).sum() == 4
    assert not np.isin(ids, [t["<im_col>"], t["<|video|>"]]).any()
    assert proc.tokenizer.decode(ids, skip_special_tokens=True).startswith("0.0  0.5  1.0  1.5 user\nWhat happens?")
    # the same clip as a video file decodes through OpenCV to the same sampling (lossy codec: pixels differ)
    path = str(tmp_path / "clip.avi")
    wr = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"MJPG"), 6.0, (128, 96))
    if not wr.isOpened():
        pytest.skip("OpenCV cannot write MJPG .avi here")
    for f in frames:
        wr.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    wr.release()
    vf = load_video(path, proc.video_settings)
    assert vf.frame_indices == [0, 3, 6, 9] and vf.timestamps == [0.0, 0.5, 1.0, 1.5] and vf.size == (96, 128)
    assert np.abs(vf.pixel_values - v.pixel_values).mean() < 0.05


def test_camera_clip_uses_capture_times(proc):
    """A clip at a real ~5 fps with jittered capture times: sampled at <= 2 per second, timestamps = capture times."""
    times = np.arange(20) * 0.2 + np.r_[0, np.full(19, 0.013)]
    frames = np.stack([_rand_image(30, 40, i) for i in range(20)])
    v = proc.video((frames, times + 1000.0))
    assert v.frame_indices == [0, 2, 5, 7, 10, 12, 15, 17]  # 4 s at 5 fps -> 8 frames
    assert v.timestamps == pytest.approx([times[i] for i in v.frame_indices])
    ids = proc.process("What changed?", video=v)["input_ids"][0]
    assert proc.tokenizer.decode(ids).startswith("0.0  0.4  1.0  1.4  2.0  2.4  3.0  3.4 user")


def test_video_normalises_without_flags():
    """Trap of 5.24: a video config without do_rescale/do_normalize must still normalise (AI2's behaviour)."""
    s = VideoSettings.from_dict({"num_frames": 8, "max_fps": 2, "pooling_size": [3, 3]})
    v = load_video(np.zeros((3, 20, 20, 3), np.uint8), s, fps=1.0)
    assert np.allclose(v.pixel_values, -1.0) and v.timestamps == [0.0, 1.0, 2.0]
    every = VideoSettings.from_dict({"do_sample_frames": False})
    assert sample_frame_indices(30, 30.0, every).tolist() == list(range(30))


def test_bad_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(MolmoEdgeError, match="not found"):
        load_video(str(tmp_path / "nope.mp4"))
    np.savez(tmp_path / "bad.npz", pixels=np.zeros(3))
    with pytest.raises(MolmoEdgeError, match="frames"):
        load_video(str(tmp_path / "bad.npz"))
    with pytest.raises(MolmoEdgeError, match="max_crops"):
        preprocess_image(_rand_image(20, 20), max_crops=0)
    with pytest.raises(MolmoEdgeError, match="square"):
        ImageSettings.from_dict({"size": {"height": 378, "width": 336}})


# --------------------------------------------------------------------------------------------
# CLI: `molmo-edge preprocess MODEL --prompt TEXT [--image IMG]... [--video V] [--max-crops N] -o OUT.npz`
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_preprocess_reproduces_golden(case, tmp_path, capsys):
    _need_golden()
    from molmo_edge.runtime.cli.main import main
    want = np.load(M2 / "cases" / f"{case}.preprocess.npz")
    images, video = CASES[case]
    args = ["preprocess", str(CKPT), "--prompt", str(want["user_prompt"]), "-o", str(tmp_path / "out.npz")]
    args += [x for i in images for x in ("--image", str(M2 / "inputs" / i))]
    args += ["--video", str(M2 / "inputs" / video)] if video else []
    assert main(args) == 0
    got = np.load(tmp_path / "out.npz")
    for k in got.files:
        if k.startswith("pixel_values"):
            assert_pixels_close(got[k], want[k])
        else:
            assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k
    assert "wrote" in capsys.readouterr().err


def test_cli_preprocess_several_images_and_max_crops(tmp_path):
    _need_golden()
    from PIL import Image
    from molmo_edge.runtime.cli.main import main
    for i, hw in enumerate([(300, 451), (720, 1280)]):
        Image.fromarray(_rand_image(*hw, seed=i)).save(tmp_path / f"{i}.png")
    out = tmp_path / "two.npz"
    assert main(["preprocess", str(CKPT), "--prompt", "Which is bigger?", "--image", str(tmp_path / "0.png"),
                 "--image", str(tmp_path / "1.png"), "--max-crops", "2", "-o", str(out)]) == 0
    got = np.load(out)
    assert got["image_num_crops"].tolist() == [3, 3] and got["image_token_pooling"].max() < 6 * 729


def test_cli_video_needs_molmo2(tmp_path, capsys):
    from molmo_edge.runtime.cli.main import main
    (tmp_path / "v1").mkdir()
    (tmp_path / "v1" / "config.json").write_text(json.dumps({"model_type": "molmo", "d_model": 64}))
    np.savez(tmp_path / "v.npz", frames=np.zeros((2, 8, 8, 3), np.uint8), fps=2.0)
    assert main(["preprocess", str(tmp_path / "v1"), "--prompt", "x", "--video", str(tmp_path / "v.npz"),
                 "-o", str(tmp_path / "x.npz")]) == 2
    assert "--video needs a Molmo2 model" in capsys.readouterr().err
