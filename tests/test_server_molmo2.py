"""`serve` on a Molmo2 bundle (the golden tiny Qwen3 checkpoint, exported once per module): several images in
one chat conversation through the official `openai` client (in order, capped by --max-images), `/v1/query`
about the camera's last seconds as a video (`clip`, with --clip-history), the context check counting Molmo2's
image and video tokens exactly before any vision work, and the refusals for Molmo v1 or a server without history."""
import base64
import json
import time

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'molmo-edge[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install openai")
from serve_helpers import error_of, make_video, png, request, serving  # noqa: E402

from molmo_edge.runtime.serve.server import Limits  # noqa: E402
from molmo_edge.runtime.session import Molmo  # noqa: E402

CLIP_HISTORY = 3.0
LIMITS = Limits(max_new_tokens=16, default_new_tokens=6, max_images=3, timeout_s=60)


@pytest.fixture(scope="module")
def m2bundle(golden, tmp_path_factory):
    ckpt = golden / "molmo2" / "ckpt-qwen3-tiny"
    if not (ckpt / "model.safetensors").exists():
        pytest.skip(f"Molmo2 golden checkpoint not found at {ckpt}")
    from molmo_edge.export.bundle import export_bundle
    out = tmp_path_factory.mktemp("m2serve") / "bundle"
    export_bundle(str(ckpt), str(out), progress=lambda *_: None)
    return str(out)


@pytest.fixture(scope="module")
def served(m2bundle, tmp_path_factory):
    """A Molmo2 server with a looping video file as its camera, keeping CLIP_HISTORY seconds of it."""
    from molmo_edge.runtime.cameras import open_source
    src = open_source(make_video(tmp_path_factory.mktemp("cam") / "cam.mp4"), loop=True, history=CLIP_HISTORY)
    try:
        with serving(m2bundle, src, limits=LIMITS) as (base, st):
            t = time.monotonic()
            while len(src.clip()) < 3 and time.monotonic() - t < 10:
                time.sleep(0.05)
            yield base, st
    finally:
        src.close()


