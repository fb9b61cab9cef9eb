"""Benchmark of `sdpipe data validate`: files/s and peak memory (RSS) as the number of files grows.

    python bench/ingest.py                      # 20,000 small PNGs
    python bench/ingest.py --n 10000 --n 100000 # memory growth from 10k to 100k files
    python bench/ingest.py --workers 1 --workers 2

Makes N random 32x32 RGB PNGs (100 per folder, 10 class folders) in a temporary folder, then validates them
in a fresh process per run, so each run's peak RSS (ru_maxrss) is its own. Prints one line per run and,
for several N, the growth of peak RSS from the smallest to the largest.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def make_pngs(root: Path, n: int, size: int = 32) -> None:
    """n random PNGs under root/class_k/bucket_j/, written once and reused (a marker file says how many)."""
    marker = root / ".count"
    if marker.exists() and int(marker.read_text()) == n:
        return
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / f"class_{i % 10}" / f"bucket_{i // 1000:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
        (folder / f"{i:07d}.png").write_bytes(buf.getvalue())
    marker.write_text(str(n))


def run_once(source: Path, out: Path, workers: int | None) -> dict:
    """Validate in this process and report speed and this process's peak RSS."""
    from sdpipe.config import DataConfig
    from sdpipe.data.validate import validate

    start = time.perf_counter()
    report = validate(str(source), out, DataConfig(source="folder", workers=workers))
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "files": report["files_seen"],
        "accepted": report["accepted"],
        "seconds": round(seconds, 2),
        "files_per_s": round(report["files_seen"] / seconds, 1),
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "workers": workers or os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, action="append", help="number of PNGs (repeat for several runs)")
    parser.add_argument("--workers", type=int, action="append", help="decode threads (default: one per core)")
    parser.add_argument("--dir", type=Path, default=None, help="where to make the PNGs (default: a temp folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        source, out, workers = args.child
        print(json.dumps(run_once(Path(source), Path(out), int(workers) or None)))
        return
    sizes = args.n or [20_000]
    workers = args.workers or [0]
    base = args.dir or Path(tempfile.mkdtemp(prefix="sdpipe_ingest_"))
    print(f"cores: {os.cpu_count()}, files under {base}")
    results = []
    for n in sizes:
        t = time.perf_counter()
        make_pngs(base / f"pngs_{n}", n)
        print(f"made {n} PNGs in {time.perf_counter() - t:.1f} s")
        for w in workers:
            cmd = [sys.executable, __file__, "--child", str(base / f"pngs_{n}"), str(base / f"out_{n}_{w}"), str(w)]
            result = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
            results.append(result)
            print(
                f"validate {result['files']:>7} files  workers {result['workers']}  {result['seconds']:>7.1f} s  "
                f"{result['files_per_s']:>7.0f} files/s  peak RSS {result['peak_rss_mib']:.0f} MiB"
            )
    if len(sizes) > 1:
        small = min(results, key=lambda r: r["files"])
        large = max(results, key=lambda r: r["files"])
        growth = large["peak_rss_mib"] / small["peak_rss_mib"] - 1
        print(f"peak RSS {small['files']} -> {large['files']} files: {growth:+.1%}")


if __name__ == "__main__":
    main()
