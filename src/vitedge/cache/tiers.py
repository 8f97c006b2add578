"""Byte stores behind the feature cache: memory (in process), disk (diskcache), Redis (or Redis Cluster).

Tiers hold encoded entries (:mod:`vitedge.cache.codec`) and know nothing of tensors; verification happens in
:class:`vitedge.cache.store.FeatureCache`. Every tier keeps a registry of the namespaces it holds (digest ->
the namespace JSON) so that ``vitedge cache invalidate --model ID`` can find them, and drops a namespace by
key prefix. A remote tier that fails answers "miss" and logs a warning; it never raises into the caller.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

from vitedge.cache.keys import KEY_PREFIX, namespace_prefix
from vitedge.cache.policy import EvictionPolicy, ImportanceLRUK
from vitedge.cache.uniqueness import NearDuplicateIndex, Signature

__all__ = ["DEFAULT_REDIS_URL", "DiskTier", "MemoryTier", "RedisTier", "Tier", "redis_url"]

log = logging.getLogger(__name__)

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
# The registry of namespaces a tier holds (digest -> namespace JSON); versioned, so a change of its layout
# never misreads an old one. Version 2: every config field and its algorithm version in the namespace JSON.
REGISTRY_VERSION = 2
_REGISTRY = f"{KEY_PREFIX}:namespaces:v{REGISTRY_VERSION}"


def redis_url(url: str | None = None) -> str:
    """``url``, else ``$VITEDGE_REDIS_URL``, else the default; checked to be a redis URL.

    Raises:
        ValueError: the URL is not ``redis://``, ``rediss://`` or ``unix://`` with a host or path.
    """
    url = url or os.environ.get("VITEDGE_REDIS_URL") or DEFAULT_REDIS_URL
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss", "unix") or not (parsed.hostname or parsed.path):
        raise ValueError(
            f"bad Redis URL {url!r}; expected redis://HOST:PORT/DB, rediss://... or unix:///path.sock"
        )
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError(f"bad Redis URL {url!r}: the port is not a number in 0..65535") from None
    return url


class Tier(Protocol):
    name: str

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, blob: bytes, *, namespace: str, cost: float = 1.0) -> None: ...
    def discard(self, key: str) -> None: ...
    def register(self, namespace: str, meta: dict[str, Any]) -> None: ...
    def namespaces(self) -> dict[str, dict[str, Any]]: ...
    def drop_namespace(self, namespace: str) -> int: ...
    def info(self) -> dict[str, Any]: ...


class MemoryTier:
    """In-process entries under a byte budget, evicted by a policy (default :class:`ImportanceLRUK`).

    Above the soft watermark (80 % of the budget) a background thread evicts down to ``target`` (70 %); an
    insert that would pass the hard watermark (95 %) evicts synchronously first. When full, the policy's
    admission test may decline a new entry (it is then simply not cached here).
    """

    name = "memory"

    def __init__(
        self,
        budget_bytes: int = 256 << 20,
        *,
        policy: EvictionPolicy | None = None,
        soft: float = 0.80,
        hard: float = 0.95,
        target: float = 0.70,
    ) -> None:
        if budget_bytes < 1:
            raise ValueError(f"memory budget must be a positive number of bytes, got {budget_bytes}")
        if not 0 < target <= soft <= hard <= 1:
            raise ValueError(f"need 0 < target <= soft <= hard <= 1, got {target}, {soft}, {hard}")
        self.budget = int(budget_bytes)
        self.soft, self.hard, self.target = soft, hard, target
        self.policy = policy or ImportanceLRUK()
        self._data: dict[str, bytes] = {}
        self._ns_of: dict[str, str] = {}
        self._registry: dict[str, dict[str, Any]] = {}
        self._used = 0
        self._dups = NearDuplicateIndex()
        self._lock = threading.RLock()
        self._wake = threading.Event()
        self._evictor: threading.Thread | None = None
        self.evicted = 0
        self.background_evictions = 0

    @property
    def used_bytes(self) -> int:
        return self._used

    def get(self, key: str) -> bytes | None:
        with self._lock:
            self.policy.on_access(key)
            return self._data.get(key)

    def peek(self, key: str) -> bool:
        return key in self._data

    def put(
        self,
        key: str,
        blob: bytes,
        *,
        namespace: str,
        cost: float = 1.0,
        prefetched: bool = False,
        signature: Signature | None = None,
    ) -> None:
        """Store ``blob``; ``signature`` (LSH buckets of the feature) feeds the policy's uniqueness term."""
        size = len(blob)
        if size > self.hard * self.budget:
            return
        with self._lock:
            if key in self._data:
                return
            limit = self.hard * self.budget
            if self._used + size > limit:
                if not prefetched and not self.policy.admit(key, int(self._used + size - limit)):
                    return
                self._evict_to(min(self.target * self.budget, limit - size))
            self._data[key] = blob
            self._ns_of[key] = namespace
            self._used += size
            changed = self._dups.add(key, signature) if signature is not None else {}
            self.policy.on_insert(
                key, size, cost=cost, uniqueness=changed.pop(key, 1.0), prefetched=prefetched
            )
            self._set_uniqueness(changed)
            if self._used > self.soft * self.budget:
                self._start_evictor()
                self._wake.set()

    def _evict_to(self, level: float) -> None:
        with self._lock:
            excess = int(self._used - level)
            if excess <= 0:
                return
            for victim in self.policy.victims(excess):
                self._remove(str(victim))

    def _remove(self, key: str) -> None:
        blob = self._data.pop(key, None)
        self._ns_of.pop(key, None)
        if blob is not None:
            self._used -= len(blob)
            self.evicted += 1
        self.policy.on_remove(key)
        self._set_uniqueness(self._dups.remove(key))

    def _set_uniqueness(self, changed: dict[Any, float]) -> None:
        update = getattr(self.policy, "set_uniqueness", None)  # policies without the term ignore it
        if update is not None:
            for k, u in changed.items():
                update(k, u)

    def _start_evictor(self) -> None:
        if self._evictor is None:
            self._evictor = threading.Thread(target=self._evict_loop, name="vitedge-cache-evict", daemon=True)
            self._evictor.start()

    def _evict_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._used > self.soft * self.budget:
                self._evict_to(self.target * self.budget)
                self.background_evictions += 1

    def discard(self, key: str) -> None:
        with self._lock:
            if key in self._data:
                self._remove(key)

    def register(self, namespace: str, meta: dict[str, Any]) -> None:
        self._registry[namespace] = meta

    def namespaces(self) -> dict[str, dict[str, Any]]:
        return dict(self._registry)

    def drop_namespace(self, namespace: str) -> int:
        with self._lock:
            keys = [k for k, ns in self._ns_of.items() if ns == namespace]
            for k in keys:
                self._remove(k)
            self._registry.pop(namespace, None)
            return len(keys)

    def info(self) -> dict[str, Any]:
        return {"entries": len(self._data), "bytes": self._used, "budget_bytes": self.budget}


