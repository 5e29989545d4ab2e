"""Micro-benchmark of the molmo-edge kernels against torch's scaled_dot_product_attention (flash
backend) at Molmo's shapes, plus a correctness check of every timed configuration. Writes one
JSON. Used by gpu_check.sh; needs a CUDA GPU and torch (tensors, events, CUDA graphs), and one
of cuda-python or nvcc (the C library) to launch the kernels.

Timing: each call is captured N times in a CUDA graph and the graph replayed (median of several
replays), so host launch overhead does not pollute kernel times of a few microseconds. Our
launches go to torch's current stream through the chosen launcher.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable


# Nominal DRAM bandwidth (GB/s) by device name, for the decode target; the measured copy
# bandwidth is reported next to it.
NOMINAL_BW = [("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350), ("GH200", 4000),
              ("A100-SXM4-80GB", 2039), ("A100 80GB PCIe", 1935), ("A100", 1555), ("L40S", 864), ("L4", 300),
              ("Orin", 204.8), ("Thor", 273)]


def _kernels(torch: Any) -> tuple[Any, str]:
    from molmo_edge.kernels import build as KB
    from molmo_edge.kernels import launch as L
    errors = []
    for make in (lambda: L.CudaPythonLauncher(torch.cuda.current_device()),):
        try:
            launcher = make()
            return L.DirectKernels(launcher), launcher.name
        except Exception as e:  # noqa: BLE001 - try the next launcher
            errors.append(f"{type(e).__name__}: {e}")
    try:
        lib = L.CLibrary(KB.build_library((torch.cuda.get_device_capability()[0] * 10
                                          + torch.cuda.get_device_capability()[1],)))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        return L.CLibKernels(lib, None, sms), "c-library"  # type: ignore[arg-type]
    except Exception as e:  # noqa: BLE001
        errors.append(f"{type(e).__name__}: {e}")
    raise RuntimeError("no way to launch the kernels: " + " | ".join(errors))


def _time(torch: Any, fn: Callable[[], None], iters: int = 20, reps: int = 7) -> tuple[float, str]:
    """Median microseconds per call; CUDA graph of `iters` calls when capture works, else eager."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(iters):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / iters)
        return statistics.median(times), "cuda-graph"
    except Exception:  # noqa: BLE001 - e.g. a launcher bound to the legacy default stream
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            start.record()
            for _ in range(iters):
                fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1000 / iters)
        return statistics.median(times), "eager"


def _stream(torch: Any) -> int:
    return torch.cuda.current_stream().cuda_stream


def _flash(torch: Any):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _copy_bandwidth(torch: Any) -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    us, _ = _time(torch, lambda: b.copy_(a), iters=5, reps=5)
    return 2 * a.numel() / (us * 1e-6) / 1e9


def _strides(t: Any) -> tuple[int, int, int]:
    """(batch, head, token) element strides of a [B, T, H, D] tensor."""
    return (t.stride(0), t.stride(2), t.stride(1))


def bench_vit(torch, kern, n_crops: int) -> dict:
    F = torch.nn.functional
    s, h, d = 577, 16, 64
    q, k, v = (torch.randn(n_crops, s, h, d, device="cuda", dtype=torch.float16) for _ in range(3))
    out = torch.empty_like(q)
    st = _strides(q)
    ours = lambda: kern.vit_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), st, st, st, st,  # noqa: E731
                                      n_crops, h, s, None, _stream(torch))
    qt, kt, vt = (x.transpose(1, 2) for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float()).transpose(1, 2)  # fp32: not flash
    with _flash(torch):
        theirs = lambda: F.scaled_dot_product_attention(qt, kt, vt)  # noqa: E731
        ours()
        torch.cuda.synchronize()
        t_ours, how = _time(torch, ours)
        t_flash, _ = _time(torch, theirs)
    flops = 4 * n_crops * h * s * s * d
    return dict(shape=f"{n_crops}x{s}x{h}x{d}", ours_us=t_ours, flash_us=t_flash, timing=how,
                ours_tflops=flops / t_ours / 1e6, flash_tflops=flops / t_flash / 1e6,
                throughput_vs_flash=t_flash / t_ours, max_abs_err=float((out.float() - ref).abs().max()))


