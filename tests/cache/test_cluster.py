"""The distributed tier on a real Redis Cluster (three redis-server processes on loopback ports)."""

from __future__ import annotations

import shutil
import subprocess
import time
from typing import Any

import numpy as np
import pytest

from vitedge.cache.keys import content_digest
from vitedge.cache.store import CacheConfig, FeatureCache

NS = "d" * 64
CLUSTER_ARGS = (
    "--cluster-enabled", "yes",
    "--cluster-config-file", "nodes.conf",
    "--cluster-node-timeout", "1000",
    "--cluster-require-full-coverage", "no",
)  # fmt: skip


def feats(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((50, 32)).astype(np.float32)


def key(i: int) -> str:
    return content_digest(np.array([i]))


def _cluster(redis_procs: Any, n: int = 3) -> list[tuple[Any, int]]:
    import redis

    nodes = [redis_procs.start(*CLUSTER_ARGS) for _ in range(n)]
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is missing (Debian's redis-server package brings redis-tools)")
    addrs = [f"127.0.0.1:{port}" for _, port in nodes]
    subprocess.run(
        [cli, "--cluster", "create", *addrs, "--cluster-replicas", "0", "--cluster-yes"],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    # Every node must agree the cluster is up (slot maps converge through gossip, slower on a loaded machine).
    deadline = time.monotonic() + 60
    for _, port in nodes:
        client = redis.Redis(port=port)
        while client.cluster("info").get("cluster_state") != "ok":
            if time.monotonic() > deadline:
                pytest.fail(f"redis cluster node {port} did not reach cluster_state ok within 60 s")
            time.sleep(0.1)
        client.close()
    return nodes


def test_cluster_spreads_keys_and_survives_a_dead_node(redis_procs: Any) -> None:
    import redis

    nodes = _cluster(redis_procs)
    cfg = CacheConfig(tiers=("redis-cluster",), redis_url=f"redis://127.0.0.1:{nodes[0][1]}/0")
    n = 60
    with FeatureCache(cfg) as cache:
        stored = {i: cache.put(NS, key(i), feats(i)) for i in range(n)}
        per_node = [redis.Redis(port=port).dbsize() for _, port in nodes]
        assert sum(per_node) == n and min(per_node) > 0  # hash slots spread the keys
        assert cache.report()["redis-cluster"]["entries"] == n

        redis_procs.stop(nodes[1][0])  # one node dies mid-run
        t0 = time.perf_counter()
        served = lost = 0
        for i in range(n):
            got = cache.get(NS, key(i))  # never raises
            if got is None:
                lost += 1
            else:
                assert np.array_equal(got, stored[i])  # never a wrong feature
                served += 1
        cache.put(NS, key(n + 1), feats(n + 1))  # writes to the dead node's slots fail quietly
    assert lost == per_node[1] and served == n - per_node[1]
    assert time.perf_counter() - t0 < 60  # misses on the dead node come quickly
    print(
        f"cluster: {n} entries on {len(nodes)} nodes {per_node}; "
        f"one node stopped: {lost} lost, {served} served"
    )