class TamperedEntry(ValueError):
    """A disk-cache row that asks to be unpickled: vitedge never writes one, so the file was changed."""


def _bytes_only_disk() -> type:
    """A ``diskcache.Disk`` that stores and reads str keys and bytes/str values only, and refuses every
    pickled key or value: ``diskcache`` unpickles rows whose mode says so, and a tampered ``cache.db`` must
    not run code."""
    import diskcache
    from diskcache.core import MODE_PICKLE

    class BytesOnlyDisk(diskcache.Disk):  # type: ignore[misc]
        def put(self, key: Any) -> Any:
            if not isinstance(key, str):
                raise TypeError(f"disk-cache keys are str, got {type(key).__name__}")
            return super().put(key)

        def get(self, key: Any, raw: bool) -> Any:
            if not raw:
                raise TamperedEntry("a disk-cache key is stored pickled")
            return super().get(key, raw)

        def store(self, value: Any, read: bool, key: Any = diskcache.core.UNKNOWN) -> Any:
            if not read and not isinstance(value, bytes | str):
                raise TypeError(f"disk-cache values are bytes or str, got {type(value).__name__}")
            return super().store(value, read, key=key)

        def fetch(self, mode: int, filename: Any, value: Any, read: bool) -> Any:
            if mode == MODE_PICKLE:
                raise TamperedEntry("a disk-cache value is stored pickled")
            return super().fetch(mode, filename, value, read)

    return BytesOnlyDisk