def bench_pool(torch, kern, n_crops: int) -> dict:
    F = torch.nn.functional
    gh = gw = 24
    h, d = 16, 64
    q, k, v = (torch.randn(n_crops, gh * gw, h, d, device="cuda", dtype=torch.float16) for _ in range(3))
    w = (gh // 2) * (gw // 2)
    out = torch.empty(n_crops, w, h, d, device="cuda", dtype=torch.float16)
    ours = lambda: kern.attention_pool(q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), _strides(q),  # noqa: E731
                                       _strides(k), _strides(v), _strides(out), n_crops, h, gh, gw, False, None,
                                       _stream(torch))
    idx = torch.tensor(__import__("molmo_edge.kernels.reference", fromlist=["x"]).pool_windows(gh, gw), device="cuda")
    kw, vw = (x[:, idx].permute(0, 1, 3, 2, 4).reshape(n_crops * w, h, 4, d) for x in (k, v))  # [NW, h, 4, d]
    qw = q[:, idx].mean(2).reshape(n_crops * w, h, 1, d)
    ref = F.scaled_dot_product_attention(q[:, idx].float().mean(2).reshape(n_crops * w, h, 1, d), kw.float(),
                                         vw.float()).reshape(n_crops, w, h, d)
    with _flash(torch):
        theirs = lambda: F.scaled_dot_product_attention(qw, kw, vw)  # noqa: E731
        ours()
        torch.cuda.synchronize()
        t_ours, how = _time(torch, ours)
        t_flash, _ = _time(torch, theirs)
    nbytes = (3 * q.numel() + out.numel()) * 2
    return dict(shape=f"{n_crops}x{gh}x{gw}x{h}x{d}", ours_us=t_ours, flash_us=t_flash, timing=how,
                ours_gbps=nbytes / t_ours / 1e3, flash_note="flash on pre-gathered windows (gather not timed)",
                max_abs_err=float((out.float() - ref).abs().max()))


