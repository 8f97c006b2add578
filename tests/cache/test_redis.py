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


def test_ttl_and_size_bound_reach_the_server(redis_server: str) -> None:
    import redis

    from vitedge.cache.keys import entry_key
    from vitedge.cache.tiers import REGISTRY_VERSION

    cfg = CacheConfig(tiers=("redis",), redis_url=redis_server, redis_ttl_s=600, redis_max_bytes=64 << 20)
    with FeatureCache(cfg) as cache:
        cache.register(NS, {"model_id": "m"})
        cache.put(NS, key(7), feats(7))
        info = cache.report()["redis"]
        assert info["entries"] == 1 and info["ttl_s"] == 600  # DBSIZE less the registry: no scan
    client = redis.Redis.from_url(redis_server)
    assert 0 < client.ttl(entry_key(NS, key(7))) <= 600
    assert client.config_get("maxmemory")["maxmemory"] == str(64 << 20)
    assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "allkeys-lru"
    assert client.exists(f"vitedge:namespaces:v{REGISTRY_VERSION}")  # the registry key carries its version
    with pytest.raises(ValueError, match="TTL"):
        FeatureCache(CacheConfig(tiers=("redis",), redis_url=redis_server, redis_ttl_s=0))
