"""The encoder service in process (the app's lifespan runs: warm-up, worker thread) on real images: encode
and classify against the model run offline, concurrent requests batched, priorities, bad bodies, overload,
deadlines, metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import io

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as safetensors_load

from support import uvicorn_on_loopback
from vitedge.data import build_transform, decode_image_bytes, to_uint8_tensor
from vitedge.models import load
from vitedge.paths import data_root
from vitedge.serve.app import ServeConfig, create_app
from vitedge.serve.batcher import BatcherConfig


def photos(n: int) -> list[bytes]:
    return [p.read_bytes() for p in sorted((data_root() / "imagenet-sample").iterdir())[:n]]


@pytest.fixture(scope="module")
def served():
    enc = load("cifar-vit")
    app = create_app(enc, ServeConfig(batcher=BatcherConfig(max_batch=8, max_wait_ms=20)))
    with TestClient(app) as client:
        yield enc, client, app


def offline(enc, data: bytes) -> tuple[torch.Tensor, torch.Tensor]:
    x = build_transform(enc.preprocess).batch(to_uint8_tensor(decode_image_bytes(data, name="t")))[None]
    with torch.inference_mode():
        feats = enc.forward_features(x)
        return feats[0], enc.forward_head(feats)[0]


def test_health_and_readiness(served) -> None:
    _, client, _ = served
    assert client.get("/healthz").json() == {"status": "alive"}
    assert client.get("/readyz").json()["ready"] is True


def test_encode_and_classify_match_the_model_offline(served) -> None:
    enc, client, _ = served
    data = photos(1)[0]
    feats, logits = offline(enc, data)
    r = client.post("/v1/encode", content=data, headers={"Content-Type": "application/octet-stream"})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-safetensors"
    assert float(r.headers["X-Compute-Ms"]) > 0
    assert r.headers["X-Cache"] in ("miss", "memory")
    # the stored value format (fp16) is what a later hit returns, so hits and misses answer alike
    torch.testing.assert_close(safetensors_load(r.content)["features"], feats, atol=2e-2, rtol=1e-2)
    j = client.post("/v1/encode", content=data, headers={"Accept": "application/json"}).json()
    assert j["shape"] == list(feats.shape) and np.allclose(j["pooled"], feats.mean(0).numpy(), atol=2e-3)
    top = client.post("/v1/classify", files={"image": ("x.jpg", io.BytesIO(data), "image/jpeg")}).json()[
        "top"
    ]
    assert top[0]["index"] == int(logits.argmax()) and len(top) == 5
    assert top[0]["probability"] == pytest.approx(float(logits.softmax(-1).max()), abs=1e-5)


def test_a_repeated_image_is_served_from_the_cache(served) -> None:
    _, client, app = served
    data = photos(3)[2]
    first = client.post("/v1/encode", content=data)
    ran = app.state.worker.batches
    second = client.post("/v1/encode", content=data)
    assert first.headers["X-Cache"] == "miss" and second.headers["X-Cache"] == "memory"
    assert second.content == first.content  # the same bytes, hit or miss
    assert app.state.worker.batches == ran  # the hit never reached the model
    assert 'vitedge_cache_hits_total{tier="memory"}' in client.get("/metrics").text


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(served) -> None:
    enc, client, app = served
    images = photos(12)
    want = [offline(enc, d)[1].argmax().item() for d in images]
    before = app.state.worker.batches
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda d: client.post("/v1/classify", content=d).json(), images))
    assert [a["top"][0]["index"] for a in answers] == want
    sizes = app.state.worker.sizes_since(before)
    assert sum(sizes) <= 12 and max(sizes) > 1  # several images shared a forward


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"", 400, "empty"),
        (b"GIF89a not supported", 415, "not a JPEG, PNG or WebP"),
        (b"\xff\xd8\xff\xe0 truncated jpeg", 400, "corrupt or truncated"),
    ],
)
def test_bad_bodies_get_clear_errors(served, body: bytes, status: int, message: str) -> None:
    _, client, _ = served
    r = client.post("/v1/encode", content=body, headers={"Content-Type": "image/jpeg"})
    assert r.status_code == status and message in r.json()["error"]


def test_bad_headers_and_metrics(served) -> None:
    _, client, _ = served
    data = photos(1)[0]
    r = client.post("/v1/encode", content=data, headers={"X-Priority": "urgent"})
    assert r.status_code == 400 and "X-Priority" in r.json()["error"]
    assert client.post("/v1/encode", content=data, headers={"X-Priority": "realtime"}).status_code == 200
    text = client.get("/metrics").text
    assert 'vitedge_requests_total{code="200",route="encode"}' in text
    assert "vitedge_batch_size_bucket" in text and 'vitedge_queue_depth{priority="bulk"}' in text


def test_overload_deadlines_and_body_limits() -> None:
    enc = load("vit4mnist")
    config = ServeConfig(
        batcher=BatcherConfig(max_batch=1, max_wait_ms=0, queue_size=1),
        max_body_bytes=4096,
        max_pixels=10_000,
    )
    app = create_app(enc, config)
    png = io.BytesIO()
    from PIL import Image

    Image.new("L", (28, 28), 128).save(png, format="PNG")
    digit = png.getvalue()
    big = io.BytesIO()
    Image.new("L", (200, 200), 0).save(big, format="PNG")  # 40,000 pixels, a small file
    with TestClient(app) as client:
        assert client.post("/v1/encode", content=b"\x89PNG\r\n\x1a\n" + bytes(5000)).status_code == 413
        r = client.post("/v1/encode", content=big.getvalue())
        assert r.status_code == 413 and "over the limit of 10000" in r.json()["error"]
        r = client.post("/v1/encode", content=digit, headers={"X-Deadline-Ms": "0"})
        assert r.status_code == 504
    # a queue of one in front of a slower model, under a real uvicorn on a loopback port: a burst of 48
    # concurrent requests is partly refused with 429 and Retry-After, the rest answered, nothing else fails
    slow = create_app(load("timm:deit_tiny_patch16_224"), config)
    distinct = []  # identical images would be computed once (single flight) and never fill the queue
    for i in range(48):
        buf = io.BytesIO()
        Image.new("L", (28, 28), i).save(buf, format="PNG")
        distinct.append(buf.getvalue())
    with uvicorn_on_loopback(slow) as url:
        codes = asyncio.run(burst(url, distinct))
    statuses = [c for c, _ in codes]
    assert set(statuses) <= {200, 429} and 429 in statuses and 200 in statuses
    assert all(int(h["retry-after"]) >= 1 for c, h in codes if c == 429)


async def burst(url: str, bodies: list[bytes]) -> list[tuple[int, dict[str, str]]]:
    import httpx

    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        replies = await asyncio.gather(*(client.post("/v1/classify", content=b) for b in bodies))
    return [(r.status_code, dict(r.headers)) for r in replies]


def test_vitedge_serve_starts_answers_and_drains_on_sigterm() -> None:
    """The command a deployment runs: one JSON line when ready, real requests, exit 0 on SIGTERM."""
    import json
    import signal
    import subprocess
    import sys

    import httpx

    cmd = [sys.executable, "-m", "vitedge.cli", "serve", "vit4mnist", "--port", "0", "--json"]
    cmd = [sys.executable, "-c", "from vitedge.cli import main; main()", *cmd[3:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # type: ignore[union-attr]
        ready = json.loads(line)
        assert ready["model"] == "vit4mnist" and ready["url"].startswith("http://127.0.0.1:")
        batcher = ready["batcher"]  # --max-batch auto: the warm-up sweep's sweet spot
        assert batcher["auto"] and batcher["max_batch"] in [p["batch"] for p in batcher["sweep"]]
        assert httpx.get(f"{ready['url']}/readyz", timeout=10).json()["ready"] is True
        png = io.BytesIO()
        from PIL import Image

        Image.new("L", (28, 28), 200).save(png, format="PNG")
        r = httpx.post(f"{ready['url']}/v1/classify", content=png.getvalue(), timeout=30)
        assert r.status_code == 200 and len(r.json()["top"]) == 5
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0


def test_the_served_socket_sends_small_writes_at_once() -> None:
    import socket

    from vitedge.cli_cache import bind_socket

    with bind_socket("127.0.0.1", 0) as sock:  # Nagle off, or every answer waits ~40 ms for a delayed ACK
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