def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def rgb(seed, w=320, h=240):
    import cv2
    return cv2.cvtColor(cv2.imdecode(np.frombuffer(png(w, h, seed), np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def image_part(seed, w=320, h=240):
    uri = "data:image/png;base64," + base64.b64encode(png(w, h, seed)).decode()
    return {"type": "image_url", "image_url": {"url": uri}}


def test_several_images_in_order_through_the_openai_client(served):
    base, st = served
    c = client(base)
    assert [m.id for m in c.models.list()] == [st.model_name, "molmo"]
    messages = [{"role": "user", "content": [image_part(0), {"type": "text", "text": "Which one is brighter?"},
                                             image_part(1, 200, 300)]},
                {"role": "assistant", "content": "The first."},
                {"role": "user", "content": [{"type": "text", "text": "And this one?"}, image_part(2)]}]
    r = c.chat.completions.create(model="molmo", messages=messages, max_tokens=6)
    # the same question asked of the library directly: every image used, in the order given
    want = st.model.ask("And this one?", images=[rgb(0), rgb(1, 200, 300), rgb(2)], max_new_tokens=6,
                        history=[("Which one is brighter?", "The first.")])
    assert r.choices[0].message.content == want.text and r.usage.prompt_tokens == want.prompt_tokens
    assert r.model_extra["molmo"]["image_size"] == [320, 240]
    stream = c.chat.completions.create(model="molmo", messages=messages, max_tokens=6, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want.text
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == want.prompt_tokens

    with pytest.raises(openai.BadRequestError) as e:   # a fourth image is past --max-images 3
        c.chat.completions.create(model="molmo", messages=messages + [
            {"role": "assistant", "content": "Dark."},
            {"role": "user", "content": [image_part(3), {"type": "text", "text": "and?"}]}])
    err = e.value.body
    assert err["code"] == "too_many_images" and "--max-images 3" in err["message"]
    assert err["param"] == "messages[4].content[0].image_url.url"
    text_only = c.chat.completions.create(model="molmo", messages=[{"role": "user", "content": "Hello"}], max_tokens=4)
    assert text_only.usage.completion_tokens == 4 and text_only.model_extra["molmo"]["image_size"] is None


def test_query_asks_about_the_last_seconds_as_a_video(served):
    base, st = served
    s, _, out = request(base, "POST", "/v1/query", {"prompt": "How many balls went by?", "clip": 2, "max_new_tokens": 4})
    assert s == 200, out
    res = json.loads(out)
    clip = res["image"]["clip"]
    assert res["image"]["source"] == "camera" and (res["image"]["width"], res["image"]["height"]) == (320, 240)
    assert clip["frames"] >= 2 and 0 < clip["seconds"] <= 2 and 1 <= clip["sampled"] <= clip["frames"]
    image_only = st.model.ask("How many balls went by?", images=[rgb(0)], max_new_tokens=1).prompt_tokens
    video_tokens = res["answers"][0]["prompt_tokens"]
    assert video_tokens != image_only and res["answers"][0]["stop_reason"] in ("length", "eos")
    # the same option as a form field (decimals are numbers there)
    s, _, out = request(base, "POST", "/v1/query", b"--b\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nHi"
                        b"\r\n--b\r\nContent-Disposition: form-data; name=\"clip\"\r\n\r\n1.5\r\n--b--\r\n",
                        {"Content-Type": "multipart/form-data; boundary=b"})
    assert s == 200 and "clip" in json.loads(out)["image"], out
    s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "max_new_tokens": 2, "clip": 5e-324})
    assert s == 200 and json.loads(out)["image"]["clip"]["frames"] == 1, out   # shorter than a frame: the newest one
    s, _, out = request(base, "POST", "/v1/query?clip=2", png(64, 64), {"Content-Type": "image/png"})
    assert s == 400 and error_of(out)["param"] == "clip" and "body" in error_of(out)["message"]
    # refusals name the parameter
    s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "clip": CLIP_HISTORY + 1})
    assert s == 400 and error_of(out)["param"] == "clip" and "less than or equal to 3" in error_of(out)["message"]
    s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "clip": 1,
                                                    "image": base64.b64encode(png(64, 64)).decode()})
    assert s == 400 and error_of(out)["param"] == "clip"
    # an uploaded image and the latest frame work too (Molmo2 has no v1 processor: no 500)
    s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "image": base64.b64encode(png(64, 48)).decode(),
                                                    "max_new_tokens": 2})
    assert s == 200 and json.loads(out)["image"]["source"] == "upload"
    s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "max_new_tokens": 2})
    assert s == 200 and "clip" not in json.loads(out)["image"]
    s, h, out = request(base, "GET", "/v1/frame?points=1")
    assert s == 200 and h["content-type"] == "image/jpeg" and out[:2] == b"\xff\xd8"


def test_health_models_and_openapi_describe_molmo2(served):
    base, st = served
    s, _, out = request(base, "GET", "/healthz")
    assert s == 200 and json.loads(out)["source"]["clip_history_s"] == CLIP_HISTORY
    s, _, out = request(base, "GET", f"/v1/models/{st.model_name}")
    assert s == 200 and json.loads(out)["id"] == st.model_name
    doc = json.loads(request(base, "GET", "/openapi.json")[2])
    schemas = doc["components"]["schemas"]
    clip = next(a for a in schemas["QueryJSON"]["properties"]["clip"]["anyOf"] if a.get("type") == "number")
    assert clip["maximum"] == CLIP_HISTORY and "clip" in schemas["QueryForm"]["properties"]
    assert "up to 3 images" in schemas["ChatRequest"]["description"] and "Molmo2" in doc["info"]["description"]
    assert not any(p["name"] == "clip" for p in doc["paths"]["/v1/query"]["post"]["parameters"])   # body only


def test_the_context_check_counts_molmo2_tokens_exactly(m2bundle):
    from molmo_edge.runtime import molmo2_session
    from molmo_edge.runtime.serve.conversation import ContextCheck
    m = Molmo.load(m2bundle)
    cc = ContextCheck(m)
    video = molmo2_session.processor(m).video((np.stack([rgb(i, 96, 64) for i in range(3)]), np.array([0, 0.5, 1.0])))
    for images, vid, history in (([], None, []), ([rgb(0), rgb(1, 100, 300)], None, [("What is it?", "A cup.")]),
                                 ([], video, [])):
        media = cc.media(images, 2, vid)
        n = cc.text_tokens("Point to the cup.", history, media) + media.tokens
        ans = m.ask("Point to the cup.", history=history, max_new_tokens=1, max_crops=2, **media.kwargs)
        assert n == ans.prompt_tokens, (len(images), vid is not None)


