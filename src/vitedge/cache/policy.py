"""Eviction policies for the feature cache: plain Python, no torch, testable on their own.

A policy only keeps bookkeeping (access history, sizes, scores); the bytes live in a tier. Every policy speaks
the same small protocol, driven by a store or by :func:`vitedge.cache.replay.replay`:

- ``on_access(key)`` for every request, hit or miss, before the store looks the key up;
- ``admit(key, size)`` when the store is full: should ``key`` displace residents at all?
- ``victims(nbytes)`` the residents to drop, in order, to free ``nbytes``;
- ``on_insert(key, size, ...)`` / ``on_remove(key)`` as entries come and go.

:class:`ImportanceLRUK` is the seed's policy (section 22.3.4): LRU-K (K=2) ranked by an importance score
``a * frequency (exponentially decayed) + b * uniqueness + c * recompute cost`` (a=.5, b=.3, c=.2), with the
access history of evicted keys kept for a while (as LRU-K's "retained information") so that a returning key is
recognised, and an admission test that keeps a cold key from displacing a warmer resident (scan resistance,
and a stable resident set on loops longer than the cache). :class:`SequencePredictor` learns which key follows
which, for predictive prefetch of sequential access.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "EvictionPolicy",
    "ImportanceConfig",
    "ImportanceLRUK",
    "LFUPolicy",
    "LRUPolicy",
    "SequencePredictor",
    "make_policy",
]

Key = Hashable


class EvictionPolicy(Protocol):
    def on_access(self, key: Key) -> None: ...
    def on_insert(
        self, key: Key, size: int, *, cost: float = 1.0, uniqueness: float = 1.0, prefetched: bool = False
    ) -> None: ...
    def on_remove(self, key: Key) -> None: ...
    def admit(self, key: Key, size: int) -> bool: ...
    def victims(self, nbytes: int) -> list[Key]: ...


class LRUPolicy:
    """Least recently used: evict the resident whose last access is oldest."""

    def __init__(self) -> None:
        self._order: OrderedDict[Key, int] = OrderedDict()

    def on_access(self, key: Key) -> None:
        if key in self._order:
            self._order.move_to_end(key)

    def on_insert(
        self, key: Key, size: int, *, cost: float = 1.0, uniqueness: float = 1.0, prefetched: bool = False
    ) -> None:
        self._order[key] = size
        self._order.move_to_end(key)

    def on_remove(self, key: Key) -> None:
        self._order.pop(key, None)

    def admit(self, key: Key, size: int) -> bool:
        return True

    def victims(self, nbytes: int) -> list[Key]:
        out, freed = [], 0
        for key, size in self._order.items():
            if freed >= nbytes:
                break
            out.append(key)
            freed += size
        return out


class LFUPolicy:
    """Least frequently used among residents (counts start at 1 on insert), oldest access breaking ties."""

    def __init__(self) -> None:
        self._count: dict[Key, int] = {}
        self._last: dict[Key, int] = {}
        self._size: dict[Key, int] = {}
        self._clock = 0

    def on_access(self, key: Key) -> None:
        self._clock += 1
        if key in self._count:
            self._count[key] += 1
            self._last[key] = self._clock

    def on_insert(
        self, key: Key, size: int, *, cost: float = 1.0, uniqueness: float = 1.0, prefetched: bool = False
    ) -> None:
        self._count[key] = 1
        self._last[key] = self._clock
        self._size[key] = size

    def on_remove(self, key: Key) -> None:
        for d in (self._count, self._last, self._size):
            d.pop(key, None)

    def admit(self, key: Key, size: int) -> bool:
        return True

    def victims(self, nbytes: int) -> list[Key]:
        ranked = sorted(self._count, key=lambda k: (self._count[k], self._last[k]))
        out, freed = [], 0
        for key in ranked:
            if freed >= nbytes:
                break
            out.append(key)
            freed += self._size[key]
        return out


@dataclass(frozen=True, kw_only=True)
class ImportanceConfig:
    """Weights and constants of :class:`ImportanceLRUK` (defaults from the seed, section 22.3.4).

    Attributes:
        k: accesses remembered per key (LRU-K); keys with fewer than ``k`` are evicted first.
        freq_weight, unique_weight, cost_weight: ``a``, ``b``, ``c`` of the importance score.
        decay: lambda of the decayed frequency ``sum exp(-decay * (now - t_i))``, per access of the clock.
        history: how many evicted keys' histories to retain, as a multiple of the resident count (at least
            ``min_history`` keys).
    """

    k: int = 2
    freq_weight: float = 0.5
    unique_weight: float = 0.3
    cost_weight: float = 0.2
    decay: float = 0.01
    history: float = 4.0
    min_history: int = 256

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.decay < 0:
            raise ValueError(f"decay must be >= 0, got {self.decay}")
        for name in ("freq_weight", "unique_weight", "cost_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class _History:
    times: list[int] = field(default_factory=list)  # last k access times, oldest first
    log_freq: float = -math.inf  # log of the decayed frequency at time ``last``
    last: int = 0
    size: int = 0
    cost: float = 1.0
    uniqueness: float = 1.0


def _log_add(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    hi, lo = max(a, b), min(a, b)
    return hi + math.log1p(math.exp(lo - hi))


class ImportanceLRUK:
    """LRU-K ranked by importance; see the module docstring.

    The decayed frequency is kept in the log domain, so it never underflows on long traces and the order of
    two keys is exact whatever their age.
    """

    def __init__(self, config: ImportanceConfig | None = None) -> None:
        self.config = config or ImportanceConfig()
        self._resident: dict[Key, _History] = {}
        self._ghost: OrderedDict[Key, _History] = OrderedDict()
        self._clock = 0
        self._cost_sum = 0.0
        self._cost_n = 0
        self._pending: tuple[Key | None, float] = (None, -math.inf)
        self._prefetched: set[Key] = set()  # ranked last until their first access

    # --- bookkeeping -----------------------------------------------------------------------------
    def _history(self, key: Key) -> _History | None:
        return self._resident.get(key) or self._ghost.get(key)

    def on_access(self, key: Key) -> None:
        self._clock += 1
        self._prefetched.discard(key)
        h = self._resident.get(key)
        if h is None:
            h = self._ghost.get(key)
            if h is None:
                h = _History()
                self._ghost[key] = h
            self._ghost.move_to_end(key)
            self._trim_ghost()
        self._pending = key, self._log_freq(h)  # the candidate's frequency before this access
        h.log_freq = _log_add(self._log_freq(h), 0.0)
        h.last = self._clock
        h.times.append(self._clock)
        del h.times[: -self.config.k]

    def on_insert(
        self, key: Key, size: int, *, cost: float = 1.0, uniqueness: float = 1.0, prefetched: bool = False
    ) -> None:
        h = self._ghost.pop(key, None) or self._resident.get(key) or _History(last=self._clock)
        h.size, h.cost, h.uniqueness = int(size), float(cost), min(max(float(uniqueness), 0.0), 1.0)
        self._resident[key] = h
        if prefetched:
            self._prefetched.add(key)
        self._cost_sum += h.cost
        self._cost_n += 1

    def set_uniqueness(self, key: Key, uniqueness: float) -> None:
        """A resident's uniqueness changed (a near-duplicate came or went; see :mod:`.uniqueness`)."""
        h = self._resident.get(key)
        if h is not None:
            h.uniqueness = min(max(float(uniqueness), 0.0), 1.0)

    def on_remove(self, key: Key) -> None:
        self._prefetched.discard(key)
        h = self._resident.pop(key, None)
        if h is not None:
            self._ghost[key] = h
            self._trim_ghost()

    def _trim_ghost(self) -> None:
        limit = max(self.config.min_history, int(self.config.history * len(self._resident)))
        while len(self._ghost) > limit:
            self._ghost.popitem(last=False)

    # --- scores ----------------------------------------------------------------------------------
    def _log_freq(self, h: _History) -> float:
        return h.log_freq - self.config.decay * (self._clock - h.last)

    def importance(self, key: Key, *, log_freq: float | None = None) -> float:
        """``a * f/(1+f) + b * uniqueness + c * cost/(cost + mean cost)``, each term in [0, 1]."""
        h = self._history(key)
        if h is None:
            return 0.0
        cfg = self.config
        lf = self._log_freq(h) if log_freq is None else log_freq
        freq = 1.0 / (1.0 + math.exp(-lf)) if lf > -700 else 0.0  # f/(1+f) with f = exp(lf)
        mean_cost = self._cost_sum / self._cost_n if self._cost_n else h.cost
        cost = h.cost / (h.cost + mean_cost) if h.cost + mean_cost > 0 else 0.0
        return cfg.freq_weight * freq + cfg.unique_weight * h.uniqueness + cfg.cost_weight * cost

    def _rank(self, key: Key, h: _History, log_freq: float | None = None) -> tuple[int, int, float, int]:
        # Prefetched entries not yet used rank last; then fewer than k accesses ranks first (LRU-K's infinite
        # backward distance), then low importance, then the oldest k-th most recent access.
        full = int(len(h.times) >= self.config.k)
        fetched = int(key in self._prefetched)
        return fetched, full, self.importance(key, log_freq=log_freq), h.times[0] if h.times else 0

    def victims(self, nbytes: int) -> list[Key]:
        ranked = sorted(self._resident, key=lambda k: self._rank(k, self._resident[k]))
        out, freed = [], 0
        for key in ranked:
            if freed >= nbytes:
                break
            out.append(key)
            freed += self._resident[key].size
        return out

    def admit(self, key: Key, size: int) -> bool:
        """Admit ``key`` into a full store only if it outranks the first resident it would displace.

        The candidate is judged on its history *before* the current request, so a key seen for the first time
        displaces only residents that were themselves seen once (a scan cannot flush a hot set), and on a loop
        longer than the store the resident set stays put instead of being replaced just before its reuse.
        """
        h = self._history(key)
        if h is None or not self._resident:
            return True
        prior = self._pending[1] if self._pending[0] == key else self._log_freq(h)
        prior_times = h.times[:-1] if h.times and h.times[-1] == self._clock else h.times
        cand = (0, int(len(prior_times) >= self.config.k), self.importance(key, log_freq=prior))
        first = self.victims(size)[:1]
        if not first:
            return True
        victim = self._rank(first[0], self._resident[first[0]])
        return cand > victim[:3]

    @property
    def resident_count(self) -> int:
        return len(self._resident)


