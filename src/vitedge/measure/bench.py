"""Throughput and latency of a baseline and its variants, measured side by side in one process.

Timing rules (shared machines are noisy, so only ratios measured together are trusted):
- the thread count is fixed for the whole run (``torch.set_num_threads``);
- every model is warmed up first, then timed iterations are interleaved (baseline, variant 1, ..., baseline,
  variant 1, ...), so drift in machine load hits every model alike;
- ``images_per_s`` is ``batch / median iteration time``; ``speedup`` is a variant's ``images_per_s`` over the
  baseline's from the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """How to time: ``batch`` images per call, ``threads`` torch threads, ``warmup`` untimed calls per model,
    then rounds of interleaved timed calls until both ``min_iters`` rounds and ``min_seconds`` have passed
    (capped at ``max_iters``)."""

    batch: int = 16
    threads: int = 2
    warmup: int = 2
    min_iters: int = 5
    max_iters: int = 50
    min_seconds: float = 3.0

    def __post_init__(self) -> None:
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.warmup < 0 or self.min_iters < 1 or self.max_iters < self.min_iters:
            raise ValueError(
                f"need warmup >= 0 and 1 <= min_iters <= max_iters, got {self.warmup}, "
                f"{self.min_iters}, {self.max_iters}"
            )
        if self.min_seconds < 0:
            raise ValueError(f"min_seconds must be >= 0, got {self.min_seconds}")


@dataclass(frozen=True, kw_only=True)
class BenchResult:
    name: str
    batch: int
    threads: int
    p50_ms: float
    p95_ms: float
    images_per_s: float
    iterations: int
    speedup: float | None = None

    def to_json(self) -> dict[str, object]:
        d = asdict(self)
        if self.speedup is None:
            d.pop("speedup")
        return d


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def bench(
    models: dict[str, nn.Module],
    x: torch.Tensor,
    config: BenchConfig,
    *,
    progress: ProgressFn | None = None,
) -> list[BenchResult]:
    """Time each model on ``x`` (its batch must equal ``config.batch``), interleaved.

    The first entry of ``models`` is the baseline; every other result carries ``speedup`` against it.
    """
    if not models:
        raise ValueError("bench needs at least one model")
    if x.shape[0] != config.batch:
        raise ValueError(f"input batch {x.shape[0]} differs from config.batch {config.batch}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    times: dict[str, list[float]] = {name: [] for name in models}
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()
                for _ in range(config.warmup):
                    m(x)
            start = time.perf_counter()
            rounds = 0
            while rounds < config.max_iters and (
                rounds < config.min_iters or time.perf_counter() - start < config.min_seconds
            ):
                for name, m in models.items():
                    t0 = time.perf_counter()
                    m(x)
                    times[name].append(time.perf_counter() - t0)
                rounds += 1
                if progress:
                    progress(rounds, config.max_iters)
    finally:
        torch.set_num_threads(previous_threads)
    results: list[BenchResult] = []
    base_ips = None
    for name, ts in times.items():
        p50 = statistics.median(ts)
        ips = config.batch / p50
        if base_ips is None:
            base_ips = ips
            speedup = None
        else:
            speedup = ips / base_ips
        results.append(
            BenchResult(
                name=name,
                batch=config.batch,
                threads=config.threads,
                p50_ms=p50 * 1e3,
                p95_ms=_percentile(ts, 0.95) * 1e3,
                images_per_s=ips,
                iterations=len(ts),
                speedup=speedup,
            )
        )
    return results


def bench_against_baseline(
    baseline: nn.Module,
    variants: dict[str, nn.Module],
    x: torch.Tensor,
    config: BenchConfig,
    *,
    progress: Callable[[str], None] | None = None,
) -> tuple[float, dict[str, BenchResult]]:
    """Time each variant interleaved with ``baseline`` (its own pair), so slow drift cannot bias a ratio.

    Returns the median of the baseline's images/s over the pairs and each variant's result (with
    ``speedup`` against the baseline of its own pair). ``progress`` is called with each variant's name.
    """
    base_ips: list[float] = []
    results: dict[str, BenchResult] = {}
    for name, model in variants.items():
        b, v = bench({"baseline": baseline, name: model}, x, config)
        base_ips.append(b.images_per_s)
        results[name] = v
        if progress:
            progress(name)
    return statistics.median(base_ips) if base_ips else float("nan"), results
