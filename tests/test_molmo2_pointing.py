"""Molmo2's point grammar (<points>/<tracks> with coords="HEAD ID X Y ...;..."), mapped to pixels of the right
image or video frame, counts from object ids, tolerance to malformed output, and overlays of both families."""
import numpy as np
import pytest

from molmo_edge.runtime.overlay import draw_points
from molmo_edge.runtime.pointing import VideoTimeline, parse_count, parse_points

MULTI = '<points coords="1 1 555 169;2 3 649 154 4 709 162;3 5 758 175 6 808 183 7 852 187">mugs</points>'
TRACK = '<tracks coords="0.0 1 635 522;0.5 1 606 490 2 511 124;1.0 2 515 164;1.5 2 520 168">the dogs</tracks>'


def test_single_image_points_to_pixels():
    pts = parse_points('<points coords="1 1 250 500 2 750 100">eyes</points>', 640, 480)
    assert [(p.x, p.y, p.x_pct, p.y_pct) for p in pts] == [(160.0, 240.0, 25.0, 50.0), (480.0, 48.0, 75.0, 10.0)]
    assert [(p.image, p.object, p.time, p.label) for p in pts] == [(0, 1, None, "eyes"), (0, 2, None, "eyes")]
    assert parse_count("Counting the <points coords=\"1 1 250 500 2 750 100\">eyes</points>", pts) == 2


def test_multi_image_points_land_on_their_image():
    sizes = [(1000, 500), (200, 100), (400, 400)]
    pts = parse_points(MULTI, images=sizes)
    assert [p.image for p in pts] == [0, 1, 1, 2, 2, 2]
    p = pts[1]
    assert (p.x, p.y, p.object) == (pytest.approx(0.649 * 200), pytest.approx(0.154 * 100), 3)
    assert parse_count(MULTI, pts) == 6  # distinct object ids
    # a point on an image that was not given is dropped, not put on another image
    assert [p.image for p in parse_points(MULTI, images=sizes[:2])] == [0, 1, 1]


def test_tracks_in_video_frames():
    tl = VideoTimeline(192, 144, [0.0, 0.5, 1.0, 1.5], [0, 2, 4, 6])
    pts = parse_points(TRACK, video=tl)
    assert [(p.time, p.object, p.frame) for p in pts] == [(0.0, 1, 0), (0.5, 1, 2), (0.5, 2, 2), (1.0, 2, 4), (1.5, 2, 6)]
    assert all(p.image is None for p in pts)
    assert (pts[0].x, pts[0].y) == (pytest.approx(0.635 * 192), pytest.approx(0.522 * 144))
    assert parse_count(TRACK, pts) == 2  # two objects tracked over five points
    # a time between sampled frames goes to the nearest one
    assert parse_points('<points coords="1.2 1 10 10">x</points>', video=tl)[0].frame == 4


def test_malformed_molmo2_output_tolerated():
    # truncated mid-triple, no closing quote or tag: complete triples are kept
    pts = parse_points('<points coords="1 1 100 200 2 300 400 3 50', 100, 100)
    assert [(p.object, p.x, p.y) for p in pts] == [(1, 10.0, 20.0), (2, 30.0, 40.0)]
    # out of range (> 1000), non-numeric, fractional ids and empty groups are dropped
    pts = parse_points('<points coords="1 1 1200 5 2 abc 7 3.5 10 10 4 10 10;;x 5 1 1">a</points>', 100, 100)
    assert [p.object for p in pts] == [4]
    assert parse_points('<points coords="">none</points>', 10, 10) == []
    assert parse_points('<points coords=', 10, 10) == []
    # without sizes, pixels are percent (as for v1)
    p = parse_points('<points coords="2 1 500 250">a</points>')[0]
    assert (p.x, p.y, p.image) == (50.0, 25.0, 1)


def test_v1_grammar_unchanged_and_same_shape():
    v1 = parse_points('<point x="12.5" y="50.0" alt="cup">cup</point>', 640, 480)[0].to_dict()
    v2 = parse_points('<points coords="1 1 125 500">cup</points>', 640, 480)[0].to_dict()
    assert set(v1) == set(v2) == {"x", "y", "x_pct", "y_pct", "label", "image", "time", "object", "frame"}
    assert (v1["x"], v1["y"], v1["image"], v1["object"]) == (80.0, 240.0, 0, None)
    assert (v2["x"], v2["y"], v2["image"], v2["object"]) == (80.0, 240.0, 0, 1)
    assert parse_count("There are a total of 3 cups.", []) == 3 and parse_count("There are none.", []) == 0


def test_request_parses_points_of_its_inputs():
    from conftest import GOLDEN
    ckpt = GOLDEN / "molmo2" / "ckpt-qwen3-tiny"
    if not (ckpt / "tokenizer.json").exists():
        pytest.skip(f"Molmo2 golden data not found at {ckpt}")
    from molmo_edge.runtime.molmo2_processor import Molmo2Processor
    proc = Molmo2Processor(str(ckpt))
    frames = np.zeros((8, 60, 80, 3), np.uint8)
    req = proc.prepare("Point to the ball.", images=[np.zeros((50, 100, 3), np.uint8)])
    assert [(p.x, p.y, p.image) for p in req.parse_points('<points coords="1 1 500 500">b</points>')] == [(50.0, 25.0, 0)]
    from molmo_edge.runtime.molmo2_preprocess import load_video
    vid = load_video(frames, proc.video_settings, fps=4.0)
    req = proc.prepare("Track the ball.", video=vid)
    pts = req.parse_points('<tracks coords="0.5 1 500 500;1.5 1 250 250">ball</tracks>')
    assert [(p.x, p.y, p.frame, p.time) for p in pts] == [(40.0, 30.0, 2, 0.5), (20.0, 15.0, 6, 1.5)]


def test_overlays_draw_both_grammars():
    img = np.zeros((100, 200, 3), np.uint8)
    v1 = draw_points(img, parse_points('<point x="50" y="50" alt="x">x</point>', 200, 100), "caption")
    assert v1.shape == (100, 200, 3) and v1[50, 100].any()
    pts = parse_points(MULTI, images=[(200, 100)] * 3)
    only2 = draw_points(img, pts, image=2)  # image 2 holds objects 5, 6, 7 (x 758.. of 1000)
    assert only2[round(0.175 * 100), round(0.758 * 200)].any() and not only2[round(0.169 * 100), round(0.555 * 200)].any()
    tl = VideoTimeline(200, 100, [0.0, 0.5, 1.0, 1.5], [0, 2, 4, 6])
    tracks = parse_points(TRACK, video=tl)
    f4 = draw_points(img, tracks, frame=4)
    assert f4[round(0.164 * 100), round(0.515 * 200)].any()  # object 2 at t=1.0
    # object 1 is not on frame 4 (only at 0.0 and 0.5): no marker (white ring) there, but its track line is drawn
    assert not (f4[45:60, 115:135] == 255).all(axis=-1).any()
    assert f4[round((0.522 + 0.490) / 2 * 100), round((0.635 + 0.606) / 2 * 200)].any()
