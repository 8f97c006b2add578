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
    with pytest.raises(ValueError, match=r"not a whole number of 4-image batches"):
        bench({"m": base}, torch.randn(3, 8), cfg)


def test_several_batches_are_one_round_timed_per_call() -> None:
    """Real images for a data-dependent model: every batch runs in each round; times are per call."""
    calls: list[int] = []

    class Count(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(int(x[0, 0]))
            return x

    cfg = BenchConfig(batch=2, warmup=0, min_iters=3, max_iters=3, min_seconds=0.0)
    x = torch.arange(6, dtype=torch.float32).repeat_interleave(8).view(6, 8)
    (r,) = bench({"m": Count()}, x, cfg)
    assert calls == [0, 2, 4] * 3 and r.iterations == 3 and r.batch == 2


class FakeClock:
    """A perf_counter that advances only when a fake model runs, by that model's cost."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Costs(nn.Module):
    """A 'model' whose every call takes the next of ``costs`` seconds on the fake clock."""

    def __init__(self, clock: FakeClock, costs) -> None:
        super().__init__()
        self.clock, self.costs = clock, iter(costs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += next(self.costs)
        return x


def _fake_bench(monkeypatch, base_costs, variant_costs, **cfg):
    import itertools

    from vitedge.measure import bench as bench_module

    clock = FakeClock()
    monkeypatch.setattr(bench_module.time, "perf_counter", clock)
    config = BenchConfig(batch=2, warmup=0, **cfg)
    models = {
        "baseline": Costs(clock, itertools.cycle(base_costs)),
        "v": Costs(clock, itertools.cycle(variant_costs)),
    }
    return bench(models, torch.zeros(2, 3), config)


def test_a_steady_ratio_stops_on_precision_with_a_tight_interval(monkeypatch) -> None:
    base, v = _fake_bench(monkeypatch, [0.2], [0.1], min_iters=5, min_seconds=0.0)
    assert v.stop == "precision" and v.iterations == 5
    assert v.speedup == pytest.approx(2.0)
    assert v.speedup_low == pytest.approx(2.0) and v.speedup_high == pytest.approx(2.0)
    assert v.speedup == v.images_per_s / base.images_per_s == v.images_per_s / v.baseline_images_per_s


def test_noise_widens_the_interval_and_the_cap_says_so(monkeypatch) -> None:
    rng = torch.Generator().manual_seed(0)
    noisy = (0.1 + 0.2 * torch.rand(500, generator=rng)).tolist()
    base, v = _fake_bench(
        monkeypatch,
        [0.2],
        noisy,
        min_iters=5,
        max_iters=500,
        min_seconds=0.0,
        max_seconds=3.0,
        precision=0.01,
    )
    assert v.stop == "time cap"
    assert v.speedup_low < v.speedup < v.speedup_high  # type: ignore[operator]
    assert v.speedup == v.images_per_s / base.images_per_s
    capped = _fake_bench(monkeypatch, [0.2], noisy, min_iters=3, max_iters=7, min_seconds=0.0, precision=0.01)
    assert capped[1].stop == "iteration cap" and capped[1].iterations == 7


def test_more_rounds_narrow_the_interval(monkeypatch) -> None:
    rng = torch.Generator().manual_seed(1)
    noisy = (0.1 + 0.05 * torch.rand(400, generator=rng)).tolist()
    few = _fake_bench(monkeypatch, [0.2], noisy, min_iters=8, max_iters=8, min_seconds=0.0, precision=0.001)[
        1
    ]
    many = _fake_bench(
        monkeypatch, [0.2], noisy, min_iters=200, max_iters=200, min_seconds=0.0, precision=0.001
    )
    width = lambda r: r.speedup_high - r.speedup_low  # noqa: E731
    assert width(many[1]) < width(few)


def test_ratio_interval_pairs_rounds_and_contains_the_ratio() -> None:
    from vitedge.measure.bench import ratio_interval

    # a shared drift hits both models in the same round: paired resampling sees a steady 2x
    drift = [1.0, 3.0, 1.5, 2.5, 1.2, 2.8, 1.1, 2.9]
    ratio, low, high = ratio_interval([2 * d for d in drift], drift)
    assert ratio == pytest.approx(2.0) and high - low < 1e-9
    ratio, low, high = ratio_interval([2.0, 2.1, 1.9, 2.0], [1.0, 1.2, 0.9, 1.1])
    assert low <= ratio <= high
    with pytest.raises(ValueError, match="paired"):
        ratio_interval([1.0], [1.0, 2.0])


def test_config_rejects_bad_precision_and_caps() -> None:
    with pytest.raises(ValueError, match="precision"):
        BenchConfig(precision=0)
    with pytest.raises(ValueError, match="max_seconds"):
        BenchConfig(min_seconds=5, max_seconds=1)