def test_context_overflow_is_a_400_before_the_vision_pass(m2bundle):
    m = Molmo.load(m2bundle)
    m.cache = m.backend.new_cache(700)   # a small context: two images do not fit
    with serving(m2bundle, model=m, limits=LIMITS) as (base, st):
        body = {"messages": [{"role": "user", "content": [image_part(0), image_part(1), {"type": "text", "text": "?"}]}]}
        s, _, out = request(base, "POST", "/v1/chat/completions", body)
        err = error_of(out)
        assert s == 400 and err["code"] == "context_length_exceeded" and "context is 700" in err["message"], err
        assert "of image" in err["message"] and m.stats["vision_runs"] == 0
        body["messages"][0]["content"] = [image_part(0), {"type": "text", "text": "?"}]
        s, _, out = request(base, "POST", "/v1/chat/completions", {**body, "max_tokens": 4})
        assert s == 200, out


def test_max_crops_caps_requests_that_do_not_say(m2bundle):
    m = Molmo.load(m2bundle)
    one = m.ask("?", images=[rgb(0, 640, 480)], max_new_tokens=1, max_crops=1).prompt_tokens
    assert one < m.ask("?", images=[rgb(0, 640, 480)], max_new_tokens=1).prompt_tokens
    with serving(m2bundle, model=m, limits=Limits(max_crops=1, max_new_tokens=4)) as (base, _):
        r = client(base).chat.completions.create(model="molmo", max_tokens=1, messages=[
            {"role": "user", "content": [image_part(0, 640, 480), {"type": "text", "text": "?"}]}])
        assert r.usage.prompt_tokens == one
        s, _, out = request(base, "POST", "/v1/query", {"prompt": "?", "max_new_tokens": 1,
                                                        "image": base64.b64encode(png(640, 480)).decode()})
        assert s == 200 and json.loads(out)["answers"][0]["prompt_tokens"] == one


def test_clip_refusals_without_history_or_on_molmo_v1(m2bundle, tmp_path, tmp_path_factory):
    from serve_helpers import shared_pointing_bundle

    from molmo_edge.runtime.cameras import open_source
    with serving(m2bundle, limits=LIMITS) as (base, _):   # no camera
        s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "clip": 2})
        assert s == 400 and error_of(out)["code"] == "no_clip_history" and "--source" in error_of(out)["message"]
    src = open_source(make_video(tmp_path / "cam.mp4"), loop=True)   # a camera that keeps no history
    try:
        with serving(m2bundle, src, limits=LIMITS) as (base, _):
            s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "clip": 2})
            assert s == 400 and error_of(out)["code"] == "no_clip_history" and "--clip-history" in error_of(out)["message"]
            doc = json.loads(request(base, "GET", "/openapi.json")[2])
            assert "clip" not in doc["components"]["schemas"]["QueryJSON"]["properties"]
        v1 = shared_pointing_bundle(tmp_path_factory)
        with serving(v1, src) as (base, _):
            s, _, out = request(base, "POST", "/v1/query", {"prompt": "Hi", "clip": 2})
            err = error_of(out)
            assert s == 400 and err["code"] == "clip_unsupported" and "Molmo2" in err["message"] and err["param"] == "clip"
    finally:
        src.close()


def test_serve_cli_refuses_clip_history_it_cannot_use(m2bundle, tmp_path_factory, capsys):
    from serve_helpers import shared_pointing_bundle

    from molmo_edge.runtime.cli.main import main
    video = make_video(tmp_path_factory.mktemp("cli") / "cam.mp4")
    for args, says in (([m2bundle, "--clip-history", "5"], "--source URI"),
                       ([m2bundle, "--max-images", "0"], "--max-images must be 1 or more"),
                       ([shared_pointing_bundle(tmp_path_factory), "--source", video, "--clip-history", "5"],
                        "needs a Molmo2 bundle")):
        assert main(["serve", *args]) == 2
        assert says in capsys.readouterr().err
