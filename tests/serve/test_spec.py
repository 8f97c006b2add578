"""ServiceSpec: the JSON a service (and every Ray Serve replica of it) is built from."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from vitedge.serve.auth import KeyRing, hash_key
from vitedge.serve.spec import ServiceSpec


def test_json_round_trip_through_text() -> None:
    spec = ServiceSpec(
        model="cifar-vit",
        opts=("merge:r=5",),
        img_sizes=(32, 24),
        max_batch=8,
        cache="memory,redis",
        keys=(f"{hash_key('secret')} app",),
    )
    again = ServiceSpec.from_json(json.loads(json.dumps(spec.to_json())))
    assert again == spec


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_batch": 0}, "max_batch must be >= 1"),
        ({"threads": 0}, "threads must be >= 1"),
        ({"img_sizes": (32, 32)}, "distinct positive sizes"),
    ],
)
def test_bad_values_are_named(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServiceSpec(model="cifar-vit", **fields)


def test_unknown_keys_are_refused_not_ignored() -> None:
    with pytest.raises(ValueError, match="unknown service spec keys: max_batchs"):
        ServiceSpec.from_json({"model": "cifar-vit", "max_batchs": 4})


def test_built_service_names_its_replica_and_checks_keys(tmp_path) -> None:
    key_file = tmp_path / "keys.txt"
    key_file.write_text(f"{hash_key('secret')} app\n")
    lines = tuple(KeyRing.from_file(key_file).lines())
    spec = ServiceSpec(model="vit4mnist", max_batch=2, keys=lines, replica="r1", sweep_seconds=1)
    with TestClient(spec.build()) as client:
        ready = client.get("/readyz").json()
        assert ready["replica"] == "r1" and ready["max_batch"] == 2
        refused = client.post("/v1/encode", content=b"\x89PNG\r\n\x1a\n")
        assert refused.status_code == 401 and refused.headers["x-replica"] == "r1"
