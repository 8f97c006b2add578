"""`vitedge serve --engine ray`: Ray Serve replicas of the encoder service on a local cluster on loopback,
started and stopped by these tests, sharing a real Redis: both replicas answer, a feature one computed is a
Redis hit on the other, a replica killed mid-burst fails at most the requests it held (none hangs), and
SIGTERM shuts everything down with exit 0."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from redis_support import start_redis, stop
from support import process_titles, start_serve
from vitedge.data import build_transform, decode_image_bytes, to_uint8_tensor
from vitedge.models import load
from vitedge.serve import Client, ServiceError

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
MAX_ONGOING = 6  # requests a replica holds at once: the most a replica's death may fail
REQUEST_TIMEOUT_S = 20  # the ingress answers a request no replica answered by then: a lost one, never a hang


def _replica_pids() -> list[int]:
    """PIDs of the vitedge app's Ray Serve replica processes (titled ``ray::ServeReplica:vitedge:...``)."""
    return [pid for pid, title in process_titles() if title.startswith("ray::ServeReplica:vitedge")]


def _cluster_pids() -> list[int]:
    """PIDs of what a local Ray Serve cluster runs: Ray's processes and Ray Serve's HAProxy."""
    return [p for p, t in process_titles() if t.startswith("ray::") or "raylet" in t or "haproxy" in t]


def _serve(*args: str) -> subprocess.Popen:
    return start_serve(*args, stderr=subprocess.PIPE)


def _ready_line(proc: subprocess.Popen, timeout: float) -> dict:
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
    reader.start()
    reader.join(timeout)
    if not out or not out[0]:
        proc.kill()
        raise AssertionError(f"no ready line within {timeout} s: {proc.stderr.read()[-3000:]}")  # type: ignore[union-attr]
    return json.loads(out[0])


@pytest.fixture(scope="module", params=["proxy", "haproxy"])
def service(request, tmp_path_factory):
    """Two replicas x 1 thread of cifar-vit with memory and Redis tiers behind each ingress; (process, ready
    line)."""
    redis, port = start_redis(tmp_path_factory.mktemp("redis"))
    proc = _serve(
        "cifar-vit",
        "--ingress",
        request.param,
        "--engine",
        "ray",
        "--replicas",
        "2",
        "--threads",
        "1",
        "--max-batch",
        "4",
        "--max-ongoing",
        str(MAX_ONGOING),
        "--request-timeout-s",
        str(REQUEST_TIMEOUT_S),
        "--cache",
        "memory,redis",
        "--redis-url",
        f"redis://127.0.0.1:{port}/0",
    )
    try:
        yield proc, _ready_line(proc, timeout=300), request.param
    finally:
        if proc.poll() is None:  # a test failed before the SIGTERM test: shut the cluster down all the same
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                proc.kill()
        stop(redis)


def _photos(photo_dir: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted(photo_dir.glob("*.jpg")) if p.name != "broken.jpg"]


def _crops(photo_dir: Path, n: int) -> list[bytes]:
    """``n`` distinct JPEGs: crops of the photos at shifting offsets (no cache holds them yet)."""
    photos = [Image.open(io.BytesIO(b)).convert("RGB") for b in _photos(photo_dir)]
    out = []
    for i in range(n):
        image = photos[i % len(photos)]
        d = 3 + i
        buf = io.BytesIO()
        image.crop((d, d, image.width - d, image.height - d)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def test_two_replicas_answer_as_the_model_does(service, photo_dir) -> None:
    _proc, ready, _ingress = service
    assert ready["engine"] == "ray" and ready["replicas"] == 2 and ready["threads"] == 1
    assert ready["url"].startswith("http://127.0.0.1:")
    photos = _photos(photo_dir)
    with Client(ready["url"], timeout=120) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(client.encode, photos))
    assert {a.cache for a in answers} == {"miss"}
    assert len({a.replica for a in answers}) == 2, "both replicas answer"
    enc = load("cifar-vit")
    transform = build_transform(enc.preprocess).batch
    for data, answer in zip(photos, answers, strict=True):
        pixels = to_uint8_tensor(decode_image_bytes(data, name="photo"))
        with torch.inference_mode():
            want = enc.forward_features(transform(pixels[None]))[0]
        # the cache keeps fp16 and a miss answers what a later hit would: fp16's rounding, 2^-11 relative
        np.testing.assert_allclose(answer.features, want.numpy(), atol=1e-3, rtol=1e-3)


