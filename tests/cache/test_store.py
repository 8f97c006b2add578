"""Keys, the value codec, and the memory/disk tiers behind the read-through FeatureCache."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from vitedge.cache import codec
from vitedge.cache.keys import Namespace, content_digest, entry_key
from vitedge.cache.store import CacheConfig, FeatureCache
from vitedge.cache.tiers import DiskTier, MemoryTier, redis_url

NS = "a" * 64
NS2 = "b" * 64


def feats(seed: int, n: int = 197, d: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


def content(i: int) -> str:
    return content_digest(np.full((3, 8, 8), i % 256, dtype=np.uint8) + np.uint8(i // 256))


def test_digests_are_full_length_and_shape_sensitive() -> None:
    a = np.zeros((3, 4, 4), np.uint8)
    assert len(content_digest(a)) == 64
    assert content_digest(a) != content_digest(a.reshape(3, 2, 8))
    assert content_digest(a) != content_digest(a[:, :, ::-1].copy() + 1)
    ns = Namespace(model_id="m", weights_digest="w", preprocess={}, configs=(), version="0")
    assert len(ns.digest) == 64
    assert (
        ns.digest
        != Namespace(model_id="m", weights_digest="w2", preprocess={}, configs=(), version="0").digest
    )
    with pytest.raises(ValueError, match="64 lowercase hex"):
        entry_key(NS, "abc")


@pytest.mark.parametrize("fmt,tol", [("fp16", 2e-3), ("int8", 3e-2)])
def test_codec_round_trip(fmt: str, tol: float) -> None:
    x = feats(0)
    key = entry_key(NS, content(1))
    blob = codec.encode(x, namespace=NS, key=key, fmt=fmt)
    assert blob.startswith(codec.MAGIC)  # the self-describing header, no pickle frame
    y = codec.decode(blob, namespace=NS, key=key)
    assert y.shape == x.shape and np.abs(y - x).max() < tol * np.abs(x).max() * 2


def test_codec_rejects_tampering() -> None:
    key = entry_key(NS, content(1))
    blob = codec.encode(feats(0), namespace=NS, key=key)
    with pytest.raises(codec.CorruptEntry, match="namespace"):
        codec.decode(blob, namespace=NS2, key=key)
    with pytest.raises(codec.CorruptEntry, match="another key"):
        codec.decode(blob, namespace=NS, key=entry_key(NS, content(2)))
    with pytest.raises(codec.CorruptEntry):
        codec.decode(blob[:-10], namespace=NS, key=key)
    flipped = bytearray(blob)
    flipped[-5] ^= 0xFF
    with pytest.raises(codec.CorruptEntry, match="checksum"):
        codec.decode(bytes(flipped), namespace=NS, key=key)
    with pytest.raises(codec.CorruptEntry):
        codec.decode(b"garbage", namespace=NS, key=key)


def test_memory_tier_watermarks_and_budget() -> None:
    blob_size = len(codec.encode(feats(0), namespace=NS, key=entry_key(NS, content(0))))
    mem = MemoryTier(budget_bytes=blob_size * 10)
    cache = FeatureCache(CacheConfig(tiers=("memory",)), tiers=[mem])
    for i in range(30):
        cache.put(NS, content(i), feats(i))
        assert mem.used_bytes <= mem.hard * mem.budget
    deadline = time.monotonic() + 10  # the background evictor brings it under the soft watermark
    while mem.used_bytes > mem.soft * mem.budget and time.monotonic() < deadline:
        time.sleep(0.01)
    assert mem.used_bytes <= mem.soft * mem.budget
    assert mem.evicted > 0


def test_read_through_promotes_and_counts(tmp_path: Path) -> None:
    cfg = CacheConfig(tiers=("memory", "disk"), disk_dir=str(tmp_path / "d"))
    with FeatureCache(cfg) as writer:
        stored = writer.put(NS, content(7), feats(7))
    with FeatureCache(cfg) as reader:
        got = reader.get(NS, content(7))
        assert got is not None and np.array_equal(got, stored)
        assert reader.stats["memory"].misses == 1 and reader.stats["disk"].hits == 1
        assert reader.get(NS, content(7)) is not None
        assert reader.stats["memory"].hits == 1
        assert reader.get(NS2, content(7)) is None  # another namespace never hits
        assert reader.lookup(NS, content(7))[1] == "memory" and reader.lookup(NS2, content(7)) == (None, None)
        rep = reader.report()
        assert rep["disk"]["entries"] >= 1 and rep["memory"]["bytes_read"] > 0


def test_invalidate_drops_only_that_namespace(tmp_path: Path) -> None:
    cfg = CacheConfig(tiers=("memory", "disk"), disk_dir=str(tmp_path / "d"))
    with FeatureCache(cfg) as cache:
        cache.register(NS, {"model_id": "m1"})
        cache.register(NS2, {"model_id": "m2"})
        for i in range(3):
            cache.put(NS, content(i), feats(i))
            cache.put(NS2, content(i), feats(i))
        assert cache.drop_namespace(NS) == {"memory": 3, "disk": 3}
        assert cache.get(NS, content(0)) is None
        assert cache.get(NS2, content(0)) is not None
        assert set(cache.namespaces()) == {NS2}


def _value_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*.val")]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_corrupt_disk_entry_is_a_miss(tmp_path: Path, damage: str) -> None:
    cfg = CacheConfig(tiers=("disk",), disk_dir=str(tmp_path / "d"))
    with FeatureCache(cfg) as cache:
        cache.put(NS, content(1), feats(1, d=192))  # 75 KB: stored in a file by diskcache
        cache.put(NS, content(2), feats(2, n=8))  # small: stored inside SQLite
    files = _value_files(tmp_path / "d")
    assert len(files) == 1
    data = files[0].read_bytes()
    files[0].write_bytes(
        data[: len(data) // 2] if damage == "truncate" else data[:-1] + bytes([data[-1] ^ 1])
    )
    with FeatureCache(cfg) as cache:
        assert cache.get(NS, content(1)) is None
        assert cache.stats["disk"].corrupt == 1
        assert cache.get(NS, content(2)) is not None
        assert cache.get(NS, content(1)) is None  # dropped, now a plain miss
        assert cache.stats["disk"].corrupt == 1


def test_misfiled_entry_is_rejected(tmp_path: Path) -> None:
    disk = DiskTier(tmp_path / "d")
    other = codec.encode(feats(3), namespace=NS2, key=entry_key(NS2, content(3)))
    disk.put(entry_key(NS, content(3)), other, namespace=NS)  # a wrong value under the right key
    cache = FeatureCache(CacheConfig(tiers=("disk",)), tiers=[disk])
    assert cache.get(NS, content(3)) is None and cache.stats["disk"].corrupt == 1


class _Plant:
    """Unpickling this writes a file: proof that a pickled row ran code."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_a_tampered_disk_row_is_never_unpickled(tmp_path: Path) -> None:
    """diskcache unpickles rows whose mode says 'pickle'; a tampered cache.db must be a miss, not code."""
    import pickle
    import sqlite3

    from diskcache.core import MODE_PICKLE

    disk = DiskTier(tmp_path / "d")
    key = entry_key(NS, content(7))
    disk.put(key, codec.encode(feats(7), namespace=NS, key=key), namespace=NS)
    disk.register(NS, {"model_id": "m"})
    disk.close()
    planted = tmp_path / "planted"
    db = sqlite3.connect(str(tmp_path / "d" / "cache.db"))
    payload = pickle.dumps(_Plant(str(planted)))
    db.execute("UPDATE Cache SET mode = ?, value = ? WHERE key = ?", (MODE_PICKLE, payload, key))
    db.commit()
    db.close()
    again = DiskTier(tmp_path / "d")
    assert again.get(key) is None and not planted.exists()  # a miss; nothing ran
    assert again.get(key) is None and again.info()["entries"] == 0  # dropped (the registry is not an entry)
    assert NS in again.namespaces()
    with pytest.raises(TypeError, match="bytes or str"):
        again.put(entry_key(NS, content(8)), {"not": "bytes"}, namespace=NS)  # type: ignore[arg-type]


