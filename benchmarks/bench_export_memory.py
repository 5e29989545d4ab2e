"""Peak memory of `molmo-edge export` on full-width MolmoE-1B checkpoints with fewer layers, to show
that export streams weights (peak does not grow with depth) and extrapolate to all 16 layers.

    python benchmarks/bench_export_memory.py --layers 1 2 --workdir /tmp/molmo-bench

Each export runs in its own process (weights only, `--no-check`). Its anonymous memory (RssAnon:
what must fit in RAM) is sampled every 20 ms; file-backed pages of the memory-mapped checkpoint and
of the files being written are page cache the kernel can drop, so they are reported apart
(peak VmHWM from getrusage includes them). The self-check is measured separately.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def _anon_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))
    except (OSError, StopIteration):
        return 0


def peak_rss_of(cmd: list[str]) -> tuple[float, float, float]:
    """(peak anonymous GiB, peak RSS incl. file pages GiB, seconds) of a child process."""
    t = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    anon = 0
    while True:
        done, status, usage = os.wait4(pid, os.WNOHANG)
        if done:
            break
        anon = max(anon, _anon_kib(pid))
        time.sleep(0.02)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return anon / 2**20, usage.ru_maxrss / 2**20, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", default="/tmp/molmo-bench")
    ap.add_argument("--with-check", action="store_true", help="also measure an export with its self-check")
    a = ap.parse_args()
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.config import load_config
    from molmo_edge.runtime.hf_names import parameter_count

    rows = []
    for n in a.layers:
        ck = os.path.join(a.workdir, f"molmoe-1b-full-{n}L")
        if not os.path.exists(os.path.join(ck, "config.json")):
            make_random_checkpoint(ck, "molmoe-1b", size="full", n_layers=n, vocab_size=50280)
        cfg = load_config(ck)
        out = os.path.join(a.workdir, f"mem-{n}L.bundle")
        base = [sys.executable, "-m", "molmo_edge.runtime.cli", "export", ck, "-o", out, "--force"]
        anon, rss, secs = peak_rss_of(base + ["--no-check"])
        row = {"layers": n, "weights_gb": round(parameter_count(cfg)["total"] * 4 / 1e9, 2), "peak_anon_gib": round(anon, 2),
               "peak_rss_incl_file_pages_gib": round(rss, 2), "seconds": round(secs, 1)}
        if a.with_check:
            anon_c, rss_c, secs_c = peak_rss_of(base)
            row.update(peak_anon_with_check_gib=round(anon_c, 2), seconds_with_check=round(secs_c, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        per_layer = (rows[-1]["peak_anon_gib"] - rows[0]["peak_anon_gib"]) / (rows[-1]["layers"] - rows[0]["layers"])
        full = rows[-1]["peak_anon_gib"] + per_layer * (16 - rows[-1]["layers"])
        print(json.dumps({"peak_growth_gib_per_layer": round(per_layer, 3), "extrapolated_16_layers_gib": round(full, 2),
                          "full_weights_gb": 28.9}))


if __name__ == "__main__":
    main()
