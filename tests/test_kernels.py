"""Fused CUDA kernels (molmo_edge.kernels): compile for every target, references against the torch
reference model, kernels against references.

Where the kernels run:
  * everywhere a host C++ compiler exists: the unchanged kernel source on the CPU SIMT emulator
    (simt_emulator.cuh), through both the Python launch path and the C entry points;
  * on a GPU: through the cuda-python launcher and the nvcc-built C
    library, over a grid including the real Molmo shapes.
"""
from __future__ import annotations

import shutil
import subprocess
import sys

import numpy as np
import pytest

from molmo_edge.kernels import build as KB
from molmo_edge.kernels import launch as L
from molmo_edge.kernels import reference as ref

ATOL, RTOL = 4e-3, 4e-3  # fp16 outputs of O(1) values; fp16 P in P.V


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _f16(rng: np.random.Generator, *shape: int) -> np.ndarray:
    return rng.standard_normal(shape).astype(np.float16)


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got = np.asarray(got, np.float64)
    assert not np.isnan(got).any(), f"{what}: NaN in kernel output"
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=what)


# ---------------------------------------------------------------------------------------------
# import hygiene
# ---------------------------------------------------------------------------------------------

def test_import_does_not_load_torch_or_cuda_bindings():
    code = ("import sys, molmo_edge.kernels, molmo_edge.kernels.launch, molmo_edge.kernels.reference; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'cuda', 'pycuda', 'cupy')]; "
            "print(bad); sys.exit(1 if bad else 0)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------------
# compilation for sm_87 (Orin), sm_90 (H100), sm_110 (Thor)
# ---------------------------------------------------------------------------------------------

def _compiler_or_skip() -> str:
    if KB.nvcc_path():
        return "nvcc"
    if KB.nvrtc_available():
        return "nvrtc"
    pytest.skip("neither nvcc (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin) nor NVRTC through cuda-python "
                "(pip install cuda-python nvidia-cuda-nvrtc) is available")


def _check_cubin(res: KB.CompileResult, arch: int) -> None:
    syms = KB.cubin_symbols(res.cubin)
    missing = [k for k in L.KERNEL_NAMES if k not in syms]
    assert not missing, f"sm_{arch}: kernels missing from the cubin: {missing}"
    usage = KB.ptxas_usage(res.log)
    for k in L.KERNEL_NAMES:
        assert k in usage and "registers" in usage[k], f"sm_{arch}: no ptxas report for {k}:\n{res.log}"
        # a spill in these loops would cost far more than the targets allow
        assert usage[k]["spill_stores"] == 0 and usage[k]["spill_loads"] == 0, (k, arch, usage[k])
        assert usage[k]["registers"] <= 255


@pytest.mark.parametrize("arch", KB.TARGET_ARCHS)
def test_kernels_compile(arch):
    compiler = _compiler_or_skip()
    if compiler == "nvrtc" and arch not in KB.nvrtc_supported_archs():
        pytest.fail(f"NVRTC {KB.nvrtc_version()} cannot target sm_{arch} (supported: {KB.nvrtc_supported_archs()}); "
                    "sm_110 needs CUDA 13 (pip install 'nvidia-cuda-nvrtc>=13')")
    _check_cubin(KB.compile_cubin(arch, compiler), arch)


@pytest.mark.parametrize("arch", KB.TARGET_ARCHS)
def test_kernels_compile_with_nvrtc_too(arch):
    """The runtime path on a device without nvcc: NVRTC through cuda-python."""
    if not KB.nvrtc_available():
        pytest.skip("cuda-python / NVRTC not installed (pip install cuda-python nvidia-cuda-nvrtc)")
    if KB.nvcc_path() is None:
        pytest.skip("already covered by test_kernels_compile (NVRTC is the compiler there)")
    if arch not in KB.nvrtc_supported_archs():
        pytest.fail(f"this NVRTC cannot target sm_{arch}: {KB.nvrtc_supported_archs()}")
    _check_cubin(KB.compile_cubin(arch, "nvrtc"), arch)


def test_compiled_cubin_is_cached_on_disk(tmp_path, monkeypatch):
    compiler = _compiler_or_skip()
    monkeypatch.setenv("MOLMO_EDGE_KERNEL_CACHE", str(tmp_path))
    first = KB.compile_cubin(87, compiler)
    assert first.path.parent == tmp_path and first.path.exists() and KB.source_hash() in first.path.name
    again = KB.compile_cubin(87, compiler)
    assert again.cubin == first.cubin and again.path == first.path


def test_c_library_builds():
    """Host entry points + device code linked into the C library (device code for every target is
    covered by test_kernels_compile; one arch keeps this fast)."""
    if not KB.nvcc_path():
        pytest.skip("the C library (host entry points of molmo_kernels.h) is built with nvcc, not on PATH")
    lib = L.CLibrary(KB.build_library((87,)))
    for name in L._C_API:
        assert hasattr(lib.lib, name)
    assert not lib.emulated


def test_header_is_plain_c():
    """molmo_kernels.h must compile as C (TensorRT plugins and other C callers include it)."""
    cc = shutil.which("gcc") or shutil.which("cc")
    nvcc = KB.nvcc_path()
    if not cc or not nvcc:
        pytest.skip("needs a C compiler and the CUDA include directory (nvcc's toolkit)")
    import os
    from pathlib import Path
    roots = [Path(nvcc).resolve().parent.parent, *(Path(r) for r in (os.environ.get("CUDA_HOME"), "/usr/local/cuda") if r)]
    incs = [r / "include" for r in roots if (r / "include" / "cuda_runtime.h").exists()]
    if not incs:
        pytest.skip("cuda_runtime.h not found next to nvcc, in $CUDA_HOME or /usr/local/cuda")
    inc = str(incs[0])
    r = subprocess.run([cc, "-std=c99", "-fsyntax-only", "-I", inc, "-x", "c", str(KB.KERNEL_DIR / "molmo_kernels.h")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------------------------------------
# numpy references against the torch reference model
# ---------------------------------------------------------------------------------------------

def _torch_model():
    torch = pytest.importorskip("torch")
    try:
        from molmo_edge.export import model as M
        from molmo_edge.runtime.config import MolmoConfig, VisionConfig
    except ImportError as e:  # e.g. a GPU box with torch but without the runtime dependencies
        pytest.skip(f"torch reference model not importable: {e}")
    return torch, M, MolmoConfig, VisionConfig


def _np(t) -> np.ndarray:
    return t.detach().double().numpy()


def test_rope_reference_matches_model():
    torch, M, *_ = _torch_model()
    pos = np.array([[0, 1, 7, 100, 1000, 4095]])
    for theta in (1e4, 5e5, 1e6):
        cos, sin = M.rope_tables(torch.tensor(pos), 128, theta)
        rc, rs = ref.rope_tables(pos, 128, theta)
        # float32 angles: one ulp of an inverse frequency moves the angle by up to pos * 6e-8
        np.testing.assert_allclose(rc, cos.numpy(), atol=3e-4)
        np.testing.assert_allclose(rs, sin.numpy(), atol=3e-4)
        np.testing.assert_allclose(rc[0, :4], cos.numpy()[0, :4], atol=1e-6)
        x = _f16(_rng(0), 1, 6, 3, 128)  # [B, T, H, D]
        want = M.apply_rope(torch.tensor(x).transpose(1, 2), cos[:, None], sin[:, None]).transpose(1, 2)
        np.testing.assert_allclose(ref.apply_rope(x, pos, theta).astype(np.float32), want.float().numpy(), atol=2e-3)


@pytest.mark.parametrize("heads,seq", [(2, 577), (3, 50)])
def test_vit_reference_matches_vit_attention_layer(heads, seq):
    torch, M, *_ = _torch_model()
    torch.manual_seed(0)
    width = heads * 64
    layer = M.VitAttention(width, width, heads, 64, heads).double()
    x = torch.randn(2, seq, width, dtype=torch.float64)
    with torch.no_grad():
        want = _np(layer(x))
        q, k, v = (_np(lin(x)).reshape(2, seq, heads, 64) for lin in (layer.wq, layer.wk, layer.wv))
    got = ref.vit_attention(q, k, v).reshape(2, seq, width) @ _np(layer.wo.weight).T + _np(layer.wo.bias)
    np.testing.assert_allclose(got, want, atol=2e-6)  # SDPA runs in float32 inside the layer


def test_pool_reference_matches_vision_encoder_pooling():
    """VisionEncoder groups patches into 2x2 windows and pools with q = Wq . mean(x); the reference
    averages per-patch projected queries over reference.pool_windows. Capture the model's pooling
    layer input/output inside VisionEncoder.forward and compare."""
    torch, M, MolmoConfig, VisionConfig = _torch_model()
    torch.manual_seed(1)
    vis = VisionConfig(width=128, heads=2, head_dim=64, kv_heads=2, mlp_dim=64, layers=10)
    cfg = MolmoConfig(layout="molmo", d_model=64, n_heads=2, n_kv_heads=2, n_layers=1, head_dim=32, ffn_hidden=64,
                      vocab_size=100, embedding_size=128, vision=vis)
    enc = M.VisionEncoder(cfg).double()
    for p in (enc.class_embedding, enc.positional_embedding, enc.pad_embed):
        torch.nn.init.normal_(p, std=0.5)
    seen = {}
    enc.pool.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp, out=out))
    n, (gh, gw) = 2, vis.patches_per_side
    with torch.no_grad():
        enc(torch.randn(n, vis.num_patches, vis.patch_dim, dtype=torch.float64),
            torch.rand(n, vis.num_patches, dtype=torch.float64))
        win = seen["inp"][1]                                   # [n * windows, 4, 256]
        per_patch = torch.zeros(n, gh * gw, win.shape[-1], dtype=torch.float64)
        idx = torch.tensor(ref.pool_windows(gh, gw))
        per_patch[:, idx] = win.reshape(n, -1, 4, win.shape[-1])
        q, k, v = (_np(lin(per_patch)).reshape(n, gh * gw, 2, 64) for lin in (enc.pool.wq, enc.pool.wk, enc.pool.wv))
    pooled = ref.attention_pool(q, k, v, gh, gw).reshape(n, -1, 128)
    got = pooled @ _np(enc.pool.wo.weight).T + _np(enc.pool.wo.bias)
    # the layer runs SDPA in float32 (q.float()), the reference in float64
    np.testing.assert_allclose(got, _np(seen["out"]).reshape(n, -1, 128), atol=2e-6)
    # the already-averaged query form gives the same
    qm = q[:, ref.pool_windows(gh, gw)].mean(2)
    np.testing.assert_allclose(ref.attention_pool(qm, k, v, gh, gw, q_per_window=True).reshape(n, -1, 128), pooled)


def _block(heads, kv_heads, theta, qkv_bias, seed):
    torch, M, MolmoConfig, _ = _torch_model()
    torch.manual_seed(seed)
    cfg = MolmoConfig(layout="molmo", d_model=heads * 128, n_heads=heads, n_kv_heads=kv_heads, n_layers=1,
                      head_dim=128, ffn_hidden=64, vocab_size=100, embedding_size=128, qkv_bias=qkv_bias,
                      rope_theta=theta)
    blk = M.Block(cfg)
    seen = {}
    blk.attn_out.register_forward_pre_hook(lambda mod, inp: seen.update(att=inp[0]))
    return torch, M, cfg, blk, seen


def _qkv(blk, cfg, x):
    h = blk.attn_norm(x)
    q, k, v = blk.att_proj(h).split([cfg.q_dim, cfg.kv_dim, cfg.kv_dim], -1)
    b, t = x.shape[:2]
    return (q.reshape(b, t, cfg.n_heads, 128).numpy(), k.reshape(b, t, cfg.n_kv_heads, 128).numpy(),
            v.reshape(b, t, cfg.n_kv_heads, 128).numpy())


@pytest.mark.parametrize("heads,kv_heads,theta,past,new", [(4, 4, 1e4, 0, 37), (8, 2, 1e6, 21, 30), (7, 1, 5e5, 5, 1)])
def test_decoder_references_match_block_attention(heads, kv_heads, theta, past, new):
    """Prefill of `past` tokens, then `new` tokens with the cache (new == 1: decode). The reference
    caches must equal the block's `present` (K after RoPE, V) and its attention output the input of
    attn_out."""
    torch, M, cfg, blk, seen = _block(heads, kv_heads, theta, kv_heads != heads, seed=heads)
    x = torch.randn(2, past + new, cfg.d_model) * 0.5
    max_len = past + new + 9
    pos = torch.arange(past + new)[None].expand(2, -1)
    cos, sin = M.rope_tables(pos, 128, theta)
    with torch.no_grad():
        past_kv = None
        if past:
            _, past_kv = blk(x[:, :past], cos[:, None, :past], sin[:, None, :past])
        _, present = blk(x[:, past:], cos[:, None, past:], sin[:, None, past:], past_kv)
        att = seen["att"].reshape(2, new, heads, 128).double().numpy()
        q, k, v = _qkv(blk, cfg, x[:, past:])
    kc = np.zeros((2, kv_heads, max_len, 128), np.float16)
    vc = np.zeros_like(kc)
    if past_kv is not None:
        kc[:, :, :past], vc[:, :, :past] = past_kv[0].numpy(), past_kv[1].numpy()
    lens = np.full(2, past, np.int32)
    if new == 1:
        out, kc2, vc2 = ref.decoder_decode(q[:, 0], k[:, 0], v[:, 0], kc, vc, lens, theta)
        out = out[:, None]
    else:
        out, kc2, vc2 = ref.decoder_prefill(q, k, v, kc, vc, lens, theta)
    # the reference rounds RoPE'd q/k and the cache to fp16 like the fp16 kernels; the model is fp32
    np.testing.assert_allclose(kc2[:, :, : past + new], present[0].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(vc2[:, :, : past + new], present[1].numpy(), atol=2e-3, rtol=2e-3)
    assert not kc2[:, :, past + new:].any()
    np.testing.assert_allclose(out, att, atol=3e-3, rtol=3e-3)


# ---------------------------------------------------------------------------------------------
# kernels against the references: one battery, run on the emulator and on GPUs
# ---------------------------------------------------------------------------------------------

VIT_CASES_SMALL = [(1, 577, 1), (2, 65, 2), (1, 1, 1), (3, 130, 1)]
VIT_CASES_GPU = [(7, 577, 16), (1, 577, 16), (2, 64, 3), (3, 129, 2), (1, 1, 1)]
POOL_CASES_SMALL = [(2, 4, 6, 3), (1, 24, 24, 2)]
POOL_CASES_GPU = [(7, 24, 24, 16), (2, 4, 6, 3), (1, 2, 2, 1)]
# (batch, seq, heads, kv_heads, past lens, theta)
PREFILL_CASES_SMALL = [(1, 70, 2, 2, [0], 1e4), (2, 65, 7, 1, [3, 60], 1e6), (1, 1, 2, 1, [9], 5e5),
                       (1, 130, 4, 2, [64], 1e6)]
PREFILL_CASES_GPU = [(1, 750, 16, 16, [0], 1e4), (2, 300, 28, 4, [0, 37], 1e6), (1, 1, 8, 1, [100], 1e6),
                     (1, 513, 64, 8, [0], 1e6), (3, 63, 4, 4, [1, 64, 65], 5e5)]
# (batch, heads, kv_heads, lens, max_len, splits) - lens are the tokens cached before the step
DECODE_CASES_SMALL = [(1, 2, 2, [0], 64, 1), (2, 8, 2, [63, 64], 130, 0), (1, 7, 1, [200], 256, 3),
                      (1, 32, 1, [100], 128, 2), (2, 4, 4, [1, 130], 140, 5)]
DECODE_CASES_GPU = [(1, 16, 16, [4095], 4096, 0), (2, 28, 4, [1000, 3000], 4096, 0), (1, 64, 8, [2047], 2048, 0),
                    (1, 32, 1, [300], 512, 0), (4, 16, 16, [0, 1, 63, 64], 128, 1), (1, 28, 4, [777], 1024, 7)]


def check_vit(kern, cases):
    for n, s, h in cases:
        rng = _rng(n * 1000 + s + h)
        q, k, v = (_f16(rng, n, s, h, 64) for _ in range(3))
        _close(L.run_vit_attention(kern, q, k, v), ref.vit_attention(q, k, v), f"vit n={n} seq={s} heads={h}")


def check_vit_strides(kern):
    """q/k/v as views of a fused [n, seq, 3, heads, 64] projection; out in [n, heads, seq, 64]."""
    n, s, h = 2, 77, 2
    rng = _rng(5)
    qkv = _f16(rng, n, s, 3, h, 64)
    m = kern.memory
    base = m.to_device(qkv)
    tok = (s * 3 * h * 64, 64, 3 * h * 64)
    guard = 64
    out_host = np.full(n * h * s * 64 + 2 * guard, 0x7BFF, np.uint16)  # 65504 sentinels around the output
    dout = m.to_device(out_host)
    kern.vit_attention(base, base + h * 64 * 2, base + 2 * h * 64 * 2, dout + guard * 2, tok, tok, tok,
                       (h * s * 64, s * 64, 64), n, h, s)
    got = m.to_host(dout, out_host.shape, np.uint16)
    assert (got[:guard] == 0x7BFF).all() and (got[-guard:] == 0x7BFF).all(), "write outside the output tensor"
    out = got[guard:-guard].view(np.float16).reshape(n, h, s, 64).transpose(0, 2, 1, 3)
    _close(out, ref.vit_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]), "vit strided")


