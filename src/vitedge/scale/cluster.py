"""Joining a Ray cluster, or starting one on loopback for one job, for the bulk and the serving engines."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["LOOPBACK", "check_fits", "connected"]

LOOPBACK = "127.0.0.1"


@contextlib.contextmanager
def connected(address: str | None, *, num_cpus: int | None = None) -> Iterator[float]:
    """Connect to the cluster at ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``), or with None
    start a local one of ``num_cpus`` CPUs (default: this machine's cores) that listens on loopback only;
    yield its CPU count. A cluster this call joined or started is left (and a started one stopped) on exit;
    one this process was already connected to is kept."""
    import ray

    started = False
    if not ray.is_initialized():
        if address is None:
            ray.init(
                num_cpus=num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                log_to_driver=False,
                _node_ip_address=LOOPBACK,  # a cluster of this job only: nothing listens beyond loopback
            )
        else:
            ray.init(address=address, log_to_driver=False)
        started = True
    try:
        yield float(ray.cluster_resources().get("CPU", 1.0))
    finally:
        if started:
            ray.shutdown()


def check_fits(workers: int, threads: int, cpus: float, *, what: str, flag: str) -> None:
    """Refuse ``workers`` x ``threads`` CPUs beyond the cluster's ``cpus`` (Ray would wait for them forever).

    Raises:
        ValueError: they do not fit; the message names ``flag`` and ``--threads`` as the way out.
    """
    if workers * threads > cpus:
        raise ValueError(
            f"{workers} {what} x {threads} threads need {workers * threads} CPUs; the cluster has {cpus:g} "
            f"(lower {flag} or --threads)"
        )
