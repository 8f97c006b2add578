"""Throughput and latency of a baseline and its variants, measured side by side in one process.

Timing rules (shared machines are noisy, so only ratios measured together are trusted):
- the thread count is fixed for the whole run (``torch.set_num_threads``);
- every model is warmed up first, then timed iterations are interleaved (baseline, variant 1, ..., baseline,
  variant 1, ...), so drift in machine load hits every model alike;
- ``images_per_s`` is ``batch / median iteration time``; ``speedup`` is a variant's ``images_per_s`` over the
  baseline's from the same run;
- every speed-up comes with a 95 % interval (``speedup_low``, ``speedup_high``) from resampling the paired
  rounds (the baseline's and the variant's times of one round stay together) and recomputing that same
  ratio of medians, so ``speedup_low <= speedup <= speedup_high``;
- rounds go on until every interval's half-width is at most ``precision`` of its ratio, or a cap is hit
  (``max_seconds``, ``max_iters``); ``stop`` says which.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True, kw_only=True)
class BenchConfig:
    """How to time: ``batch`` images per call, ``threads`` torch threads, ``warmup`` untimed calls per model,
    then rounds of interleaved timed calls: at least ``min_iters`` rounds and ``min_seconds``, then on until
    every speed-up's 95 % interval has a half-width of at most ``precision`` (a fraction of the ratio), or
    ``max_seconds`` have passed, or ``max_iters`` rounds."""

    batch: int = 16
    threads: int = 2
    warmup: int = 2
    min_iters: int = 5
    max_iters: int = 50
    min_seconds: float = 3.0
    precision: float = 0.03
    max_seconds: float = 30.0

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
        if not (math.isfinite(self.min_seconds) and math.isfinite(self.max_seconds)):
            raise ValueError(
                f"min_seconds and max_seconds must be finite, got {self.min_seconds} and {self.max_seconds}"
            )
        if self.min_seconds < 0 or self.max_seconds < self.min_seconds:
            raise ValueError(
                f"need 0 <= min_seconds <= max_seconds, got {self.min_seconds} and {self.max_seconds}"
            )
        if not 0 < self.precision < 1:
            raise ValueError(f"precision is a fraction of the speed-up in (0, 1), got {self.precision}")


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
    speedup_low: float | None = None  # 95 % interval of speedup, from the paired rounds
    speedup_high: float | None = None
    baseline_images_per_s: float | None = None  # the baseline timed in the same rounds
    stop: str = ""  # why timing stopped: "precision", "time cap" or "iteration cap"

    def to_json(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


RESAMPLES = 1000


def ratio_interval(
    base_times: list[float], variant_times: list[float], *, resamples: int = RESAMPLES, seed: int = 0
) -> tuple[float, float, float]:
    """``(ratio, low, high)``: ``median(base) / median(variant)`` and its 95 % paired-bootstrap interval.

    Rounds are resampled with replacement as pairs (round i's two times together), the ratio recomputed on
    each resample, and the 2.5 and 97.5 percentiles taken; the interval always contains the ratio.
    """
    b = np.asarray(base_times, dtype=np.float64)
    v = np.asarray(variant_times, dtype=np.float64)
    if b.shape != v.shape or b.size == 0:
        raise ValueError(f"need paired, non-empty times, got {b.size} and {v.size}")
    ratio = float(np.median(b) / np.median(v))
    idx = np.random.default_rng(seed).integers(0, b.size, size=(resamples, b.size))
    ratios = np.median(b[idx], axis=1) / np.median(v[idx], axis=1)
    low, high = np.percentile(ratios, [2.5, 97.5])
    return ratio, min(float(low), ratio), max(float(high), ratio)


Interval = tuple[float, float, float]  # (ratio, low, high)


def _intervals(times: dict[str, list[float]]) -> dict[str, Interval]:
    """Every variant's speed-up interval against the first (baseline) entry of ``times``."""
    base, *variants = times
    return {name: ratio_interval(times[base], times[name]) for name in variants}


def _precise(intervals: dict[str, Interval], precision: float) -> bool:
    """Whether every interval's half-width is within ``precision`` of its ratio."""
    return all((high - low) / 2 <= precision * ratio for ratio, low, high in intervals.values())


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
    """Time each model on ``x``, interleaved: ``config.batch`` images per call, and, when ``x`` holds several
    batches (real images for a data-dependent technique), one round runs them all and counts the mean time
    per call, so an early exit is timed over many images rather than one.

    The first entry of ``models`` is the baseline; every other result carries ``speedup`` against it.
    """
    if not models:
        raise ValueError("bench needs at least one model")
    if x.shape[0] % config.batch:
        raise ValueError(
            f"input of {x.shape[0]} images is not a whole number of {config.batch}-image batches"
        )
    chunks = x.split(config.batch)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    times: dict[str, list[float]] = {name: [] for name in models}  # per round: mean seconds per call
    calls: dict[str, list[float]] = {name: [] for name in models}  # every call, for the p95 latency
    intervals: dict[str, Interval] = {}
    stop = ""
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()
                for i in range(max(config.warmup, len(chunks) if config.warmup else 0)):
                    m(chunks[i % len(chunks)])
            start = time.perf_counter()
            rounds = 0
            while not stop:
                for name, m in models.items():
                    t0 = t = time.perf_counter()
                    for c in chunks:
                        m(c)
                        t, last = time.perf_counter(), t
                        calls[name].append(t - last)
                    times[name].append((t - t0) / len(chunks))
                rounds += 1
                if progress:
                    progress(rounds, config.max_iters)
                elapsed = time.perf_counter() - start
                # many calls per round (real images): the time cap holds from the second round on
                capped = len(chunks) > 1 and rounds >= 2 and elapsed >= config.max_seconds
                short = rounds < config.min_iters or elapsed < config.min_seconds
                if rounds < config.max_iters and short and not capped:
                    continue  # (the iteration cap holds even before min_seconds)
                intervals = _intervals(times)  # what the results report, if timing stops here
                if _precise(intervals, config.precision):
                    stop = "precision"
                elif rounds >= config.max_iters:
                    stop = "iteration cap"
                elif elapsed >= config.max_seconds:
                    stop = "time cap"
    finally:
        torch.set_num_threads(previous_threads)
    results: list[BenchResult] = []
    base_name = next(iter(times))
    base_ips = config.batch / statistics.median(times[base_name])
    for name, ts in times.items():
        p50 = statistics.median(ts)
        ips = config.batch / p50
        ratio: dict[str, float | None] = {}
        if name != base_name:
            _, low, high = intervals[name]  # computed on these same rounds when timing stopped
            point = ips / base_ips  # the contract's identity: images_per_s / baseline_images_per_s
            ratio = {"speedup": point, "speedup_low": min(low, point), "speedup_high": max(high, point)}
            ratio["baseline_images_per_s"] = base_ips
        results.append(
            BenchResult(
                name=name,
                batch=config.batch,
                threads=config.threads,
                p50_ms=p50 * 1e3,
                p95_ms=_percentile(calls[name], 0.95) * 1e3,
                images_per_s=ips,
                iterations=len(ts),
                stop=stop,
                **ratio,  # type: ignore[arg-type]
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
