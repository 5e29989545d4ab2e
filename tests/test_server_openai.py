"""The official `openai` Python client against a real server on loopback: text, an image, several images
(the 400 Molmo v1 owes them), streaming with usage, and errors mapped to the SDK's exception classes."""
import base64
import time

import pytest

pytest.importorskip("uvicorn", reason="the server extra is not installed: pip install 'molmo-edge[serve]'")
openai = pytest.importorskip("openai", reason="the openai client is not installed: pip install openai")
from serve_helpers import POINT_ANSWER, SlowModel, png, serving, shared_pointing_bundle  # noqa: E402

from molmo_edge.runtime.serve.server import Limits  # noqa: E402


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    bundle = shared_pointing_bundle(tmp_path_factory)
    with serving(bundle, api_key="sk-test ;k=y", limits=Limits(max_new_tokens=64, timeout_s=30)) as (base, st):
        yield base, st, bundle


def client(base, key="sk-test ;k=y", **kw):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, **kw)


def image_part(seed=0):
    uri = "data:image/png;base64," + base64.b64encode(png(320, 240, seed)).decode()
    return {"type": "image_url", "image_url": {"url": uri}}


def test_text_image_and_models(served):
    base, st, _ = served
    c = client(base)
    ids = [m.id for m in c.models.list()]
    assert "molmo" in ids and c.models.retrieve("molmo").id == "molmo"
    r = c.chat.completions.create(model="molmo", messages=[{"role": "user", "content": "Point to the cup."}], max_tokens=20)
    assert r.choices[0].message.content == POINT_ANSWER and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens == 9 and r.usage.total_tokens == r.usage.prompt_tokens + 9
    r = c.chat.completions.create(model=ids[0], messages=[
        {"role": "system", "content": "Answer with points."},
        {"role": "user", "content": [{"type": "text", "text": "Point to the cup."}, image_part()]}])
    assert r.choices[0].message.content == POINT_ANSWER
    extras = r.model_extra["molmo"]                  # molmo-edge's points ride along as an extra field
    assert extras["points"][0]["x_pct"] == 61.0 and extras["image_size"] == [320, 240]
    assert r.usage.prompt_tokens > 100               # the image's tokens count


def test_system_messages_go_before_the_first_question(served):
    base, _, _ = served
    c = client(base)
    user = {"role": "user", "content": "Point to the cup."}
    plain = c.chat.completions.create(model="molmo", messages=[user]).usage.prompt_tokens
    system = {"role": "system", "content": "You are a robot's eyes. Answer with points only."}
    with_system = c.chat.completions.create(model="molmo", messages=[system, user]).usage.prompt_tokens
    assert with_system > plain + 5          # used, not dropped (the old server counted it but threw it away)
    later = c.chat.completions.create(model="molmo", messages=[user, {"role": "assistant", "content": "(1, 2)"},
                                                               {"role": "developer", "content": "Be brief."}, user])
    assert later.choices[0].message.content == POINT_ANSWER


def test_several_images_are_a_400_not_a_silent_drop(served):
    base, _, _ = served
    with pytest.raises(openai.BadRequestError) as e:
        client(base).chat.completions.create(model="molmo", messages=[
            {"role": "user", "content": [image_part(0), {"type": "text", "text": "Which is brighter?"}, image_part(1)]}])
    err = e.value.body
    assert e.value.status_code == 400 and err["code"] == "too_many_images" and "one image" in err["message"]
    assert err["param"] == "messages[0].content[2].image_url.url"
    with pytest.raises(openai.BadRequestError):   # across turns too
        client(base).chat.completions.create(model="molmo", messages=[
            {"role": "user", "content": [image_part(0), {"type": "text", "text": "this?"}]},
            {"role": "assistant", "content": "A cup."},
            {"role": "user", "content": [image_part(1), {"type": "text", "text": "and this?"}]}])


def test_streaming_with_usage(served):
    base, _, _ = served
    stream = client(base).chat.completions.create(
        model="molmo", messages=[{"role": "user", "content": [{"type": "text", "text": "Point."}, image_part()]}],
        stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == POINT_ANSWER
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_errors_map_to_the_sdk_exception_classes(served):
    base, _, _ = served
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(openai.AuthenticationError):
        client(base, key="wrong").chat.completions.create(model="molmo", messages=msgs)
    with pytest.raises(openai.NotFoundError) as e:
        client(base).chat.completions.create(model="gpt-4o", messages=msgs)
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError):
        client(base).models.retrieve("gpt-4o")
    for kw, param in (({"response_format": {"type": "json_object"}}, "response_format"),
                      ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
                      ({"logprobs": True}, "logprobs"), ({"frequency_penalty": 0.5}, "frequency_penalty"),
                      ({"presence_penalty": 1.0}, "presence_penalty"), ({"logit_bias": {"5": 1}}, "logit_bias"),
                      ({"n": 2}, "n"), ({"max_tokens": 10_000}, "max_tokens")):
        with pytest.raises(openai.BadRequestError) as e:
            client(base).chat.completions.create(model="molmo", messages=msgs, **kw)
        assert e.value.body["param"] == param and isinstance(e.value.body["code"], str), (kw, e.value.body)
    # the "off" values of unsupported parameters are fine (they change nothing)
    r = client(base).chat.completions.create(model="molmo", messages=msgs, logprobs=False, frequency_penalty=0,
                                             response_format={"type": "text"})
    assert r.choices[0].message.content == POINT_ANSWER
    with pytest.raises(openai.BadRequestError) as e:
        client(base).chat.completions.create(model="molmo", messages=[{"role": "user", "content": "hi"},
                                                                      {"role": "assistant", "content": "Sure"}])
    assert e.value.body["param"] == "messages[1].role"


def test_full_queue_is_a_rate_limit_the_sdk_retries_and_a_timeout_it_does_not(served):
    base, st, bundle = served
    import threading
    gate = threading.Event()
    st.worker.submit(lambda job: gate.wait(10))
    time.sleep(0.1)
    fillers = [st.worker.submit(lambda job: None) for _ in range(st.worker.capacity)]
    with pytest.raises(openai.InternalServerError) as e:   # 503: retryable; with no retries left, the SDK gives up
        client(base, max_retries=0).chat.completions.create(model="molmo", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"]
    gate.set()
    for f in fillers:
        f.future.result(timeout=10)

    from molmo_edge.runtime.session import Molmo
    with serving(bundle, model=SlowModel(Molmo.load(bundle), 0.2), limits=Limits(timeout_s=0.5)) as (slow, sst):
        t = time.monotonic()
        with pytest.raises(openai.InternalServerError) as e:
            client(slow, max_retries=2).chat.completions.create(model="molmo", messages=[{"role": "user", "content": "hi"}])
        assert e.value.status_code == 504 and e.value.body["code"] == "generation_timeout"
        assert time.monotonic() - t < 5
        # the cancelled generation ends at its next piece (up to 0.2 s after the 504): wait for it, then for a retry
        # that x-should-retry: false must have prevented
        deadline = time.monotonic() + 5
        while sst.worker.completed + sst.worker.failed < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.5)
        assert sst.worker.completed + sst.worker.failed == 1   # run once, not three times
