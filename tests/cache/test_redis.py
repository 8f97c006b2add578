"""The Redis tier against real redis-server processes started by the tests."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from vitedge.cache.keys import content_digest
from vitedge.cache.store import CacheConfig, FeatureCache

NS = "c" * 64


def feats(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((197, 64)).astype(np.float32)


def key(i: int) -> str:
    return content_digest(np.array([i]))


def test_redis_read_through_and_invalidate(redis_server: str, tmp_path: Path) -> None:
    cfg = CacheConfig(tiers=("memory", "redis"), redis_url=redis_server)
    with FeatureCache(cfg) as writer:
        writer.register(NS, {"model_id": "m"})
        stored = writer.put(NS, key(1), feats(1))
    with FeatureCache(cfg) as reader:
        got = reader.get(NS, key(1))
        assert got is not None and np.array_equal(got, stored)
        assert reader.stats["redis"].hits == 1
        assert reader.get(NS, key(1)) is not None and reader.stats["memory"].hits == 1
        assert reader.namespaces() == {NS: {"model_id": "m"}}
        assert reader.report()["redis"]["entries"] == 1
        assert reader.drop_namespace(NS)["redis"] == 1
    with FeatureCache(cfg) as fresh:
        assert fresh.get(NS, key(1)) is None


def test_redis_url_from_environment(redis_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITEDGE_REDIS_URL", redis_server)
    with FeatureCache(CacheConfig(tiers=("redis",))) as cache:
        cache.put(NS, key(2), feats(2))
        assert cache.get(NS, key(2)) is not None


def test_redis_down_local_tiers_still_serve(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, redis_procs: Any
) -> None:
    proc, port = redis_procs.start()
    cfg = CacheConfig(
        tiers=("memory", "disk", "redis"),
        disk_dir=str(tmp_path / "d"),
        redis_url=f"redis://127.0.0.1:{port}/0",
    )
    with FeatureCache(cfg) as cache:
        cache.put(NS, key(1), feats(1))
        redis_procs.stop(proc)
        with caplog.at_level(logging.WARNING, logger="vitedge.cache.tiers"):
            cache.put(NS, key(2), feats(2))  # the Redis write fails quietly
            assert cache.get(NS, key(2)) is not None
            assert cache.get(NS, key(3)) is None  # a miss, not an error
        assert any("Redis" in r.message for r in caplog.records)
    with FeatureCache(
        CacheConfig(tiers=("disk", "redis"), disk_dir=str(tmp_path / "d"), redis_url=cfg.redis_url)
    ) as cache:
        assert cache.get(NS, key(1)) is not None and cache.stats["disk"].hits == 1
        assert cache.report()["redis"]["available"] is False
