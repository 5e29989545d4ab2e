import numpy as np

from molmo_edge.runtime.overlay import draw_points
from molmo_edge.runtime.pointing import parse_count, parse_points


def test_single_point_to_pixels():
    pts = parse_points('<point x="12.5" y="50.0" alt="red cup">red cup</point>', 640, 480)
    assert len(pts) == 1
    p = pts[0]
    assert (p.x, p.y, p.x_pct, p.y_pct, p.label) == (80.0, 240.0, 12.5, 50.0, "red cup")


def test_multiple_points_and_count():
    text = ('Counting the <points x1="10.0" y1="20.0" x2="30.5" y2="40.0" x3="90.0" y3="95.5" alt="people">people</points>'
            ' shows a total of 3.')
    pts = parse_points(text, 200, 100)
    assert [(p.x, p.y) for p in pts] == [(20.0, 20.0), (61.0, 40.0), (180.0, 95.5)]
    assert all(p.label == "people" for p in pts)
    assert parse_count(text, pts) == 3


def test_none_and_plain_answers():
    assert parse_points("There are none.", 10, 10) == []
    assert parse_count("There are none.", []) == 0
    assert parse_count("A cat on a sofa.", []) is None


def test_malformed_output_tolerated():
    # missing closing tag, an out-of-range pair (dropped), junk attributes, truncated generation
    text = '<points x1="10" y1="10" x2="150" y2="20" x3="50" y3="5x" alt="cups">cups'
    pts = parse_points(text, 100, 100)
    assert [(p.x_pct, p.y_pct) for p in pts] == [(10.0, 10.0), (50.0, 5.0)]
    assert parse_count(text, pts) == 2
    assert parse_points('<point x="abc" y="3">', 10, 10) == []
    assert parse_points('<point x="1.0"', 10, 10) == []
    assert [(p.x, p.y) for p in parse_points("Click(25.0, 75.0)", 400, 200)] == [(100.0, 150.0)]


def test_count_without_points():
    assert parse_count("There are a total of 12 apples.", []) == 12


def test_overlay_draws_markers():
    img = np.zeros((100, 200, 3), np.uint8)
    out = draw_points(img, parse_points('<point x="50" y="50" alt="x">x</point>', 200, 100), "caption")
    assert out.shape == (100, 200, 3) and out[50, 100].any()
