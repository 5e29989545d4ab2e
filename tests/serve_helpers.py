"""Shared by the server tests: a tiny bundle with a known answer, a server on loopback in a thread, and
plain HTTP helpers (http.client and raw sockets, so nothing hides what goes over the wire).

The model is real: a tiny bundle run by onnxruntime. Its weights are set so that greedy decoding
always answers POINT_ANSWER (a point at 61 %, 42 %), which makes points checkable end to end."""
from __future__ import annotations

import http.client
import json
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import cv2
import numpy as np
import pytest

POINT_ANSWER = "(61, 42)"
_BUNDLES: dict[str, str] = {}   # one export per test process, shared by every server test module


def make_pointing_bundle(folder) -> str:
    """A tiny molmo-7b-d bundle whose greedy answer to any prompt is POINT_ANSWER.

    Every block's attention and MLP outputs are zeroed, so the residual stream at a position is that
    token's embedding and the next token depends on the current one only. Each token of the chain
    (last prompt token -> "(" -> "6" -> ... -> ")" -> EOS) gets its own embedding axis, and the LM
    head maps that axis to the next token of the chain. Export and inference are the real ones."""
    pytest.importorskip("torch")
    from safetensors.numpy import load_file, save_file

    from molmo_edge.export.bundle import export_bundle
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.config import load_config
    from molmo_edge.runtime.tokenizer import MolmoTokenizer

    folder = Path(folder)
    ck = make_random_checkpoint(str(folder / "ckpt"), "molmo-7b-d")
    tok = MolmoTokenizer(ck, load_config(ck))
    last = tok.encode_prompt("anything")[-1]
    assert tok.encode_prompt("Point to the cup.")[-1] == last  # every prompt ends in "Assistant:"
    chain = [last] + tok.encode(POINT_ANSWER) + [tok.eos_id]
    assert len(set(chain)) == len(chain), "the chain needs distinct tokens"
    w = load_file(f"{ck}/model.safetensors")
    for k in w:
        if ".blocks." in k and k.endswith(("attn_out.weight", "ff_out.weight")):
            w[k] = np.zeros_like(w[k])
    emb, head = w["model.transformer.wte.embedding"], w["model.transformer.ff_out.weight"]
    w["model.transformer.ln_f.weight"] = np.ones_like(w["model.transformer.ln_f.weight"])
    head[:, : len(chain)] = 0
    for axis, (cur, nxt) in enumerate(zip(chain, chain[1:])):
        emb[cur] = 0
        emb[cur, axis] = 1.0
        head[nxt, axis] = 20.0
    save_file(w, f"{ck}/model.safetensors", metadata={"format": "pt"})
    out = str(folder / "bundle")
    export_bundle(ck, out, progress=lambda *_: None)
    return out


def shared_pointing_bundle(tmp_path_factory) -> str:
    if "pointing" not in _BUNDLES:
        _BUNDLES["pointing"] = make_pointing_bundle(tmp_path_factory.mktemp("pointing"))
    return _BUNDLES["pointing"]


def make_video(path, n=20, fps=20, size=(320, 240)):
    w = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    for i in range(n):
        img = np.full((size[1], size[0], 3), 40, np.uint8)
        cv2.circle(img, (20 + 12 * i, size[1] // 2), 15, (0, 0, 230), -1)
        w.write(img)
    w.release()
    return str(path)


def png(w=320, h=240, seed=0) -> bytes:
    img = np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)
    return cv2.imencode(".png", img)[1].tobytes()


@contextmanager
def serving(bundle, source=None, **kw):
    """A server on 127.0.0.1, random port, in a thread; yields (base URL, ServeState)."""
    from molmo_edge.runtime.serve.server import ServeState, make_server
    from molmo_edge.runtime.session import Molmo
    model = kw.pop("model", None) or Molmo.load(bundle)
    st = ServeState(model, source, **kw)
    server = make_server(st, "127.0.0.1", 0).start()
    try:
        yield server.url, st
    finally:
        server.shutdown()
        server.close()
        st.close()


def hostport(base):
    host, port = base.split("//")[1].split(":")
    return host, int(port)


def request(base, method, path, body=None, headers=None, timeout=30):
    """(status, headers, body bytes) over a fresh connection."""
    c = http.client.HTTPConnection(*hostport(base), timeout=timeout)
    try:
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
            headers = {"Content-Type": "application/json", **(headers or {})}
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


def raw(base, data: bytes, timeout=10) -> bytes:
    with socket.create_connection(hostport(base), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            out += chunk
        return out


def error_of(out: bytes) -> dict:
    """The `error` object of an answer, checked to be in OpenAI's shape."""
    e = json.loads(out)["error"]
    assert set(e) == {"message", "type", "param", "code"} and isinstance(e["code"], str), e
    assert isinstance(e["message"], str) and "\n" not in e["message"]
    return e


class SlowModel:
    """The real model, with its streamed text delivered slowly (as a big model on a small device would)."""

    def __init__(self, model, delay):
        self.model, self.delay, self.stats = model, delay, model.stats

    def ask(self, *a, on_text=None, **kw):
        def slow(piece):  # the first piece at once (a loaded CI box must not time out before it), then slowly
            if on_text:
                on_text(piece)
            time.sleep(self.delay)
        return self.model.ask(*a, on_text=slow, **kw)