class DiskTier:
    """Entries in a local ``diskcache`` folder (SQLite index plus files, crash-safe, shared by processes).

    Each entry is tagged with its namespace so a namespace drops in one indexed query. The disk tier's own
    size limit evicts least-recently-stored entries. Only bytes and str go in and out: a row that asks to be
    unpickled (a tampered ``cache.db``) is a miss, logged and deleted, never unpickled.
    """

    name = "disk"

    def __init__(self, directory: str | Path, *, size_limit: int = 8 << 30) -> None:
        import diskcache

        directory = Path(directory).expanduser()
        if directory.exists() and not directory.is_dir():
            raise ValueError(f"disk cache path {directory} exists and is not a folder")
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"cannot create the disk cache folder {directory}: {e}") from None
        self.directory = directory
        self._cache = diskcache.Cache(
            str(directory),
            size_limit=size_limit,
            eviction_policy="least-recently-stored",
            disk=_bytes_only_disk(),
        )

    def get(self, key: str) -> bytes | None:
        try:
            value = self._cache.get(key, default=None, retry=True)
        except TamperedEntry as e:
            log.warning("disk cache %s: %s under %s; dropped, never unpickled", self.directory, e, key)
            self._cache.delete(key, retry=True)
            return None
        return value if isinstance(value, bytes) else None

    def put(self, key: str, blob: bytes, *, namespace: str, cost: float = 1.0) -> None:
        self._cache.set(key, blob, tag=namespace, retry=True)

    def discard(self, key: str) -> None:
        self._cache.delete(key, retry=True)

    def register(self, namespace: str, meta: dict[str, Any]) -> None:
        with self._cache.transact(retry=True):  # one JSON object under one key: read without a scan
            registry = self.namespaces()
            registry[namespace] = meta
            self._cache.set(_REGISTRY, json.dumps(registry), tag="registry", retry=True)

    def namespaces(self) -> dict[str, dict[str, Any]]:
        try:
            raw = self._cache.get(_REGISTRY, default=None, retry=True)
        except TamperedEntry as e:
            log.warning("disk cache %s: %s; its namespace registry is not read", self.directory, e)
            return {}
        return json.loads(raw) if isinstance(raw, str) else {}

    def drop_namespace(self, namespace: str) -> int:
        namespace_prefix(namespace)  # validates the digest
        self._cache.create_tag_index()
        n = int(self._cache.evict(namespace, retry=True))
        with self._cache.transact(retry=True):
            registry = self.namespaces()
            if registry.pop(namespace, None) is not None:
                self._cache.set(_REGISTRY, json.dumps(registry), tag="registry", retry=True)
        return n

    def info(self) -> dict[str, Any]:
        # len() is one SQL count, volume() one page count: no walk over the entries
        entries = len(self._cache) - (1 if _REGISTRY in self._cache else 0)
        return {"entries": entries, "bytes": int(self._cache.volume()), "path": str(self.directory)}

    def close(self) -> None:
        self._cache.close()


