"""A short run of benchmarks/bench_attention.py: every method at two small token counts, memory measured in
its child process, the JSON keys the targets are read from. Ratios are not asserted (noisy machines)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_attention.py"
ROW_KEYS = {"method", "tokens", "ms", "peak_bytes", "speedup_vs_sdpa", "memory_vs_sdpa", "memory_vs_unfused"}


def test_short_run_reports_every_method(tmp_path: Path) -> None:
    plot = tmp_path / "attention.png"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--tokens", "64,256", "--repeat", "1", "--features", "32",
         "--linformer-k", "16", "--no-e2e", "--plot", str(plot), "--json"],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout)
    methods = {r["method"] for r in out["rows"]}
    assert methods == {"sdpa", "unfused", "performer", "elu", "linformer", "window", "int8"}
    for row in out["rows"]:
        assert row.keys() >= ROW_KEYS, row
        assert row["ms"] > 0 and row["peak_bytes"] >= 0
    assert set(out["crossover"]) == methods - {"sdpa"}
    # unfused attention at 256 tokens holds 12 x 256^2 fp32 scores (3 MiB) at least
    unfused = next(r for r in out["rows"] if r["method"] == "unfused" and r["tokens"] == 256)
    assert unfused["peak_bytes"] >= 12 * 256 * 256 * 4
    assert plot.stat().st_size > 0