def _rope_torch(torch, x, pos, theta):
    """x [B, T, H, D] fp16, positions [B, T] -> RoPE'd fp16 (export/model.py apply_rope)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d))
    f = pos.float()[..., None] * inv
    emb = torch.cat([f, f], -1)[:, :, None]
    xf = x.float()
    rot = torch.cat([-xf[..., d // 2:], xf[..., : d // 2]], -1)
    return (xf * emb.cos() + rot * emb.sin()).half()


def bench_prefill(torch, kern, name: str, heads: int, kv_heads: int, seq: int, theta: float) -> dict:
    F = torch.nn.functional
    b, d = 1, 128
    max_len = 4096
    q = torch.randn(b, seq, heads, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(b, seq, kv_heads, d, device="cuda", dtype=torch.float16) for _ in range(2))
    kc, vc = (torch.zeros(b, kv_heads, max_len, d, device="cuda", dtype=torch.float16) for _ in range(2))
    lens = torch.zeros(b, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    ours = lambda: kern.decoder_prefill(q.data_ptr(), k.data_ptr(), v.data_ptr(), kc.data_ptr(), vc.data_ptr(),  # noqa: E731
                                        out.data_ptr(), _strides(q), _strides(k), _strides(v), _strides(out),
                                        lens.data_ptr(), 0, b, heads, kv_heads, seq, max_len, theta, None,
                                        _stream(torch))
    pos = torch.arange(seq, device="cuda")[None]
    qr, kr = _rope_torch(torch, q, pos, theta), _rope_torch(torch, k, pos, theta)
    rep = heads // kv_heads
    qt = qr.transpose(1, 2)
    kt = kr.transpose(1, 2).repeat_interleave(rep, 1).contiguous()
    vt = v.transpose(1, 2).repeat_interleave(rep, 1).contiguous()
    ref = F.scaled_dot_product_attention(qt.float(), kt.float(), vt.float(), is_causal=True).transpose(1, 2)
    with _flash(torch):
        theirs = lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)  # noqa: E731
        ours()
        torch.cuda.synchronize()
        err = float((out.float() - ref).abs().max())
        kerr = float((kc[:, :, :seq].float() - kr.transpose(1, 2).float()).abs().max())
        t_ours, how = _time(torch, ours)
        t_flash, _ = _time(torch, theirs)
    flops = 2 * b * heads * seq * seq * d  # causal: half of 4*S^2*D
    return dict(model=name, shape=f"b{b} t{seq} h{heads}/{kv_heads}", ours_us=t_ours, flash_us=t_flash, timing=how,
                ours_tflops=flops / t_ours / 1e6, throughput_vs_flash=t_flash / t_ours,
                note="ours includes RoPE of q/k and the cache append; flash gets pre-RoPE'd, GQA-expanded inputs",
                max_abs_err=err, cache_max_abs_err=kerr)


def bench_decode(torch, kern, name: str, batch: int, heads: int, kv_heads: int, ctx: int, theta: float,
                 peak_gbps: float, copy_gbps: float) -> dict:
    from molmo_edge.kernels import launch as L
    F = torch.nn.functional
    d, max_len = 128, ctx
    q = torch.randn(batch, heads, d, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(batch, kv_heads, d, device="cuda", dtype=torch.float16) for _ in range(2))
    kc, vc = (torch.randn(batch, kv_heads, max_len, d, device="cuda", dtype=torch.float16) for _ in range(2))
    lens = torch.full((batch,), ctx - 1, dtype=torch.int32, device="cuda")
    out = torch.empty_like(q)
    splits = L.decode_default_splits(batch, heads, kv_heads, ctx, kern.num_sms)
    ws = torch.zeros(max(L.decode_workspace_bytes(batch, heads, kv_heads, splits), 16), dtype=torch.uint8,
                     device="cuda")
    sq, skv = (heads * d, d, 0), (kv_heads * d, d, 0)
    ours = lambda: kern.decoder_decode(q.data_ptr(), k.data_ptr(), v.data_ptr(), kc.data_ptr(), vc.data_ptr(),  # noqa: E731
                                       out.data_ptr(), sq, skv, skv, sq, lens.data_ptr(), 0, batch, heads, kv_heads,
                                       max_len, theta, None, splits, ws.data_ptr(), _stream(torch))
    ours()
    torch.cuda.synchronize()
    pos = lens.long()[:, None]
    qr = _rope_torch(torch, q[:, None], pos, theta)[:, 0]
    rep = heads // kv_heads
    kt, vt = kc.repeat_interleave(rep, 1), vc.repeat_interleave(rep, 1)
    ref = F.scaled_dot_product_attention(qr[:, :, None].float(), kt.float(), vt.float())[:, :, 0]
    err = float((out.float() - ref).abs().max())
    t_ours, how = _time(torch, ours, iters=50)
    res = dict(model=name, shape=f"b{batch} h{heads}/{kv_heads} ctx{ctx}", splits=splits, ours_us=t_ours,
               timing=how, max_abs_err=err)
    nbytes = 2 * batch * kv_heads * ctx * d * 2
    res.update(cache_bytes=nbytes, ours_gbps=nbytes / t_ours / 1e3,
               fraction_of_nominal_peak=nbytes / t_ours / 1e3 / peak_gbps if peak_gbps else None,
               fraction_of_measured_copy=nbytes / t_ours / 1e3 / copy_gbps)
    if heads == kv_heads:
        with _flash(torch):
            qf = qr[:, :, None]
            t_flash, _ = _time(torch, lambda: F.scaled_dot_product_attention(qf, kc, vc), iters=50)
        res.update(flash_us=t_flash, flash_gbps=nbytes / t_flash / 1e3)
    return res


def _pytest_summary(log: str | None, rc: int | None, junit: str | None) -> dict:
    out: dict[str, Any] = {"rc": rc}
    if log and Path(log).exists():
        text = Path(log).read_text(errors="replace")
        lines = [l for l in text.splitlines() if l.strip()]
        out["summary"] = lines[-1] if lines else ""
        out["failed"] = re.findall(r"^FAILED (\S+)", text, re.M)[:50]
        out["skipped"] = re.findall(r"^SKIPPED .*$", text, re.M)[:50]
        out["tail"] = "\n".join(lines[-60:])
    if junit and Path(junit).exists():
        j = Path(junit).read_text(errors="replace")
        m = re.search(r'tests="(\d+)".*?failures="(\d+)"|failures="(\d+)".*?tests="(\d+)"', j)
        out["junit"] = m.group(0) if m else None
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_check.json"))
    ap.add_argument("--pytest-log")
    ap.add_argument("--pytest-rc", type=int)
    ap.add_argument("--junit")
    ap.add_argument("--quick", action="store_true", help="fewer configurations")
    args = ap.parse_args(argv)
    t0 = time.time()
    result: dict[str, Any] = {"host": platform.node(), "python": sys.version.split()[0],
                              "pytest": _pytest_summary(args.pytest_log, args.pytest_rc, args.junit)}
    benches: dict[str, list] = {"vit": [], "pool": [], "prefill": [], "decode": []}
    errors: list[str] = []
    try:
        import torch
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        torch.manual_seed(0)
        props = torch.cuda.get_device_properties(0)
        kern, launcher = _kernels(torch)
        peak = next((bw for key, bw in NOMINAL_BW if key in props.name), 0.0)
        copy_gbps = _copy_bandwidth(torch)
        result["device"] = dict(name=props.name, capability=list(torch.cuda.get_device_capability()),
                                sms=props.multi_processor_count, torch=torch.__version__, launcher=launcher,
                                nominal_bw_gbps=peak, measured_copy_bw_gbps=copy_gbps)
        plan: list[tuple[str, Callable[[], dict]]] = [
            ("vit", lambda: bench_vit(torch, kern, 7)), ("vit", lambda: bench_vit(torch, kern, 13)),
            ("pool", lambda: bench_pool(torch, kern, 7)),
            ("prefill", lambda: bench_prefill(torch, kern, "MolmoE-1B", 16, 16, 750, 1e4)),
            ("prefill", lambda: bench_prefill(torch, kern, "Molmo-7B-D", 28, 4, 750, 1e6)),
            ("decode", lambda: bench_decode(torch, kern, "MolmoE-1B", 1, 16, 16, 4096, 1e4, peak, copy_gbps)),
            ("decode", lambda: bench_decode(torch, kern, "Molmo-7B-D", 1, 28, 4, 4096, 1e6, peak, copy_gbps)),
            ("decode", lambda: bench_decode(torch, kern, "Molmo-72B", 1, 64, 8, 4096, 1e6, peak, copy_gbps)),
        ]
        if not args.quick:
            plan += [("vit", lambda: bench_vit(torch, kern, 1)),
                     ("prefill", lambda: bench_prefill(torch, kern, "MolmoE-1B", 16, 16, 2048, 1e4)),
                     ("decode", lambda: bench_decode(torch, kern, "MolmoE-1B", 4, 16, 16, 4096, 1e4, peak, copy_gbps)),
                     ("decode", lambda: bench_decode(torch, kern, "MolmoE-1B", 1, 16, 16, 1024, 1e4, peak, copy_gbps))]
        for kind, fn in plan:
            try:
                benches[kind].append(fn())
            except Exception as e:  # noqa: BLE001 - keep the other measurements
                errors.append(f"{kind}: {type(e).__name__}: {e}\n{traceback.format_exc(limit=3)}")
    except Exception as e:  # noqa: BLE001
        errors.append(f"setup: {type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}")
    result["benchmarks"] = benches

    def first(kind, pred):
        return next((r for r in benches[kind] if pred(r)), None)

    vit = first("vit", lambda r: r["shape"].startswith("7x"))
    dec = first("decode", lambda r: r["model"] == "MolmoE-1B" and "b1 " in r["shape"] and "ctx4096" in r["shape"])
    tol = 2e-2
    result["targets"] = {
        "vit_throughput_vs_flash": dict(target=0.70, value=vit and vit["throughput_vs_flash"],
                                        met=bool(vit and vit["throughput_vs_flash"] >= 0.70)),
        "decode_4k_fraction_of_peak_bw": dict(
            target=0.60, value=dec and (dec["fraction_of_nominal_peak"] or dec["fraction_of_measured_copy"]),
            basis="nominal" if dec and dec["fraction_of_nominal_peak"] else "measured copy",
            met=bool(dec and (dec["fraction_of_nominal_peak"] or dec["fraction_of_measured_copy"]) >= 0.60)),
        "all_outputs_within_tolerance": dict(
            tolerance=tol, met=all(r.get("max_abs_err", 1) < tol for rs in benches.values() for r in rs)
            and any(benches.values())),
    }
    result["errors"] = errors
    result["elapsed_s"] = round(time.time() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=lambda o: None if isinstance(o, float) and math.isnan(o) else str(o)))
    print(json.dumps(result["targets"], indent=2))
    print(f"wrote {out}")
    return 0 if not errors else 1


if __name__ == "__main__":
    sys.exit(main())
