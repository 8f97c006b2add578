"""Real redis-server processes on free loopback ports, started and stopped by the tests themselves."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port(*, cluster: bool = False) -> int:
    """A free loopback port; for a cluster node also a free cluster-bus port (port + 10000 < 65536)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if not cluster:
            return port
        if port + 10000 < 65536:
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free loopback port pair for a redis cluster node")


def start_redis(workdir: Path, *extra: str) -> tuple[subprocess.Popen, int]:
    """Start ``redis-server`` on a free loopback port in ``workdir``; wait until it answers PING."""
    import redis

    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; 'make test' installs it (apt-get install redis-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port(cluster="--cluster-enabled" in extra)
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    args += ["--dir", str(workdir), *extra]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and proc.poll() is None:
        try:  # a plain socket: redis-py's own retries and backoff would make this loop slow
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                pass
        except OSError:
            time.sleep(0.05)
            continue
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=5)
        try:
            if client.ping():
                return proc, port
        except redis.exceptions.RedisError:
            time.sleep(0.05)
        finally:
            client.close()
    proc.kill()
    pytest.fail(f"redis-server on port {port} did not start")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisProcs:
    """Start and stop redis-server processes; all still running are stopped at teardown."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: list[subprocess.Popen] = []

    def start(self, *extra: str) -> tuple[subprocess.Popen, int]:
        proc, port = start_redis(self.root / f"r{len(self.procs)}", *extra)
        self.procs.append(proc)
        return proc, port

    stop = staticmethod(stop)


@pytest.fixture
def redis_procs(tmp_path: Path) -> Iterator[RedisProcs]:
    procs = RedisProcs(tmp_path / "redis-procs")
    try:
        yield procs
    finally:
        for p in procs.procs:
            stop(p)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[str]:
    """The URL of a fresh redis-server, stopped after the test."""
    proc, port = start_redis(tmp_path / "redis")
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop(proc)
