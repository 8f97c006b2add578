"""Feature cache: eviction-policy hit rates on replayed traces, and per-tier hit latency.

Usage: python benchmarks/bench_cache.py [--skip-redis]

1. Replays three traces (a looping video, a Zipf image workload, a scan through a hot set) through stores of
   a fixed capacity under plain LRU, LFU and the importance-weighted LRU-2 (with and without predictive
   prefetch from a backing tier) and prints the hit rates, all from the same run.
2. Times cache hits of one 197x768 feature (ViT-B/16) stored as fp16: memory tier, disk tier, and Redis on
   loopback (a redis-server started here on a free port), as p50/p99 over many reads.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np

from vitedge.cache.keys import content_digest
from vitedge.cache.policy import SequencePredictor, make_policy
from vitedge.cache.replay import loop_trace, replay, scan_trace, zipf_trace
from vitedge.cache.store import CacheConfig, FeatureCache

NS = "e" * 64


def policy_table() -> None:
    traces = {
        "looping video (300 frames x 5, cache 100)": (loop_trace(300, 5), 100),
        "Zipf images (alpha 0.9, 5000 ids, cache 300)": (zipf_trace(5000, 50_000, alpha=0.9), 300),
        "scan through hot set (200 hot, cache 250)": (scan_trace(200, 50_000), 250),
    }
    cols = ["lru", "lfu", "importance", "importance+prefetch"]
    print(f"{'trace':48s}" + "".join(f"{c:>22s}" for c in cols))
    for name, (trace, cap) in traces.items():
        rates = [replay(make_policy(p), trace, capacity=cap).hit_rate for p in cols[:3]]
        rates.append(
            replay(make_policy("importance"), trace, capacity=cap, predictor=SequencePredictor()).hit_rate
        )
        print(f"{name:48s}" + "".join(f"{r:22.3f}" for r in rates))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _latency(cache: FeatureCache, keys: list[str], rounds: int) -> tuple[float, float]:
    times = []
    for r in range(rounds):
        k = keys[r % len(keys)]
        t0 = time.perf_counter()
        got = cache.get(NS, k)
        times.append((time.perf_counter() - t0) * 1e3)
        assert got is not None
    return float(np.percentile(times, 50)), float(np.percentile(times, 99))


def tier_latency(skip_redis: bool) -> None:
    feats = np.random.default_rng(0).standard_normal((197, 768)).astype(np.float32)
    keys = [content_digest(np.array([i])) for i in range(20)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "memory": CacheConfig(tiers=("memory",), prefetch_depth=0),
            "disk": CacheConfig(tiers=("disk",), disk_dir=str(Path(tmp) / "d")),
        }
        proc = None
        if not skip_redis and shutil.which("redis-server"):
            port = _free_port()
            proc = subprocess.Popen(
                ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp],
                stdout=subprocess.DEVNULL,
            )
            time.sleep(0.5)
            configs["redis"] = CacheConfig(tiers=("redis",), redis_url=f"redis://127.0.0.1:{port}/0")
        try:
            for name, cfg in configs.items():
                with FeatureCache(cfg) as cache:
                    for k in keys:
                        cache.put(NS, k, feats)
                    _latency(cache, keys, 50)  # warm-up
                    p50, p99 = _latency(cache, keys, 1000)
                    rows.append((name, p50, p99))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
    print("\nhit latency, one 197x768 fp16 feature (303 KB), verified and decoded")
    print(f"{'tier':10s}{'p50 ms':>10s}{'p99 ms':>10s}")
    for name, p50, p99 in rows:
        print(f"{name:10s}{p50:10.3f}{p99:10.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-redis", action="store_true")
    args = ap.parse_args()
    policy_table()
    tier_latency(args.skip_redis)


if __name__ == "__main__":
    main()
