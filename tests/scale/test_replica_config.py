"""The settings of `vitedge serve --engine ray`, checked before any cluster starts."""

from __future__ import annotations

import os

import pytest

from vitedge.scale.cluster import check_fits
from vitedge.scale.replicas import ReplicaConfig, ingress_environment


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"replicas": 0}, "--replicas and --max-ongoing must be >= 1"),
        ({"max_ongoing": 0}, "--replicas and --max-ongoing must be >= 1"),
        ({"num_cpus": 0}, "--num-cpus must be >= 1"),
        ({"ingress": "nginx"}, "--ingress takes proxy or haproxy"),
        ({"ingress": "haproxy", "address": "auto"}, "needs the cluster started here"),
        ({"request_timeout_s": 0}, "--request-timeout-s must be > 0"),
    ],
)
def test_bad_settings_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ReplicaConfig(**fields)


def test_replicas_beyond_the_cpus_are_refused() -> None:
    check_fits(2, 1, 2.0, what="replicas", flag="--replicas")
    with pytest.raises(
        ValueError, match=r"3 replicas x 1 threads need 3 CPUs; the cluster has 2 \(lower --replicas"
    ):
        check_fits(3, 1, 2.0, what="replicas", flag="--replicas")


def test_haproxy_environment_carries_the_timeout_and_is_restored() -> None:
    before = dict(os.environ)
    with ingress_environment("haproxy", 7.2):
        assert os.environ["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"] == "8"  # whole seconds, rounded up
        assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert float(os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) < 30
    assert dict(os.environ) == before
    with ingress_environment("proxy", 7.2):
        assert "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S" not in os.environ
