"""A short run of the load test (benchmarks/bench_serve.py) on real CIFAR-10 images: it starts the service on
loopback, loads it, overloads it, checks the cache, stops it, and reports every key the targets are read from.
Ratios are not asserted here (shared machines are noisy); the benchmark itself is where they are read."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_serve.py"
KEYS = {
    "offline_images_per_s",
    "served_images_per_s",
    "throughput_ratio",
    "serial_images_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "realtime_p95_ms",
    "unloaded_p50_ms",
    "errors",
    "errors_by_code",
    "rejected",
    "busy_fraction",
    "peak_rss_bytes",
}


def test_a_short_load_test_reports_every_key_and_stops_by_itself() -> None:
    args = ["--model", "cifar-vit", "--requests", "120", "--serial", "5", "--max-batch", "8"]
    args += ["--overload", "--overload-requests", "400", "--repeat", "3", "--max-seconds", "60", "--json"]
    done = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout)
    assert set(out) >= KEYS
    assert out["max_batch"] == 8 and out["saturated"] and out["concurrency"] == 16
    assert out["errors"] == 0 and out["answered"] == 120 and out["exit_code"] == 0
    assert 0 < out["busy_fraction"] <= 1.05 and out["peak_rss_bytes"] > 0
    assert out["realtime_p95_ms"] > 0 and out["offline_images_per_s"] > 0
    over = out["overload"]
    assert over["errors"] == 0 and over["requests"] == 400 and over["answered"] + over["rejected"] == 400
    assert over["retry_after_ok"] and over["queue_bound"] == 8
    assert out["cache"]["images"] == 3 and out["cache"]["hit_p50_ms"] < out["cache"]["miss_p50_ms"]
