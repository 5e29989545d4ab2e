"""Peak memory of `molmo-edge export` on full-width MolmoE-1B checkpoints with fewer layers, to show
that export streams weights (peak does not grow with depth) and extrapolate to all 16 layers.

    python benchmarks/bench_export_memory.py --layers 1 2 --workdir /tmp/molmo-bench

Each export runs in its own process (weights only, `--no-check`); its peak RSS comes from
getrusage. The self-check is measured separately since it holds both models.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def peak_rss_of(cmd: list[str]) -> tuple[float, float]:
    """(peak RSS GiB, seconds) of a child process."""
    t = time.perf_counter()
    pid = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).pid
    _, status, usage = os.wait4(pid, 0)
    if status != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with status {status}")
    return usage.ru_maxrss / 2**20, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--workdir", default="/tmp/molmo-bench")
    ap.add_argument("--with-check", action="store_true", help="also measure an export with its self-check")
    a = ap.parse_args()
    from molmo_edge.export.synthetic import make_random_checkpoint
    from molmo_edge.runtime.config import load_config
    from molmo_edge.runtime.weights import parameter_count

    rows = []
    for n in a.layers:
        ck = os.path.join(a.workdir, f"molmoe-1b-full-{n}L")
        if not os.path.exists(os.path.join(ck, "config.json")):
            make_random_checkpoint(ck, "molmoe-1b", size="full", n_layers=n, vocab_size=50280)
        cfg = load_config(ck)
        out = os.path.join(a.workdir, f"mem-{n}L.bundle")
        base = [sys.executable, "-m", "molmo_edge.runtime.cli", "export", ck, "-o", out, "--force"]
        rss, secs = peak_rss_of(base + ["--no-check"])
        row = {"layers": n, "weights_gb": parameter_count(cfg)["total"] * 4 / 1e9, "peak_rss_gib": round(rss, 2),
               "seconds": round(secs, 1)}
        if a.with_check:
            rss_c, secs_c = peak_rss_of(base)
            row.update(peak_rss_with_check_gib=round(rss_c, 2), seconds_with_check=round(secs_c, 1))
        rows.append(row)
        print(json.dumps(row), flush=True)
    if len(rows) >= 2:
        per_layer = (rows[-1]["peak_rss_gib"] - rows[0]["peak_rss_gib"]) / (rows[-1]["layers"] - rows[0]["layers"])
        full = rows[-1]["peak_rss_gib"] + per_layer * (16 - rows[-1]["layers"])
        print(json.dumps({"peak_growth_gib_per_layer": round(per_layer, 3), "extrapolated_16_layers_gib": round(full, 2),
                          "full_weights_gb": 28.9}))


if __name__ == "__main__":
    main()