def check_pool(kern, cases):
    for n, gh, gw, h in cases:
        rng = _rng(n + gh * 7 + gw * 13 + h)
        q, k, v = (_f16(rng, n, gh * gw, h, 64) for _ in range(3))
        _close(L.run_attention_pool(kern, q, k, v, gh, gw), ref.attention_pool(q, k, v, gh, gw),
               f"pool n={n} grid={gh}x{gw} heads={h}")
        qw = _f16(rng, n, (gh // 2) * (gw // 2), h, 64)
        _close(L.run_attention_pool(kern, qw, k, v, gh, gw, q_per_window=True),
               ref.attention_pool(qw, k, v, gh, gw, q_per_window=True), f"pool q_per_window n={n}")


def check_prefill(kern, cases, positions=False):
    for b, t, h, hkv, lens, theta in cases:
        rng = _rng(b * 100 + t + h)
        max_len = max(lens) + t + 5
        q, k, v = _f16(rng, b, t, h, 128), _f16(rng, b, t, hkv, 128), _f16(rng, b, t, hkv, 128)
        kc, vc = _f16(rng, b, hkv, max_len, 128), _f16(rng, b, hkv, max_len, 128)  # stale cache content
        lens = np.array(lens, np.int32)
        pos = (lens[:, None] + np.arange(t)[None] + 1000).astype(np.int32) if positions else None
        got, gk, gv = L.run_decoder_prefill(kern, q, k, v, kc, vc, lens, theta, pos)
        want, wk, wv = ref.decoder_prefill(q, k, v, kc, vc, lens, theta, pos)
        what = f"prefill b={b} t={t} heads={h}/{hkv} lens={list(lens)}"
        np.testing.assert_allclose(gk.astype(np.float32), wk.astype(np.float32), atol=2e-3, rtol=2e-3,
                                   err_msg=what + " k_cache")
        np.testing.assert_array_equal(gv, wv, err_msg=what + " v_cache")
        _close(got, want, what)


def check_decode(kern, cases, positions=False):
    for b, h, hkv, lens, max_len, splits in cases:
        rng = _rng(b * 10 + h + hkv + max_len)
        q, k, v = _f16(rng, b, h, 128), _f16(rng, b, hkv, 128), _f16(rng, b, hkv, 128)
        kc, vc = _f16(rng, b, hkv, max_len, 128), _f16(rng, b, hkv, max_len, 128)
        lens = np.array(lens, np.int32)
        pos = (lens + 17).astype(np.int32) if positions else None
        got, gk, gv = L.run_decoder_decode(kern, q, k, v, kc, vc, lens, 1e6 if h % 7 == 0 else 1e4, pos,
                                           num_splits=splits)
        want, wk, wv = ref.decoder_decode(q, k, v, kc, vc, lens, 1e6 if h % 7 == 0 else 1e4, pos)
        what = f"decode b={b} heads={h}/{hkv} lens={list(lens)} splits={splits}"
        np.testing.assert_allclose(gk.astype(np.float32), wk.astype(np.float32), atol=2e-3, rtol=2e-3,
                                   err_msg=what + " k_cache")
        np.testing.assert_array_equal(gv, wv, err_msg=what + " v_cache")
        _close(got, want, what)


def run_battery(kern, big: bool) -> None:
    check_vit(kern, VIT_CASES_GPU if big else VIT_CASES_SMALL)
    check_vit_strides(kern)
    check_pool(kern, POOL_CASES_GPU if big else POOL_CASES_SMALL)
    check_prefill(kern, PREFILL_CASES_GPU if big else PREFILL_CASES_SMALL)
    check_prefill(kern, PREFILL_CASES_SMALL[1:2], positions=True)
    check_decode(kern, DECODE_CASES_GPU if big else DECODE_CASES_SMALL)
    check_decode(kern, DECODE_CASES_SMALL[1:2], positions=True)


# ---- CPU: the kernel source on the SIMT emulator

@pytest.fixture(scope="module")
def emulator_lib():
    try:
        return L.CLibrary(KB.build_library(emulate=True))
    except KB.BackendUnavailable as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("path", ["python-launch", "c-entry-points"])
@pytest.mark.parametrize("check", ["vit", "pool", "prefill", "decode"])
def test_kernels_on_cpu_emulator(emulator_lib, path, check):
    kern = (L.DirectKernels(L.EmulatorLauncher(emulator_lib)) if path == "python-launch"
            else L.CLibKernels(emulator_lib, L.HostMemory(), L.EmulatorLauncher.num_sms))
    if check == "vit":
        check_vit(kern, VIT_CASES_SMALL)
        check_vit_strides(kern)
    elif check == "pool":
        check_pool(kern, POOL_CASES_SMALL)
    elif check == "prefill":
        check_prefill(kern, PREFILL_CASES_SMALL)
        check_prefill(kern, PREFILL_CASES_SMALL[1:2], positions=True)
    else:
        check_decode(kern, DECODE_CASES_SMALL)
        check_decode(kern, DECODE_CASES_SMALL[1:2], positions=True)


def test_python_geometry_mirrors_c(emulator_lib):
    lib = emulator_lib.lib
    for b in (1, 2, 8):
        for h, hkv in ((16, 16), (28, 4), (64, 8), (32, 1)):
            for n in (64, 1000, 4096, 32768):
                for sms in (8, 16, 132):
                    assert L.decode_default_splits(b, h, hkv, n, sms) == lib.molmo_decode_default_splits(b, h, hkv, n, sms)
            for s in (1, 2, 17, 64):
                assert L.decode_workspace_bytes(b, h, hkv, s) == lib.molmo_decode_workspace_bytes(b, h, hkv, s)
    # MolmoE at 4k on an H100: enough CTAs for two waves
    assert L.decode_default_splits(1, 16, 16, 4096, 132) * 16 >= 2 * 132


def test_c_entry_points_reject_bad_arguments(emulator_lib):
    mem = L.HostMemory()
    buf = mem.zeros(1 << 16)
    s = (64 * 64, 64, 64)
    ok = dict(q_s=s, k_s=s, v_s=s, o_s=s)
    kern = L.CLibKernels(emulator_lib, mem)
    with pytest.raises(RuntimeError, match="cudaError 1"):  # misaligned pointer
        kern.vit_attention(buf + 2, buf, buf, buf, n_crops=1, heads=1, seq=4, **ok)
    with pytest.raises(RuntimeError, match="cudaError 1"):  # stride not a multiple of 8
        kern.vit_attention(buf, buf, buf, buf, (64, 64, 60), s, s, s, 1, 1, 4)
    with pytest.raises(RuntimeError, match="cudaError 1"):  # odd grid
        kern.attention_pool(buf, buf, buf, buf, s, s, s, s, 1, 1, 3, 4)
    with pytest.raises(RuntimeError, match="cudaError 1"):  # heads not a multiple of kv_heads
        kern.decoder_decode(buf, buf, buf, buf, buf, buf, s, s, s, s, buf, 0, 1, 6, 4, 64, 1e4)
    with pytest.raises(RuntimeError, match="cudaError 1"):  # several splits without a workspace
        kern.decoder_decode(buf, buf, buf, buf, buf, buf, s, s, s, s, buf, 0, 1, 4, 4, 256, 1e4, num_splits=2)


def test_emulator_catches_wrong_fragment_layouts(emulator_lib):
    """The emulator must be able to fail: a launch whose arguments break the kernel's assumptions
    (q/k/v strides swapped head<->token: valid memory, wrong matrices) gives wrong results."""
    kern = L.DirectKernels(L.EmulatorLauncher(emulator_lib))
    rng = _rng(3)
    q, k, v = (_f16(rng, 1, 40, 2, 64) for _ in range(3))
    m = kern.memory
    dq, dk, dv = (m.to_device(x) for x in (q, k, v))
    do = m.empty(q.size * 2)
    good, bad = (40 * 128, 64, 128), (40 * 128, 128, 64)
    kern.vit_attention(dq, dk, dv, do, good, bad, good, good, 1, 2, 40)
    out = m.to_host(do, q.shape, np.float16).astype(np.float64)
    assert np.abs(out - ref.vit_attention(q, k, v)).max() > 0.05


# ---- GPU: every launcher and the C library, real shapes

def _gpu_count() -> int:
    try:
        drv, _ = KB._bindings()
        if int(drv.cuInit(0)[0]) == 0:
            return int(drv.cuDeviceGetCount()[1])
    except Exception:
        pass
    for probe in ("torch", "cupy"):
        try:
            if probe == "torch":
                import torch
                return torch.cuda.device_count()
            import cupy
            return cupy.cuda.runtime.getDeviceCount()
        except Exception:
            continue
    return 0


_GPU_SKIP = "no CUDA GPU on this machine (GPU tests run on a GPU box: kernels/gpu_check.sh)"


def _gpu_kernels(kind: str):
    if _gpu_count() == 0:
        pytest.skip(_GPU_SKIP)
    try:
        if kind == "cuda-python":
            return L.DirectKernels(L.CudaPythonLauncher())
        launcher = L.default_launcher()  # its memory API serves the C library's device pointers
        return L.CLibKernels(L.CLibrary(KB.build_library((launcher.arch,))), launcher.memory, launcher.num_sms)
    except KB.BackendUnavailable as e:
        pytest.skip(f"{kind}: {e}")


@pytest.mark.parametrize("kind", ["cuda-python", "c-library"])
def test_kernels_on_gpu(kind):
    kern = _gpu_kernels(kind)
    try:
        run_battery(kern, big=True)
    finally:
        kern.memory.free_all()


def test_gpu_decode_workspace_survives_repeated_calls():
    """Tickets are reset by the last CTA: a second decode with the same workspace is still right."""
    kern = _gpu_kernels("cuda-python")
    rng = _rng(11)
    b, h, hkv, max_len = 1, 16, 16, 1024
    m = kern.memory
    q, k, v = _f16(rng, b, h, 128), _f16(rng, b, hkv, 128), _f16(rng, b, hkv, 128)
    kc = _f16(rng, b, hkv, max_len, 128)
    dq, dk, dv, dkc, dvc = (m.to_device(x) for x in (q, k, v, kc, kc))
    dl = m.to_device(np.array([500], np.int32))
    do = m.empty(q.size * 2)
    ws = m.zeros(L.decode_workspace_bytes(b, h, hkv, 9))
    s = (h * 128, 128, 0)
    for _ in range(3):
        kern.decoder_decode(dq, dk, dv, dkc, dvc, do, s, s, s, s, dl, 0, b, h, hkv, max_len, 1e4, None, 9, ws)
    want, *_ = ref.decoder_decode(q, k, v, kc, kc, np.array([500]), 1e4)
    _close(m.to_host(do, q.shape, np.float16), want, "decode x3")
    m.free_all()
