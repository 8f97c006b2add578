"""The service as a deployment runs it: a client that disconnects, several input sizes, the warm-up's batch
choice within the memory plan, the Python client, and two `vitedge serve` processes sharing a real Redis."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import threading
import time

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from support import start_serve, uvicorn_on_loopback
from vitedge.measure.memory import plan_batch
from vitedge.models import load
from vitedge.paths import data_root
from vitedge.serve import Client, ServiceError
from vitedge.serve.app import ServeConfig, create_app
from vitedge.serve.batcher import BatcherConfig


def png(value: int, size: int = 28) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (value, 255 - value, value // 2)).save(buf, format="PNG")
    return buf.getvalue()


def photo(i: int = 0) -> bytes:
    return sorted((data_root() / "imagenet-sample").iterdir())[i].read_bytes()


def test_a_client_that_disconnects_has_its_queued_work_dropped() -> None:
    config = ServeConfig(batcher=BatcherConfig(max_batch=1, max_wait_ms=0), sweep_seconds=1, cache=None)
    app = create_app(load("timm:deit_tiny_patch16_224"), config)
    worker = app.state.worker
    with uvicorn_on_loopback(app) as url:
        port = int(url.rsplit(":", 1)[1])

        async def queue_ahead() -> list[int]:
            import httpx

            async with httpx.AsyncClient(base_url=url, timeout=120) as client:
                posts = [
                    client.post("/v1/classify", content=png(i), headers={"X-Priority": "bulk"})
                    for i in range(24)
                ]
                return [r.status_code for r in await asyncio.gather(*posts)]

        ahead: list[int] = []
        runner = threading.Thread(target=lambda: ahead.extend(asyncio.run(queue_ahead())))
        runner.start()
        time.sleep(0.3)  # the 24 are queued behind one another (batch 1, ~30 ms each)
        body = png(250)
        with socket.create_connection(("127.0.0.1", port)) as raw:
            head = (
                f"POST /v1/classify HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Priority: bulk\r\n"
                f"Content-Length: {len(body)}\r\n\r\n"
            )
            raw.sendall(head.encode() + body)
            time.sleep(0.1)  # admitted and queued last; then the client goes away
        runner.join(120)
        deadline = time.monotonic() + 10
        while worker.depth()["bulk"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ahead == [200] * 24
        assert worker.cancelled == 1 and worker.images == 24  # the 25th never ran
        import httpx

        assert 'vitedge_requests_total{code="499",route="classify"} 1.0' in httpx.get(f"{url}/metrics").text


def test_requests_are_served_at_their_bucket_size() -> None:
    encoders = {
        (224, 224): load("timm:deit_tiny_patch16_224"),
        (160, 160): load("timm:deit_tiny_patch16_224", img_size=160),
    }
    app = create_app(encoders, ServeConfig(sweep_seconds=1))
    small = png(10, size=100)
    large = png(20, size=300)
    with TestClient(app) as client:

        def shape(body: bytes, **headers: str) -> tuple[list[int], str]:
            r = client.post("/v1/encode", content=body, headers={"Accept": "application/json", **headers})
            assert r.status_code == 200, r.text
            return r.json()["shape"], r.headers["X-Img-Size"]

        assert shape(small) == ([101, 192], "160x160")  # the smallest size that covers a 100 px image
        assert shape(large) == ([197, 192], "224x224")
        assert shape(small, **{"X-Img-Size": "224"}) == ([197, 192], "224x224")
        r = client.post("/v1/encode", content=small, headers={"X-Img-Size": "96"})
        assert r.status_code == 400 and "224x224, 160x160" in r.json()["error"]


def test_auto_batch_is_the_sweep_sweet_spot_within_the_memory_plan() -> None:
    enc = load("cifar-vit")
    roomy = ServeConfig(batcher=BatcherConfig(max_batch=16), auto_batch=True, sweep_seconds=10)
    app = create_app(enc, roomy)
    with TestClient(app) as client:
        worker = app.state.worker
        sweep = {p.batch: p.images_per_s for p in worker.sweep}
        assert list(sweep) == [1, 2, 4, 8, 16]
        best = max(sweep.values())
        assert worker.max_batch == min(n for n, ips in sweep.items() if ips >= 0.95 * best)
        assert client.get("/readyz").json()["max_batch"] == worker.max_batch
    spec = enc.arch()
    per_image = plan_batch(spec, budget_bytes="4GiB").activation_bytes_per_image
    fixed = (
        plan_batch(spec, budget_bytes="4GiB").total_bytes
        - plan_batch(spec, budget_bytes="4GiB").activation_bytes
    )
    budget = fixed + 5 * per_image
    limit = plan_batch(spec, budget_bytes=budget).max_batch
    assert 2 <= limit < 16
    tight = create_app(
        enc, ServeConfig(batcher=BatcherConfig(max_batch=16), auto_batch=True, memory_budget=budget)
    )
    assert tight.state.worker.batcher.config.max_batch == limit
    with pytest.raises(ValueError, match="does not fit the memory budget"):
        create_app(enc, ServeConfig(auto_batch=True, memory_budget="512MiB"))


def test_the_python_client() -> None:
    enc = load("cifar-vit")
    with torch.inference_mode():
        want = tuple(enc.forward_features(enc.example_input(1)).shape[1:])  # (N, D)
    app = create_app(enc, ServeConfig(sweep_seconds=1))
    image = photo(3)
    with uvicorn_on_loopback(app) as url, Client(url) as client:
        assert client.ready()
        out = client.encode(image, priority="realtime")
        again = client.encode(image)
        assert out.cache == "miss" and again.cache == "memory" and out.compute_ms > 0
        assert out.features.shape == want
        np.testing.assert_array_equal(out.features, again.features)
        top = client.classify(image)
        import httpx

        assert top == httpx.post(f"{url}/v1/classify", content=image, timeout=30).json()["top"]
        pixels = np.asarray(Image.open(io.BytesIO(image)).convert("RGB"))
        assert client.classify(pixels)[0]["index"] == top[0]["index"]  # an array is sent as PNG, losslessly
        with pytest.raises(ServiceError) as e:
            client.encode(b"GIF89a")
        assert e.value.status == 415 and "JPEG, PNG or WebP" in e.value.message
        with pytest.raises(ValueError, match="no image file"):
            client.encode("/nonexistent.jpg")
        assert "vitedge_images_total" in client.metrics()


def test_two_serve_processes_share_features_through_redis(redis_server: str) -> None:
    args = ["cifar-vit", "--cache", "memory,redis", "--redis-url", redis_server, "--max-batch", "4"]
    procs = [start_serve(*args) for _ in range(2)]
    try:
        urls = [json.loads(p.stdout.readline())["url"] for p in procs]  # type: ignore[union-attr]
        a, b = (Client(u) for u in urls)
        first = a.encode(photo(5))
        shared = b.encode(photo(5))
        assert (first.cache, shared.cache) == ("miss", "redis")
        np.testing.assert_array_equal(first.features, shared.features)
        assert b.encode(photo(6)).cache == "miss" and a.encode(photo(6)).cache == "redis"
        assert a.encode(photo(6)).cache == "memory"  # now promoted into A's own memory tier
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            assert p.wait(timeout=60) == 0