def test_a_feature_one_replica_computed_is_a_redis_hit_on_the_other(service, photo_dir) -> None:
    _proc, ready, _ingress = service
    image = _crops(photo_dir, 1)[0]
    with Client(ready["url"], timeout=120) as client:
        first = client.encode(image)
        assert first.cache == "miss"
        later = [client.encode(image) for _ in range(16)]  # routing picks either replica
    others = [a for a in later if a.replica != first.replica]
    assert others, "16 requests all went to one replica"
    assert others[0].cache == "redis"  # the other replica's first sight of it: computed elsewhere
    assert {a.cache for a in later if a.replica == first.replica} <= {"memory"}
    for a in later:
        np.testing.assert_array_equal(a.features, first.features)


def test_a_killed_replica_fails_at_most_what_it_held(service, photo_dir) -> None:
    _proc, ready, ingress = service
    pids = _replica_pids()
    assert len(pids) == 2, pids
    bodies = _crops(photo_dir, 121)[1:]  # the first crop is cached by the previous test
    done: list[int] = []
    killed_at: list[float] = []
    lock = threading.Lock()

    def post(body: bytes) -> tuple[float, int]:
        start = time.monotonic()
        try:
            code = httpx.post(
                f"{ready['url']}/v1/encode", content=body, timeout=3 * REQUEST_TIMEOUT_S
            ).status_code
        except httpx.TimeoutException:
            code = -2  # the client gave up: a hang, which the ingress's timeout must prevent
        except httpx.HTTPError:
            code = -1  # a connection dropped: counted as a failure
        with lock:
            done.append(code)
            if len(done) == 10:  # mid-burst: both replicas hold requests
                os.kill(pids[0], signal.SIGKILL)
                killed_at.append(time.monotonic())
        return start, code

    with ThreadPoolExecutor(24) as pool:
        results = list(pool.map(post, bodies, timeout=300))
    assert killed_at and len([1 for start, _ in results if start > killed_at[0]]) > 24, "the kill came late"
    failed = [(start, code) for start, code in results if code != 200]
    if ingress == "proxy":
        assert failed, "the killed replica held nothing: the test proves nothing"
    # 408 (Ray's proxy) and 504 (HAProxy): a request lost with the replica, answered at the ingress timeout
    assert all(code in (-1, 408, 500, 502, 503, 504) for _, code in failed), failed
    # Only requests in flight when it died fail (at most the 24 clients'); every later request is served.
    # Ray's proxy learns of an actor's death at once; HAProxy when it next connects to the replica, so a
    # request it dispatched in the moment after the kill (over a kept-alive connection) may fail too.
    window = 0.0 if ingress == "proxy" else 0.5
    assert all(start < killed_at[0] + window for start, _ in failed) and len(failed) <= 24, failed
    if ingress == "proxy":  # Ray Serve's proxy gives a replica at most --max-ongoing requests at once
        assert len(failed) <= MAX_ONGOING, failed
    with Client(ready["url"], timeout=120) as client:  # the survivor (and Ray's new replica) serve on
        assert client.encode(_crops(photo_dir, 122)[-1]).cache == "miss"
        with pytest.raises(ServiceError) as e:
            client.encode(b"GIF89a")
        assert e.value.status == 415


def test_sigterm_stops_the_replicas_and_the_cluster(service) -> None:
    proc, _ready, _ingress = service
    start = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    # an idle service stops in seconds (behind HAProxy Ray's default drain window alone took 30 s)
    assert time.monotonic() - start < 20
    deadline = time.monotonic() + 30
    while _cluster_pids() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not _cluster_pids(), "processes of the cluster outlived it"


def test_more_replicas_than_cpus_are_refused() -> None:
    proc = _serve("cifar-vit", "--engine", "ray", "--replicas", "3", "--threads", "1", "--num-cpus", "2")
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == 2  # vitedge's exit code for a usage error
    assert "3 replicas x 1 threads need 3 CPUs" in err and "--replicas" in err
