"""LSH near-duplicate counting and the uniqueness term it feeds into eviction."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from vitedge.cache.keys import entry_key
from vitedge.cache.store import FeatureCache
from vitedge.cache.tiers import MemoryTier
from vitedge.cache.uniqueness import LshConfig, NearDuplicateIndex, hyperplanes, signature


def _at_cosine(v: np.ndarray, cos: float, rng: np.random.Generator) -> np.ndarray:
    """A vector at exactly cosine ``cos`` to ``v``."""
    u = rng.standard_normal(v.shape)
    u -= (u @ v) / (v @ v) * v
    u *= np.linalg.norm(v) / np.linalg.norm(u)
    return cos * v + np.sqrt(1 - cos**2) * u


def test_close_vectors_share_buckets_far_ones_do_not() -> None:
    rng = np.random.default_rng(0)
    cfg = LshConfig(bits=12, tables=4)
    planes = hyperplanes(64, cfg)

    def collide(cos: float) -> float:
        hits = 0
        for _ in range(200):
            v = rng.standard_normal(64)
            a, b = signature(v, planes), signature(_at_cosine(v, cos, rng), planes)
            hits += sum(x == y for x, y in zip(a, b, strict=True))
        return hits / (200 * cfg.tables)

    # Theory: (1 - theta/pi) ** 12 = 0.58 at cosine 0.99, 0.008 at cosine 0.5.
    assert collide(0.99) > 0.45
    assert collide(0.5) < 0.03


def test_signature_pools_tokens_and_checks_width() -> None:
    planes = hyperplanes(8, LshConfig())
    tokens = np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)
    assert signature(tokens, planes) == signature(tokens.mean(0), planes)
    with pytest.raises(ValueError, match="does not fit"):
        signature(np.ones((5, 9)), planes)
    with pytest.raises(ValueError, match="bits"):
        LshConfig(bits=0)


def test_index_counts_duplicates_as_they_come_and_go() -> None:
    idx = NearDuplicateIndex()
    assert idx.add("a", (1, 2, 3)) == {"a": 1.0}
    assert idx.add("b", (1, 2, 3)) == {"a": 0.5, "b": 0.5}
    changed = idx.add("c", (1, 2, 9))  # shares two of three tables: median duplicates 2
    assert changed["c"] == pytest.approx(1 / 3) and changed["a"] == pytest.approx(1 / 3)
    assert idx.add("d", (7, 8, 9)) == {"d": 1.0, "c": pytest.approx(1 / 3)}
    assert idx.remove("b") == {"a": 0.5, "c": 0.5}
    assert idx.remove("nope") == {} and len(idx) == 3


def test_near_duplicates_are_evicted_before_unique_entries() -> None:
    """Equal access history: the cache keeps the one-of-a-kind features and drops repeated frames."""
    rng = np.random.default_rng(2)
    base = rng.standard_normal((16, 32)).astype(np.float32)
    frames = [base + 0.01 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(4)]
    unique = [rng.standard_normal((16, 32)).astype(np.float32) for _ in range(4)]
    ns = "a" * 64

    def digest(name: str) -> str:
        return hashlib.sha256(name.encode()).hexdigest()

    probe = MemoryTier(1 << 20)
    with FeatureCache(tiers=[probe]) as cache:
        cache.put(ns, digest("probe"), frames[0])
        size = probe.used_bytes
    memory = MemoryTier(int(size * 8.5 / 0.95), soft=0.95, hard=0.95, target=0.95)
    with FeatureCache(tiers=[memory]) as cache:
        # The unique entries come first, so by age alone they would be the ones to go.
        names = [f"unique{i}" for i in range(4)] + [f"frame{i}" for i in range(4)]
        for name, feat in zip(names, unique + frames, strict=True):
            cache.get(ns, digest(name))  # a miss, the store, then a hit: two accesses each
            cache.put(ns, digest(name), feat)
            cache.get(ns, digest(name))
        cache.put(ns, digest("newcomer"), rng.standard_normal((16, 32)).astype(np.float32))
        kept = {n for n in names if memory.peek(entry_key(ns, digest(n)))}
    assert {f"unique{i}" for i in range(4)} <= kept
    assert len(kept) < len(names)


def test_a_shared_feature_direction_does_not_make_distinct_entries_duplicates() -> None:
    """Encoder features share a large common component; the store centres them before hashing, so distinct
    images stay unique while a true near-duplicate is still caught."""
    rng = np.random.default_rng(3)
    common = 10 * rng.standard_normal(64).astype(np.float32)
    feats = [common + rng.standard_normal((8, 64)).astype(np.float32) for _ in range(24)]
    memory = MemoryTier(1 << 24)
    with FeatureCache(tiers=[memory]) as cache:
        for i, f in enumerate(feats):
            cache.put("a" * 64, hashlib.sha256(str(i).encode()).hexdigest(), f)
        keys = [entry_key("a" * 64, hashlib.sha256(str(i).encode()).hexdigest()) for i in range(24)]
        late = keys[8:]  # once the running mean has settled
        assert np.mean([memory._dups.uniqueness(k) for k in late]) > 0.8
        cache.put("a" * 64, hashlib.sha256(b"copy").hexdigest(), feats[-1] + 0.001)
        assert memory._dups.uniqueness(keys[-1]) <= 0.5
