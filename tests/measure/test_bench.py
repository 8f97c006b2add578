"""Interleaved timing: config validation and the pairwise-against-baseline helper (no timing asserts)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vitedge.measure.bench import BenchConfig, bench, bench_against_baseline


def test_config_rejects_bad_values() -> None:
    for bad in ({"batch": 0}, {"threads": 0}, {"min_iters": 5, "max_iters": 2}, {"min_seconds": -1.0}):
        with pytest.raises(ValueError):
            BenchConfig(**bad)


def test_pairwise_results_carry_their_own_speedup() -> None:
    cfg = BenchConfig(batch=4, warmup=0, min_iters=2, max_iters=2, min_seconds=0.0)
    x = torch.randn(4, 8)
    base, small = nn.Linear(8, 8), nn.Identity()
    seen: list[str] = []
    base_ips, timed = bench_against_baseline(base, {"a": small, "b": base}, x, cfg, progress=seen.append)
    assert seen == ["a", "b"] and set(timed) == {"a", "b"}
    assert base_ips > 0 and all(r.speedup is not None and r.iterations == 2 for r in timed.values())
    with pytest.raises(ValueError, match=r"differs from config\.batch"):
        bench({"m": base}, torch.randn(3, 8), cfg)