class RedisTier:
    """Entries in Redis (``cluster=True``: a Redis Cluster through redis-py's cluster client).

    Any Redis error makes the operation a miss (or a skipped write) and logs a warning; a single server that
    stops answering is not asked again for ``retry_after`` seconds, so the local tiers keep their speed.

    ``ttl_s`` expires every entry that long after it is written. ``max_bytes`` bounds the server's memory
    with its own LRU (``CONFIG SET maxmemory``, ``maxmemory-policy allkeys-lru``), which applies to the
    whole server: give vitedge a server (or database) of its own. A server that refuses ``CONFIG`` (managed
    Redis) keeps its own settings, with a warning. ``info`` reads counts without scanning keys: ``entries``
    is the database's key count (``DBSIZE``) less the registry.
    """

    name = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        cluster: bool = False,
        ttl_s: int | None = None,
        max_bytes: int | None = None,
        timeout_s: float = 0.5,
        retry_after: float = 5.0,
    ) -> None:
        if ttl_s is not None and ttl_s < 1:
            raise ValueError(f"the Redis TTL is a whole number of seconds >= 1, got {ttl_s}")
        if max_bytes is not None and max_bytes < 1 << 20:
            raise ValueError(f"the Redis size bound must be at least 1 MiB, got {max_bytes} bytes")
        import redis
        from redis.cluster import RedisCluster

        self.url = redis_url(url)
        self.cluster = cluster
        self.ttl_s = ttl_s
        self.retry_after = retry_after
        self._down_until = 0.0
        self._errors = redis.exceptions.RedisError
        self.errors = 0
        opts: dict[str, Any] = {"socket_timeout": timeout_s, "socket_connect_timeout": timeout_s}
        self.name = "redis-cluster" if cluster else "redis"
        try:
            if cluster:
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                # Fail fast on a dead node: one retry, no backoff; its keys become misses.
                self._client: Any = RedisCluster.from_url(self.url, retry=Retry(NoBackoff(), 1), **opts)
            else:
                self._client = redis.Redis.from_url(self.url, **opts)
        except self._errors as e:
            raise ValueError(f"cannot reach Redis at {self.url}: {e}") from None
        self.max_bytes = max_bytes
        if max_bytes is not None:
            self._bound(max_bytes)

    def _bound(self, max_bytes: int) -> None:
        try:
            self._client.config_set("maxmemory", str(max_bytes))
            self._client.config_set("maxmemory-policy", "allkeys-lru")
        except self._errors as e:
            log.warning("Redis at %s refused CONFIG SET maxmemory (%s); it keeps its own bound", self.url, e)

    def _call(self, what: str, fn: Any, default: Any) -> Any:
        if not self.cluster and time.monotonic() < self._down_until:
            return default
        try:
            return fn()
        except self._errors as e:
            self.errors += 1
            if not self.cluster:
                self._down_until = time.monotonic() + self.retry_after
            log.warning("Redis %s at %s failed (%s); serving from the local tiers", what, self.url, e)
            return default

    def get(self, key: str) -> bytes | None:
        value = self._call("get", lambda: self._client.get(key), None)
        return value if isinstance(value, bytes) else None

    def put(self, key: str, blob: bytes, *, namespace: str, cost: float = 1.0) -> None:
        self._call("set", lambda: self._client.set(key, blob, ex=self.ttl_s), None)

    def discard(self, key: str) -> None:
        self._call("delete", lambda: self._client.delete(key), None)

    def register(self, namespace: str, meta: dict[str, Any]) -> None:
        self._call("hset", lambda: self._client.hset(_REGISTRY, namespace, json.dumps(meta)), None)

    def namespaces(self) -> dict[str, dict[str, Any]]:
        raw = self._call("hgetall", lambda: self._client.hgetall(_REGISTRY), {}) or {}
        return {k.decode(): json.loads(v) for k, v in raw.items()}

    def _keys(self, match: str) -> list[bytes]:
        return list(self._client.scan_iter(match=match, count=1000))

    def drop_namespace(self, namespace: str) -> int:
        match = namespace_prefix(namespace) + "*"

        def drop() -> int:
            n = 0
            for key in self._keys(match):
                n += int(self._client.delete(key))
            self._client.hdel(_REGISTRY, namespace)
            return n

        return int(self._call("invalidate", drop, 0))

    def count(self) -> int:
        """The feature entries, counted exactly by scanning their keys (slow on a large server)."""
        return len(self._call("scan", lambda: self._keys(f"{KEY_PREFIX}:*:*"), []))

    def info(self) -> dict[str, Any]:
        out: dict[str, Any] = {"url": self.url, "cluster": self.cluster, "errors": self.errors}

        def counts() -> tuple[int, int]:
            if self.cluster:  # summed over the primaries (a plain DBSIZE asks one node)
                from redis.cluster import RedisCluster

                keys = int(self._client.dbsize(target_nodes=RedisCluster.PRIMARIES))
            else:
                keys = int(self._client.dbsize())
            return keys - int(self._client.exists(_REGISTRY)), keys

        got = self._call("dbsize", counts, None)
        out["available"] = got is not None
        out["entries"] = None if got is None else got[0]
        out["ttl_s"] = self.ttl_s
        out["max_bytes"] = self.max_bytes
        return out

    def ping(self) -> bool:
        return bool(self._call("ping", lambda: self._client.ping(), False))

    def close(self) -> None:
        with contextlib.suppress(self._errors):
            self._client.close()
