"""Tiered read-through feature cache: memory -> disk -> Redis, with promotion, verification and statistics.

:class:`FeatureCache` stores float features ``(N, D)`` under ``(namespace, content digest)``. A read tries
the tiers fastest first; an entry found in a slower tier is verified and then copied into every faster tier.
An entry that fails verification (truncated, altered, other namespace) is deleted from that tier and counted
as ``corrupt`` and as a miss. Sequential access is learnt, and the predicted next entries are prefetched from
the slower tiers into memory.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from vitedge.cache import codec
from vitedge.cache.keys import entry_key
from vitedge.cache.policy import SequencePredictor
from vitedge.cache.tiers import DiskTier, MemoryTier, RedisTier, Tier
from vitedge.cache.uniqueness import LshConfig, Signature, hyperplanes, signature

__all__ = ["TIER_NAMES", "CacheConfig", "FeatureCache", "TierStats", "default_disk_dir"]

log = logging.getLogger(__name__)

TIER_NAMES = ("memory", "disk", "redis", "redis-cluster")


def default_disk_dir() -> Path:
    """``$VITEDGE_CACHE/features`` (default ``~/.cache/vitedge/features``)."""
    env = os.environ.get("VITEDGE_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "vitedge") / "features"


@dataclass(frozen=True, kw_only=True)
class CacheConfig:
    """Which tiers, in which order, and how they are set up.

    Attributes:
        tiers: tier names fastest first, from ``memory``, ``disk``, ``redis``, ``redis-cluster``.
        value_format: ``fp16`` or ``int8`` (per-token scales).
        memory_bytes: the memory tier's budget.
        disk_dir: the disk tier's folder (default :func:`default_disk_dir`).
        disk_bytes: the disk tier's size limit.
        redis_url: the Redis address (default ``$VITEDGE_REDIS_URL``, then ``redis://127.0.0.1:6379/0``).
        redis_ttl_s: expire Redis entries this many seconds after they are written (None: never).
        redis_max_bytes: bound the Redis server's memory with its LRU (None: leave the server's setting).
        prefetch_depth: how many predicted next entries to prefetch into memory (0: off).
    """

    tiers: tuple[str, ...] = ("memory", "disk")
    value_format: str = "fp16"
    memory_bytes: int = 256 << 20
    disk_dir: str | None = None
    disk_bytes: int = 8 << 30
    redis_url: str | None = None
    prefetch_depth: int = 2
    redis_ttl_s: int | None = None
    redis_max_bytes: int | None = None

    def __post_init__(self) -> None:
        if not self.tiers:
            raise ValueError("a cache needs at least one tier: memory, disk, redis or redis-cluster")
        bad = [t for t in self.tiers if t not in TIER_NAMES]
        if bad:
            raise ValueError(f"unknown cache tier {bad[0]!r}; use a comma list of {', '.join(TIER_NAMES)}")
        if len(set(self.tiers)) != len(self.tiers):
            raise ValueError(f"cache tiers repeat: {','.join(self.tiers)}")
        if self.value_format not in codec.FORMATS:
            raise ValueError(f"value format must be fp16 or int8, got {self.value_format!r}")
        if self.prefetch_depth < 0:
            raise ValueError(f"prefetch_depth must be >= 0, got {self.prefetch_depth}")

    @classmethod
    def parse(cls, spec: str, **kwargs: Any) -> CacheConfig:
        """``"memory,disk,redis"`` -> a config with those tiers."""
        tiers = tuple(t.strip() for t in str(spec).split(",") if t.strip())
        return cls(tiers=tiers, **kwargs)


@dataclass
class TierStats:
    hits: int = 0
    misses: int = 0
    corrupt: int = 0
    bytes_read: int = 0
    bytes_written: int = 0
    writes: int = 0
    prefetched: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "hit_rate": self.hit_rate}


def _build_tier(name: str, config: CacheConfig) -> Tier:
    if name == "memory":
        return MemoryTier(config.memory_bytes)
    if name == "disk":
        return DiskTier(config.disk_dir or default_disk_dir(), size_limit=config.disk_bytes)
    return RedisTier(
        config.redis_url,
        cluster=name == "redis-cluster",
        ttl_s=config.redis_ttl_s,
        max_bytes=config.redis_max_bytes,
    )


class FeatureCache:
    """Read-through across tiers; see the module docstring.

    Args:
        config: the tiers and their settings; or pass ``tiers`` to use ready-made tier objects.
        tiers: tier objects fastest first (overrides ``config.tiers``).
    """

    def __init__(self, config: CacheConfig | None = None, *, tiers: list[Tier] | None = None) -> None:
        self.config = config or CacheConfig()
        self.tiers: list[Tier] = (
            tiers if tiers is not None else [_build_tier(t, self.config) for t in self.config.tiers]
        )
        self.stats: dict[str, TierStats] = {t.name: TierStats() for t in self.tiers}
        self.predictor = SequencePredictor(depth=max(self.config.prefetch_depth, 1))
        self._registered: set[str] = set()
        self._lsh = LshConfig()
        self._planes: dict[int, np.ndarray] = {}  # feature width -> LSH hyperplanes
        self._centre: dict[int, tuple[np.ndarray, int]] = {}  # feature width -> (running mean, count)

    def _signature(self, features: np.ndarray) -> Signature | None:
        """LSH buckets of the token-pooled feature, centred on the running mean of the features seen: encoder
        features share a large common direction, and uncentred they would all look alike."""
        if features.ndim not in (1, 2) or features.shape[-1] < 1 or features.size == 0:
            return None
        v = features.mean(axis=0) if features.ndim == 2 else features  # (D,)
        if not np.isfinite(v).all():
            return None
        dim = int(v.shape[0])
        if dim not in self._planes:
            self._planes[dim] = hyperplanes(dim, self._lsh)
        mean, n = self._centre.get(dim, (np.zeros(dim, dtype=np.float64), 0))
        mean = mean + (v - mean) / (n + 1)
        self._centre[dim] = (mean, n + 1)
        return signature(v - mean, self._planes[dim])

    def register(self, namespace: str, meta: dict[str, Any]) -> None:
        """Record a namespace's description in every tier (once per process)."""
        if namespace not in self._registered:
            for tier in self.tiers:
                tier.register(namespace, meta)
            self._registered.add(namespace)

    def _read(self, index: int, key: str, namespace: str) -> np.ndarray | None:
        tier = self.tiers[index]
        st = self.stats[tier.name]
        blob = tier.get(key)
        if blob is None:
            st.misses += 1
            return None
        try:
            value = codec.decode(blob, namespace=namespace, key=key)
        except codec.CorruptEntry as e:
            st.corrupt += 1
            st.misses += 1
            log.warning("dropping a corrupt %s cache entry %s: %s", tier.name, key, e)
            tier.discard(key)
            return None
        st.hits += 1
        st.bytes_read += len(blob)
        self._promote(index, key, blob, namespace, value=value)
        return value

    def _promote(
        self,
        index: int,
        key: str,
        blob: bytes,
        namespace: str,
        *,
        value: np.ndarray,
        prefetched: bool = False,
    ) -> None:
        sig = self._signature(value) if index > 0 else None
        for faster in self.tiers[:index]:
            if isinstance(faster, MemoryTier):
                faster.put(key, blob, namespace=namespace, prefetched=prefetched, signature=sig)
            else:
                faster.put(key, blob, namespace=namespace)
            self.stats[faster.name].bytes_written += len(blob)

    def get(self, namespace: str, content: str) -> np.ndarray | None:
        """The verified feature ``(N, D)`` float32 for an image, or None on a miss in every tier."""
        return self.lookup(namespace, content)[0]

    def lookup(self, namespace: str, content: str) -> tuple[np.ndarray | None, str | None]:
        """Like :meth:`get`, and the name of the tier that held the feature (None on a miss)."""
        key = entry_key(namespace, content)
        self.predictor.observe(key)
        for i in range(len(self.tiers)):
            value = self._read(i, key, namespace)
            if value is not None:
                self._prefetch(key, namespace)
                return value, self.tiers[i].name
        return None, None

    def _prefetch(self, key: str, namespace: str) -> None:
        memory = self.tiers[0]
        if self.config.prefetch_depth == 0 or not isinstance(memory, MemoryTier) or len(self.tiers) < 2:
            return
        for predicted in self.predictor.predict(key)[: self.config.prefetch_depth]:
            nxt = str(predicted)
            if memory.peek(nxt):
                continue
            for i, tier in enumerate(self.tiers[1:], start=1):
                blob = tier.get(nxt)
                if blob is None:
                    continue
                try:
                    value = codec.decode(blob, namespace=namespace, key=nxt)
                except codec.CorruptEntry:
                    tier.discard(nxt)
                    continue
                self.stats[tier.name].prefetched += 1
                self._promote(i, nxt, blob, namespace, value=value, prefetched=True)
                break

    def put(self, namespace: str, content: str, features: np.ndarray, *, cost: float = 1.0) -> np.ndarray:
        """Store ``features`` ``(N, D)`` in every tier; returns the value as a reader will see it."""
        key = entry_key(namespace, content)
        blob = codec.encode(features, namespace=namespace, key=key, fmt=self.config.value_format)
        sig = self._signature(features)
        for tier in self.tiers:
            if isinstance(tier, MemoryTier):
                tier.put(key, blob, namespace=namespace, cost=cost, signature=sig)
            else:
                tier.put(key, blob, namespace=namespace, cost=cost)
            st = self.stats[tier.name]
            st.bytes_written += len(blob)
            st.writes += 1
        return codec.decode(blob, namespace=namespace, key=key)

    def drop_namespace(self, namespace: str) -> dict[str, int]:
        return {tier.name: tier.drop_namespace(namespace) for tier in self.tiers}

    def namespaces(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for tier in self.tiers:
            for ns, meta in tier.namespaces().items():
                out.setdefault(ns, meta)
        return out

    def report(self) -> dict[str, Any]:
        """Per tier: its statistics in this process and what it holds."""
        return {tier.name: {**self.stats[tier.name].to_json(), **tier.info()} for tier in self.tiers}

    def close(self) -> None:
        for tier in self.tiers:
            close = getattr(tier, "close", None)
            if close is not None:
                close()

    def __enter__(self) -> FeatureCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