class SequencePredictor:
    """Learns ``key -> next key`` from the access stream and predicts the next ones (predictive prefetch).

    A key whose successor was the same the last two times it was seen is "sequential"; :meth:`predict` then
    follows that chain for up to ``depth`` keys. Memory is bounded to ``max_keys`` keys (oldest dropped).
    """

    def __init__(self, *, depth: int = 2, max_keys: int = 100_000) -> None:
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        self.depth = depth
        self.max_keys = max_keys
        self._next: OrderedDict[Key, tuple[Key, int]] = OrderedDict()  # key -> (successor, repeat count)
        self._prev: Key | None = None

    def observe(self, key: Key) -> None:
        prev = self._prev
        if prev is not None and prev != key:
            old = self._next.get(prev)
            self._next[prev] = (key, old[1] + 1 if old and old[0] == key else 1)
            self._next.move_to_end(prev)
            while len(self._next) > self.max_keys:
                self._next.popitem(last=False)
        self._prev = key

    def predict(self, key: Key) -> list[Key]:
        out: list[Key] = []
        cur = key
        while len(out) < self.depth:
            nxt = self._next.get(cur)
            if nxt is None or nxt[1] < 2 or nxt[0] == key or nxt[0] in out:
                break
            out.append(nxt[0])
            cur = nxt[0]
        return out


def make_policy(name: str) -> EvictionPolicy:
    """``importance`` (the default), ``lru`` or ``lfu``.

    Raises:
        ValueError: any other name.
    """
    if name == "importance":
        return ImportanceLRUK()
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    raise ValueError(f"unknown eviction policy {name!r}; use importance, lru or lfu")
