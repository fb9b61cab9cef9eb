"""bench/sd.py runs end to end on the tiniest settings and prints its table (its figures are measured by hand and
written in the README, not asserted: they depend on the machine and its load)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sd.py"
VARIANTS = ["vanilla pipe()", "vanilla pipe() + PNGs", "sdpipe generate_items", "sdpipe generate"]


def test_bench_prints_table_overhead_and_memory(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    cmd = [sys.executable, str(BENCH), "--arch", "dummy", "--n", "1", "--steps", "2", "--size", "32"]
    cmd += ["--repeats", "2", "--threads", "1", "--json", str(out)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    text = done.stdout
    assert "ms/image" in text and "peak MiB" in text and text.startswith("load average")
    for v in VARIANTS:
        assert any(line.startswith(v) for line in text.splitlines()), v
    assert "overhead of sdpipe generate vs vanilla pipe() + PNGs:" in text and "2 paired rounds" in text
    result = json.loads(out.read_text())["results"][0]
    assert result["arch"] == "dummy" and result["max_abs_diff_vs_vanilla"] < 1e-3  # the same images both ways
    for v in VARIANTS:
        row = result["variants"][v]
        assert len(row["s_per_image"]) == 2 and row["s_per_image_min"] > 0
        assert all(math.isfinite(p) for p in row["peak_mib"])
    assert len(result["overhead_percent"]["sdpipe generate vs vanilla pipe() + PNGs"]["values"]) == 2
