"""onnxruntime with device I/O (runtime/backends/ort_device.py): the binding decisions from providers and
graph types, and the device path itself run on the CPU provider with "cpu" OrtValues standing in for device
memory: every KV binding must point into the cache's own OrtValues, no KV crosses to the host, and the
answers equal the host path's. Not run on a GPU here (CPU box: no CUDA provider)."""
import numpy as np
import pytest
from conftest import export_tiny_bundles

from molmo_edge.runtime.backends.ort_device import OrtDeviceKVCache, binding_plan
from molmo_edge.runtime.errors import MolmoEdgeError

F32 = {"past_key.0": "tensor(float)"}


def test_binding_decisions():
    cuda = binding_plan(["CUDAExecutionProvider", "CPUExecutionProvider"], F32, "bsnh-append")
    assert (cuda.device, cuda.kv_dtype) == ("cuda", "float32")
    assert "position_ids" in cuda.per_step_h2d and cuda.per_step_d2h == ("logits",)
    assert not any(n.startswith(("past", "new")) for n in cuda.per_step_h2d + cuda.per_step_d2h)
    half = binding_plan(["CUDAExecutionProvider"], {"past_key.0": "tensor(float16)"}, "bsnh-append")
    assert half.kv_dtype == "float16" and "graph declares fp16" in half.notes[0]
    trt = binding_plan(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], F32, "bnsh-shared")
    assert trt.device == "cuda" and {"seqlens_k", "total_sequence_length"} <= set(trt.per_step_h2d)
    assert binding_plan(["CPUExecutionProvider"], F32, "bsnh-append") is None            # CPU: host path unchanged
    assert binding_plan(["CPUExecutionProvider", "CUDAExecutionProvider"], F32, "bsnh-append") is None
    assert binding_plan(["CPUExecutionProvider"], F32, "bsnh-append", force=True).device == "cpu"
    with pytest.raises(MolmoEdgeError, match="float32 or float16"):
        binding_plan(["CUDAExecutionProvider"], {"past_key.0": "tensor(int8)"}, "bsnh-append")


@pytest.fixture(scope="module")
def bundles(tiny_checkpoints, tmp_path_factory):
    return export_tiny_bundles(tiny_checkpoints, tmp_path_factory.mktemp("ortdev"), ("molmo-7b-d", "molmoe-1b"), check=False)


class _IO:
    def __init__(self, io, calls):
        self._io, self._calls = io, calls

    def __getattr__(self, k):
        attr = getattr(self._io, k)
        if not k.startswith("bind"):
            return attr

        def record(*a, **kw):
            self._calls.append((k, a))
            return attr(*a, **kw)
        return record


class _Recorder:
    """Wraps a session: every IOBinding call is recorded (name, device, shape, pointer)."""

    def __init__(self, session):
        self._s, self.calls = session, []

    def __getattr__(self, k):
        return getattr(self._s, k)

    def io_binding(self):
        return _IO(self._s.io_binding(), self.calls)

    def run_with_iobinding(self, io):
        return self._s.run_with_iobinding(io._io)


@pytest.mark.parametrize("family,fused", [("molmo-7b-d", True), ("molmo-7b-d", False), ("molmoe-1b", False)])
def test_device_path_binds_the_cache_in_place_and_answers_like_the_host_path(bundles, family, fused):
    from molmo_edge.runtime.backends.ort import OrtBackend
    from molmo_edge.runtime.bundle import load_bundle
    from molmo_edge.runtime.kv_cache import KVCache
    from molmo_edge.runtime.session import Molmo
    bundle = load_bundle(bundles[family])
    host = OrtBackend(bundle, fused=fused)
    assert host.device_io is None and type(host.new_cache(8)) is KVCache                # CPU provider: unchanged
    dev = OrtBackend(bundle, fused=fused, device_io=True)
    assert dev.device_io.plan.device == "cpu" and dev.device_io.plan.kv_layout == host.kv_layout
    rec = _Recorder(dev.device_io.session)
    dev.device_io.session = rec
    img = np.random.default_rng(0).integers(0, 256, (200, 300, 3), dtype=np.uint8)
    m, ref = Molmo(bundle, dev), Molmo(bundle, host)
    assert isinstance(m.cache, OrtDeviceKVCache)
    for prompt in ("Point to the red box.", "How many boxes?"):
        a, b = m.ask(prompt, img, max_new_tokens=5, max_crops=2), ref.ask(prompt, img, max_new_tokens=5, max_crops=2)
        assert a.token_ids == b.token_ids
    # every K/V binding points into the cache's OrtValues, on the plan's device; inputs are device OrtValues
    cache = m.cache
    spans = [(v.data_ptr(), v.data_ptr() + cache.nbytes() // (2 * len(cache.keys))) for v in cache.keys + cache.values]
    kv = [c for c in rec.calls if c[0] in ("bind_input", "bind_output") and c[1][0].startswith(("past_", "new_", "present_"))]
    assert kv and all(c[1][1] == "cpu" for c in kv)
    assert not [c for c in rec.calls if c[0] == "bind_cpu_input"]
    assert {c[1][0] for c in rec.calls if c[0] == "bind_ortvalue_input"} >= {"inputs_embeds", "logit_positions"}
    for _, (name, _, _, _, shape, ptr) in kv:                    # every step of both questions
        assert any(lo <= ptr and ptr + int(np.prod(shape)) * 4 <= hi for lo, hi in spans), name
    news = [c[1] for c in kv if c[1][0] == "new_key.0"]
    if news:                                                       # portable graph: new rows right after the past
        assert [n[5] - news[0][5] for n in news[1:3]] != [0, 0]
    inputs = m.processor.process("Describe.")
    np.testing.assert_allclose(m.forward(inputs)["logits"], ref.forward(inputs)["logits"], rtol=0, atol=1e-5)
    # per step: only the inputs go up, only the logits come down
    copies = dev.device_io.copies
    assert [n for d, n, _ in copies if d == "d2h"] == ["logits"]
    assert not [n for d, n, _ in copies if n.startswith(("past", "new", "present"))]
    with pytest.raises(MolmoEdgeError, match="device memory"):
        cache.past(0)
    with pytest.raises(MolmoEdgeError, match="backend.new_cache"):
        dev.run_decoder(np.zeros((1, 1, bundle.config.d_model), np.float32), np.zeros((1, 1), np.int64),
                        host.new_cache(4), np.zeros(1, np.int64))
