"""Time Molmo image preprocessing (molmo_edge.runtime.preprocess.preprocess_image) on one core.

    python benchmarks/bench_preprocess.py [--runs 50] [--size 640x480] [--max-crops N] [--config FOLDER]

Single-threaded on purpose: OMP/OPENBLAS/MKL thread counts are set to 1 before numpy loads (the
resizer's matmuls are kept below OpenBLAS's threading threshold anyway) and cv2.setNumThreads(1).
Reports the median (and min / p90) of --runs calls after --warmup calls, on a random frame.

On Linux/glibc, every call's fresh multi-MB arrays can come back from the kernel as new pages; on
VMs those page faults can cost as much as the arithmetic. --no-page-faults raises glibc's mmap/trim
thresholds (mallopt) so freed memory is reused, to show the compute-only time.
"""
from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402


def _config(folder: str | None):
    from molmo_edge.runtime.config import MolmoConfig, load_config
    if folder:
        return load_config(folder)
    golden = Path(os.environ.get("MOLMO_GOLDEN", Path(__file__).resolve().parents[2] / "shared" / "golden"))
    if (golden / "molmoe-tiny" / "config.json").exists():
        return load_config(str(golden / "molmoe-tiny"))
    # preprocessing only needs the vision/preprocess sections and the vocabulary size (MolmoE-1B's)
    return MolmoConfig(layout="molmoe", d_model=2048, n_heads=16, n_kv_heads=16, n_layers=16, head_dim=128,
                       ffn_hidden=2048, vocab_size=50280, embedding_size=50304, moe_num_experts=64, moe_top_k=8)


def _no_page_faults() -> bool:
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 512 << 20) and libc.mallopt(-1, 1 << 30))  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50, help="timed calls (default 50)")
    ap.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    ap.add_argument("--size", default="640x480", help="frame WIDTHxHEIGHT (default 640x480)")
    ap.add_argument("--max-crops", type=int, default=None, help="override max_crops (default: the config's, 12)")
    ap.add_argument("--config", default=None, help="checkpoint folder for the config (default: golden molmoe-tiny)")
    ap.add_argument("--no-page-faults", action="store_true", help="tune glibc malloc so buffers are reused (Linux)")
    a = ap.parse_args(argv)

    try:
        import cv2
        cv2.setNumThreads(1)
        cv_note = f"cv2 {cv2.__version__} threads=1"
    except ImportError:
        cv_note = "cv2 not installed"
    if a.no_page_faults and not _no_page_faults():
        print("note: could not tune malloc (not glibc); timing with the default allocator", file=sys.stderr)

    from molmo_edge.runtime.preprocess import preprocess_image

    w, h = (int(v) for v in a.size.lower().split("x"))
    cfg = _config(a.config)
    frame = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    for _ in range(max(a.warmup, 1)):
        crops = preprocess_image(frame, cfg, max_crops=a.max_crops)
    times = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        preprocess_image(frame, cfg, max_crops=a.max_crops)
        times.append((time.perf_counter() - t0) * 1e3)
    t = np.array(times)
    threads = ", ".join(f"{v}={os.environ.get(v)}" for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"))
    print(f"preprocess_image {w}x{h}: tiling {crops.tiling[0]}x{crops.tiling[1]}, {crops.n_crops} crops, "
          f"{crops.n_image_tokens} image tokens")
    print(f"  median {np.median(t):.2f} ms  (min {t.min():.2f}, p90 {np.percentile(t, 90):.2f}) over {a.runs} runs; "
          f"single thread ({threads}; {cv_note}){'; malloc tuned' if a.no_page_faults else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
