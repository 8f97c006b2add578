"""API keys: hashed key files, constant-time checks, 401 on the routes that do work, and no open service
beyond loopback without keys unless asked."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from vitedge.models import load
from vitedge.paths import data_root
from vitedge.serve.app import ServeConfig, create_app
from vitedge.serve.auth import KeyRing, check_bind, hash_key, is_loopback, presented_key


def write_keys(tmp_path: Path, *keys: str) -> Path:
    path = tmp_path / "keys.txt"
    lines = ["# hashed keys, one per line"] + [f"{hash_key(k)} app{i}" for i, k in enumerate(keys)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_the_key_file_holds_hashes_and_checks_find_the_label(tmp_path: Path) -> None:
    ring = KeyRing.from_file(write_keys(tmp_path, "alpha-secret", "beta-secret"))
    assert hash_key("alpha-secret") == "sha256:" + hashlib.sha256(b"alpha-secret").hexdigest()
    assert ring.check("beta-secret") == "app1" and ring.check("alpha-secret") == "app0"
    assert ring.check("alpha-secreT") is None and ring.check("") is None and ring.check(None) is None
    assert "alpha-secret" not in (tmp_path / "keys.txt").read_text()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("plain-text-key\n", "line 1 of .* is not a hashed key"),
        ("# only a comment\n", "holds no key"),
        ("sha256:abc\n", "not a hashed key"),
    ],
)
def test_bad_key_files_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        KeyRing.from_file(path)
    with pytest.raises(ValueError, match="does not exist"):
        KeyRing.from_file(tmp_path / "missing.txt")


def test_presented_keys_and_the_loopback_rule() -> None:
    assert presented_key("Bearer abc", None) == "abc" and presented_key(None, "xyz") == "xyz"
    assert presented_key("Basic abc", None) is None
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    with pytest.raises(ValueError, match="--api-key-file"):
        check_bind("0.0.0.0", keys=None, insecure=False)
    check_bind("0.0.0.0", keys=None, insecure=True)
    check_bind("127.0.0.1", keys=None, insecure=False)


def test_the_service_answers_401_without_the_right_key(tmp_path: Path) -> None:
    ring = KeyRing.from_file(write_keys(tmp_path, "s3cret"))
    app = create_app(load("cifar-vit"), ServeConfig(keys=ring, sweep_seconds=1))
    photo = sorted((data_root() / "imagenet-sample").iterdir())[0].read_bytes()
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"X-API-Key": "s3cre"}):
            r = client.post("/v1/classify", content=photo, headers=headers)
            assert r.status_code == 401 and "API key" in r.json()["error"]
            assert r.headers["www-authenticate"] == "Bearer"
        assert client.get("/metrics").status_code == 401
        assert client.post("/v1/classify", content=photo, headers={"X-API-Key": "s3cret"}).status_code == 200
        r = client.post("/v1/encode", content=photo, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200
        text = client.get("/metrics", headers={"X-API-Key": "s3cret"}).text
        assert 'vitedge_requests_total{code="401",route="classify"} 3.0' in text


def test_serve_refuses_an_open_non_loopback_bind() -> None:
    from typer.testing import CliRunner

    from vitedge.cli import app

    result = CliRunner().invoke(app, ["serve", "cifar-vit", "--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code != 0 and "--api-key-file" in result.output
