"""Access traces and a store simulator to compare eviction policies (torch-free).

The traces are the workloads the feature cache sees: a looping video (a camera or a demo clip replayed), a
Zipf-distributed image workload (a chat where a few images come back often) and a scan mixed into a hot set
(a one-off sweep over a folder while the usual images keep coming).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

from vitedge.cache.policy import EvictionPolicy, SequencePredictor

__all__ = ["ReplayResult", "loop_trace", "replay", "scan_trace", "zipf_trace"]


def loop_trace(frames: int, loops: int) -> list[int]:
    """A clip of ``frames`` distinct frames played ``loops`` times."""
    if frames < 1 or loops < 1:
        raise ValueError(f"frames and loops must be >= 1, got {frames} and {loops}")
    return [f for _ in range(loops) for f in range(frames)]


def zipf_trace(items: int, length: int, *, alpha: float = 1.0, seed: int = 0) -> list[int]:
    """``length`` requests over ``items`` keys; key ``i`` has probability proportional to (i+1)^-alpha."""
    if items < 1 or length < 1:
        raise ValueError(f"items and length must be >= 1, got {items} and {length}")
    rng = random.Random(seed)
    weights = [(i + 1) ** -alpha for i in range(items)]
    return rng.choices(range(items), weights=weights, k=length)


def scan_trace(hot: int, length: int, *, scan_every: int = 4, seed: int = 0) -> list[int]:
    """A hot set of ``hot`` keys (uniform) with a one-off scan key after every ``scan_every`` hot requests."""
    rng = random.Random(seed)
    out: list[int] = []
    next_scan = hot
    while len(out) < length:
        out.extend(rng.randrange(hot) for _ in range(scan_every))
        out.append(next_scan)
        next_scan += 1
    return out[:length]


@dataclass(frozen=True)
class ReplayResult:
    requests: int
    hits: int
    prefetch_hits: int
    peak_bytes: int = 0  # the most the store ever held

    @property
    def hit_rate(self) -> float:
        return self.hits / self.requests if self.requests else 0.0


def replay(
    policy: EvictionPolicy,
    trace: Iterable[Hashable],
    *,
    capacity: int,
    size_of: Callable[[Hashable], int] = lambda _k: 1,
    predictor: SequencePredictor | None = None,
) -> ReplayResult:
    """Run ``trace`` through a store of ``capacity`` bytes governed by ``policy``; count hits.

    With a ``predictor``, each request also prefetches the predicted next keys (from a backing store that
    holds everything) into the store, bypassing the admission test; a later hit on such an entry counts as a
    hit and as a ``prefetch_hit``.
    """
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    resident: dict[Hashable, int] = {}
    prefetched: set[Hashable] = set()
    used = hits = prefetch_hits = requests = peak = 0

    def insert(key: Hashable, force: bool) -> None:  # force: a prefetch, admitted without the test
        nonlocal used
        size = size_of(key)
        if size > capacity:
            return
        if used + size > capacity:
            if not force and not policy.admit(key, used + size - capacity):
                return
            for victim in policy.victims(used + size - capacity):
                used -= resident.pop(victim)
                prefetched.discard(victim)
                policy.on_remove(victim)
        resident[key] = size
        used += size
        nonlocal peak
        peak = max(peak, used)
        policy.on_insert(key, size, prefetched=force)

    for key in trace:
        requests += 1
        policy.on_access(key)
        if key in resident:
            hits += 1
            if key in prefetched:
                prefetch_hits += 1
                prefetched.discard(key)
        else:
            insert(key, force=False)
        if predictor is not None:
            predictor.observe(key)
            for nxt in predictor.predict(key):
                if nxt not in resident:
                    insert(nxt, force=True)
                    if nxt in resident:
                        prefetched.add(nxt)
    return ReplayResult(requests=requests, hits=hits, prefetch_hits=prefetch_hits, peak_bytes=peak)