_WRITER = """
import sys, numpy as np
from vitedge.cache.store import CacheConfig, FeatureCache
from vitedge.cache.keys import content_digest
cache = FeatureCache(CacheConfig(tiers=("disk",), disk_dir=sys.argv[1]))
ns = sys.argv[2]
i = 0
while True:
    x = np.random.default_rng(i).standard_normal((197, 192)).astype(np.float32)
    cache.put(ns, content_digest(np.array([i])), x)
    i += 1
    if i == 3:
        print("ready", flush=True)
"""


def test_sigkill_mid_write_never_serves_a_partial_entry(tmp_path: Path) -> None:
    d = tmp_path / "d"
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(d), NS], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with FeatureCache(CacheConfig(tiers=("disk",), disk_dir=str(d))) as cache:
        served = 0
        for i in range(2000):
            got = cache.get(NS, content_digest(np.array([i])))
            if got is None:
                continue
            served += 1
            want = np.random.default_rng(i).standard_normal((197, 192)).astype(np.float32).astype(np.float16)
            assert np.array_equal(got, want.astype(np.float32))
        assert served >= 3 and cache.stats["disk"].corrupt == 0


_OVERLAPPING_WRITER = """
import sys, numpy as np
from vitedge.cache.store import CacheConfig, FeatureCache
from vitedge.cache.keys import content_digest
d, ns, worker = sys.argv[1], sys.argv[2], int(sys.argv[3])
with FeatureCache(CacheConfig(tiers=("disk",), disk_dir=d)) as cache:
    for i in range(40):
        key = (i * 7 + worker) % 25  # writers overlap on the same keys
        x = np.random.default_rng(key).standard_normal((50, 64)).astype(np.float32)
        cache.put(ns, content_digest(np.array([key])), x)
"""


def test_concurrent_writers_stay_consistent(tmp_path: Path) -> None:
    d = str(tmp_path / "d")
    procs = [subprocess.Popen([sys.executable, "-c", _OVERLAPPING_WRITER, d, NS, str(w)]) for w in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    with FeatureCache(CacheConfig(tiers=("disk",), disk_dir=d)) as cache:
        for key in range(25):
            got = cache.get(NS, content_digest(np.array([key])))
            assert got is not None
            assert np.array_equal(got, feats(key, n=50).astype(np.float16).astype(np.float32))
        assert cache.stats["disk"].corrupt == 0


def test_config_errors_name_the_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match="unknown cache tier 'ssd'"):
        CacheConfig.parse("memory,ssd")
    with pytest.raises(ValueError, match="fp32"):
        CacheConfig(value_format="fp32")
    with pytest.raises(ValueError, match="bad Redis URL 'http://x'"):
        redis_url("http://x")
    monkeypatch.setenv("VITEDGE_REDIS_URL", "redis://127.0.0.1:notaport/0")
    with pytest.raises(ValueError, match="port"):
        redis_url()
