"""The uniqueness term of the eviction score: how many near-duplicates of an entry the cache holds.

Two photos of the same scene, or consecutive video frames, give features that point the same way; keeping one
of them serves a VLM almost as well as keeping both, so a feature with many near-duplicates resident is the
cheaper one to drop. Near-duplicates are found with random-hyperplane LSH (SimHash, Charikar 2002): a feature
is pooled over its tokens to one vector ``v`` (D,), and each of ``tables`` tables hashes it to the sign
pattern of ``bits`` random projections. Two vectors at angle ``theta`` agree on one bit with probability
``1 - theta / pi``, so they share a ``bits``-bit bucket with probability ``(1 - theta/pi) ** bits``: at
12 bits a pair at cosine 0.99 (8 degrees) collides 58 % of the time per table, a pair at cosine 0.5
(60 degrees) 0.8 %.

``uniqueness = 1 / (1 + d)`` with ``d`` the median over tables of the other residents in the entry's bucket,
so it is 1 for a one-of-a-kind entry and falls as duplicates arrive (and rises again as they leave).

:func:`signature` needs numpy; :class:`NearDuplicateIndex` is plain Python, like the policies it feeds.
"""

from __future__ import annotations

import statistics
from collections.abc import Hashable
from dataclasses import dataclass

import numpy as np

__all__ = ["LshConfig", "NearDuplicateIndex", "hyperplanes", "signature"]

Key = Hashable
Signature = tuple[int, ...]  # one bucket id per table


@dataclass(frozen=True, kw_only=True)
class LshConfig:
    """SimHash settings.

    Attributes:
        bits: random hyperplanes per table (more bits: only closer vectors collide).
        tables: independent tables (more tables: a steadier duplicate count).
        seed: seeds the hyperplanes, so signatures are comparable across processes.
    """

    bits: int = 12
    tables: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.bits <= 62:
            raise ValueError(f"bits must be in [1, 62], got {self.bits}")
        if self.tables < 1:
            raise ValueError(f"tables must be >= 1, got {self.tables}")


def hyperplanes(dim: int, config: LshConfig) -> np.ndarray:
    """Fixed random hyperplane normals for features of width ``dim``: (tables, bits, dim) float32."""
    if dim < 1:
        raise ValueError(f"feature width must be >= 1, got {dim}")
    rng = np.random.default_rng([config.seed, dim])
    return rng.standard_normal((config.tables, config.bits, dim)).astype(np.float32)


def signature(features: np.ndarray, planes: np.ndarray) -> Signature:
    """Bucket ids of a feature ``(N, D)`` (or ``(D,)``), pooled over tokens, one per table."""
    v = np.asarray(features, dtype=np.float32)
    if v.ndim == 2:
        v = v.mean(axis=0)  # (D,)
    if v.ndim != 1 or v.shape[0] != planes.shape[2]:
        raise ValueError(
            f"feature of shape {features.shape} does not fit hyperplanes of width {planes.shape[2]}"
        )
    signs = (planes @ v) > 0  # (tables, bits)
    weights = 1 << np.arange(planes.shape[1], dtype=np.int64)  # (bits,)
    return tuple(int(b) for b in (signs.astype(np.int64) * weights).sum(axis=1))


class NearDuplicateIndex:
    """Resident keys by LSH bucket; reports the uniqueness of each key whose bucket changed."""

    def __init__(self) -> None:
        self._sig: dict[Key, Signature] = {}
        self._buckets: dict[tuple[int, int], set[Key]] = {}  # (table, bucket) -> keys

    def __len__(self) -> int:
        return len(self._sig)

    def uniqueness(self, key: Key) -> float:
        sig = self._sig.get(key)
        if sig is None:
            return 1.0
        dups = statistics.median(len(self._buckets[(t, b)]) - 1 for t, b in enumerate(sig))
        return 1.0 / (1.0 + dups)

    def add(self, key: Key, sig: Signature) -> dict[Key, float]:
        """Index ``key``; returns the new uniqueness of it and of every key sharing a bucket with it."""
        self.remove(key)
        self._sig[key] = sig
        for t, b in enumerate(sig):
            self._buckets.setdefault((t, b), set()).add(key)
        return self._affected(sig)

    def remove(self, key: Key) -> dict[Key, float]:
        """Forget ``key``; returns the new uniqueness of the keys that shared a bucket with it."""
        sig = self._sig.pop(key, None)
        if sig is None:
            return {}
        for t, b in enumerate(sig):
            bucket = self._buckets[(t, b)]
            bucket.discard(key)
            if not bucket:
                del self._buckets[(t, b)]
        return self._affected(sig)

    def _affected(self, sig: Signature) -> dict[Key, float]:
        keys: set[Key] = set()
        for t, b in enumerate(sig):
            keys |= self._buckets.get((t, b), set())
        return {k: self.uniqueness(k) for k in keys}
