"""The kiosk page in headless Chromium (Playwright): type a question, see the answer, see the points
drawn, from an uploaded photo and from the live camera, with every request staying on the server.

Needs Debian's chromium (`apt-get install -y chromium`) and `pip install playwright`; never
`playwright install` (it downloads a browser). Skips with the reason when either is missing."""
import os
import shutil
from urllib.parse import urlsplit

import cv2
import numpy as np
import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'molmo-edge[serve]'")
from serve_helpers import POINT_ANSWER, make_video, serving, shared_pointing_bundle  # noqa: E402

sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
if not CHROMIUM:
    pytest.skip("headless Chromium not found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)",
                allow_module_level=True)
expect = sync_api.expect


@pytest.fixture(scope="module")
def pointing_bundle(tmp_path_factory):
    return shared_pointing_bundle(tmp_path_factory)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A page that may talk to loopback only; anything else is aborted and recorded as a failure."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 700})
    outside = []

    def guard(route):
        u = urlsplit(route.request.url)
        if u.scheme in ("data", "blob") or u.hostname in ("127.0.0.1", "localhost"):
            return route.continue_()
        outside.append(route.request.url)
        return route.abort()
    ctx.route("**/*", guard)
    pg = ctx.new_page()
    pg.set_default_timeout(30_000)
    yield pg
    ctx.close()
    assert not outside, f"the kiosk tried to reach the network: {outside}"


def photo(path, w=400, h=300, side=None):
    img = np.full((h, w, 3), 90, np.uint8)
    cv2.rectangle(img, (w // 5, h // 5), (w // 3, h // 2), (200, 120, 20), -1)
    cv2.imwrite(str(path), img)
    return str(path)


def marker_at(png_bytes, x_pct, y_pct):
    """True when the element screenshot shows the red point marker at (x %, y %) of the drawn image."""
    img = cv2.imdecode(np.frombuffer(png_bytes, np.uint8), cv2.IMREAD_COLOR)
    h, w = img.shape[:2]
    x, y = round(w * x_pct / 100), round(h * y_pct / 100)
    b, g, r = img[y - 1:y + 2, x - 1:x + 2].reshape(-1, 3).mean(0)
    return r > 180 and g < 90 and b < 90


def ask(page, question):
    page.fill("#question", question)
    page.click("#ask")
    expect(page.locator("#answer")).to_have_text(POINT_ANSWER)


def test_photo_question_answer_points(page, pointing_bundle, tmp_path):
    with serving(pointing_bundle) as (base, _):
        page.goto(base + "/")
        expect(page.locator("#status")).to_contain_text("no camera")
        expect(page.locator("#mode-camera")).to_be_disabled()
        page.set_input_files("#file", photo(tmp_path / "p.png"))
        expect(page.locator("#placeholder")).to_be_hidden()
        assert not marker_at(page.locator("#view").screenshot(), 61, 42)
        ask(page, "Point to the cup.")
        expect(page.locator("#points li")).to_have_count(1)
        expect(page.locator("#points li")).to_contain_text("61.0%, 42.0%")
        expect(page.locator("#count")).to_have_text("count: 1")
        expect(page.locator("#error")).to_be_hidden()
        assert marker_at(page.locator("#view").screenshot(), 61, 42)       # the point is drawn over the photo
        assert not marker_at(page.locator("#view").screenshot(), 20, 80)
        page.screenshot(path=str(tmp_path / "kiosk-photo.png"))

        # a photo the server refuses: the message is shown, and the next question works
        page.set_input_files("#file", photo(tmp_path / "tiny.png", 4, 4))
        page.fill("#question", "What is this?")
        page.click("#ask")
        expect(page.locator("#error")).to_contain_text("at least 8 pixels")
        page.set_input_files("#file", photo(tmp_path / "p2.png", 320, 480))
        ask(page, "Point again.")
        expect(page.locator("#error")).to_be_hidden()


def test_live_camera_question_answer_points(page, pointing_bundle, tmp_path):
    from molmo_edge.runtime.cameras import open_source
    src = open_source(make_video(tmp_path / "cam.mp4", n=30), loop=True)
    try:
        with serving(pointing_bundle, src) as (base, _):
            page.goto(base + "/")
            expect(page.locator("#mode-camera")).to_have_attribute("aria-pressed", "true")
            expect(page.locator("#status")).to_contain_text("camera running")
            expect(page.locator("#placeholder")).to_be_hidden()   # frames are arriving
            ask(page, "Point to the ball.")
            expect(page.locator("#frozen")).to_be_visible()       # the answer is about the frame on screen
            assert marker_at(page.locator("#view").screenshot(), 61, 42)
            page.screenshot(path=str(tmp_path / "kiosk-camera.png"))
            page.click("#live")
            expect(page.locator("#frozen")).to_be_hidden()
            page.click("#mode-photo")
            expect(page.locator("#mode-photo")).to_have_attribute("aria-pressed", "true")
    finally:
        src.close()


def test_api_key_through_the_login_link(page, pointing_bundle, tmp_path):
    with serving(pointing_bundle, api_key="kiosk key; ☃") as (base, st):
        r = page.goto(base + "/")
        assert r.status == 401
        assert page.goto(base + "/?key=kiosk-key").status == 401     # keys never travel in URLs
        link = base + "/login?token=" + st.access.new_login_token()
        r = page.goto(link)                                         # sets the session cookie, redirects to the kiosk
        assert r.status == 200 and page.url == base + "/"
        expect(page.locator("#status")).to_contain_text("no camera")
        assert page.context.new_page().goto(link).status == 401     # the link works once
        page.set_input_files("#file", photo(tmp_path / "p.png"))
        ask(page, "Point to the cup.")
        expect(page.locator("#points li")).to_have_count(1)
