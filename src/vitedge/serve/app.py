"""The HTTP layer of the encoder service: parse and check a request, hand it to the worker, answer.

``create_app(encoder, config)`` builds the FastAPI app, so tests run it in process (``httpx.ASGITransport``)
and under a real uvicorn alike. Routes: ``POST /v1/encode`` (features: safetensors by default, JSON with
``Accept: application/json``), ``POST /v1/classify`` (top-k), ``GET /healthz``, ``GET /readyz``,
``GET /metrics`` (Prometheus text). Bodies are one image, raw or as the first part of a multipart form; the
format is sniffed from the bytes (JPEG, PNG, WebP), never taken from the header. Errors map to status codes
in one place (:func:`_error`): 400 undecodable, 401 missing or wrong API key, 413 too large (bytes or
pixels), 415 not an image format we read, 429 queue full (``Retry-After``), 504 deadline passed. A client
that disconnects while its request waits has that request dropped from the queue (logged as 499).

Resolution buckets: ``create_app`` takes one encoder or ``{(H, W): encoder}`` (the first is the default); a
request names its size with ``X-Img-Size`` or goes to the smallest size at least as large as its image's
shorter side (else the largest), and batches never mix sizes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import math
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from safetensors.torch import save as safetensors_bytes

from vitedge.serve.auth import KeyRing, presented_key
from vitedge.serve.batcher import PRIORITIES, BatcherConfig, QueueFull
from vitedge.serve.worker import Job, ModelWorker

FORMATS = {b"\xff\xd8\xff": "jpeg", b"\x89PNG\r\n\x1a\n": "png"}


@dataclass(frozen=True, kw_only=True)
class ServeConfig:
    """The service's limits and the batcher's settings."""

    batcher: BatcherConfig = field(default_factory=BatcherConfig)
    max_body_bytes: int = 20 << 20
    max_pixels: int | None = None  # default: vitedge.data.images.DEFAULT_MAX_PIXELS
    top_k: int = 5
    threads: int = 2
    cache: str | None = "memory"  # feature-cache tiers for /v1/encode ("memory,disk,redis"); None: off
    redis_url: str | None = None  # for a redis tier (default $VITEDGE_REDIS_URL, then localhost:6379)
    keys: KeyRing | None = None  # API keys; None: open (the CLI then binds loopback only)
    auto_batch: bool = False  # cap batches at the warm-up's sweet spot within batcher.max_batch
    memory_budget: int | str | None = None  # with auto_batch: also within the memory planner's limit
    sweep_seconds: float = 20.0  # the warm-up sweep's time budget
    replica: str | None = None  # named in every answer's X-Replica header (one of several replicas)


class HttpError(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def sniff(data: bytes) -> str:
    """The image format of ``data`` from its first bytes, or an HttpError (400 empty, 415 unknown)."""
    if not data:
        raise HttpError(400, "the request body is empty; send one image (JPEG, PNG or WebP)")
    for magic, name in FORMATS.items():
        if data.startswith(magic):
            return name
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise HttpError(415, "the body is not a JPEG, PNG or WebP image (its bytes say so, whatever the header)")


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def disconnected(request: Request) -> None:
    """Return once the client has gone (the ASGI server sends ``http.disconnect``); the body is read."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _error(e: Exception) -> JSONResponse:
    """The one place errors become status codes."""
    if isinstance(e, HttpError):
        return JSONResponse({"error": e.message}, status_code=e.status, headers=e.headers)
    if isinstance(e, QueueFull):
        retry = str(math.ceil(e.retry_after))
        return JSONResponse({"error": str(e)}, status_code=429, headers={"Retry-After": retry})
    if isinstance(e, TimeoutError):
        return JSONResponse({"error": f"deadline passed: {e}"}, status_code=504)
    if isinstance(e, ClientGone):  # nobody reads it; nginx's code for the log and the metrics
        return JSONResponse({"error": "the client closed the connection"}, status_code=499)
    raise e


def memory_limit(encoders: Mapping[tuple[int, int], Any], budget: int | str | None) -> tuple[int, int]:
    """The memory planner's largest batch for the largest input size within ``budget`` (default: the memory
    the kernel says is available now), and the budget in bytes.

    Raises:
        ValueError: not even one image fits.
    """
    from vitedge.measure.memory import parse_bytes, plan_batch

    budget_bytes = parse_bytes(budget) if budget is not None else available_memory()
    size = max(encoders, key=lambda hw: hw[0] * hw[1])
    enc = encoders[size]
    plan = plan_batch(enc.arch(), budget_bytes=budget_bytes, dtype=str(enc.compute_dtype).split(".")[-1])
    if plan.max_batch < 1:
        raise ValueError(f"{enc.model_id} at {size} does not fit the memory budget: {plan.reason}")
    return plan.max_batch, budget_bytes


def available_memory() -> int:
    """``MemAvailable`` from /proc/meminfo (bytes); 8 GiB where the kernel does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def create_app(
    encoder: Any | Mapping[tuple[int, int], Any],
    config: ServeConfig | None = None,
    *,
    on_ready: Callable[[], None] | None = None,
) -> FastAPI:
    """The encoder service over ``encoder``: a loaded, optimised :class:`~vitedge.models.base.Encoder`, or
    ``{(H, W): encoder}`` for several input sizes (the first is the default). ``on_ready`` is called once
    the warm-up is done and work is admitted; ``app.state.worker`` is the model worker."""
    from vitedge.cache.keys import Namespace, content_digest
    from vitedge.cache.store import CacheConfig, FeatureCache
    from vitedge.data import build_transform, decode_image_bytes, to_uint8_tensor
    from vitedge.data.images import DEFAULT_MAX_PIXELS

    config = config or ServeConfig()
    encoders = dict(encoder) if isinstance(encoder, Mapping) else {tuple(encoder.img_size): encoder}
    default = next(iter(encoders.values()))
    batcher = config.batcher
    if config.auto_batch:
        limit, _ = memory_limit(encoders, config.memory_budget)
        if limit < batcher.max_batch:
            batcher = dataclasses.replace(batcher, max_batch=limit)
    transforms = {size: build_transform(enc.preprocess).batch for size, enc in encoders.items()}
    worker = ModelWorker(
        encoders,
        batcher,
        threads=config.threads,
        auto_batch=config.auto_batch,
        prepare=transforms,
        sweep_seconds=config.sweep_seconds,
    )
    namespaces = {size: Namespace.of(enc) for size, enc in encoders.items()}
    by_side = sorted(encoders, key=lambda hw: min(hw))
    registry = CollectorRegistry()
    requests_total = Counter(
        "vitedge_requests", "HTTP requests by route and status", ["route", "code"], registry=registry
    )
    latency = Histogram(
        "vitedge_request_seconds", "end-to-end latency by route", ["route"], registry=registry
    )
    batch_size = Histogram(
        "vitedge_batch_size", "images per model batch", buckets=(1, 2, 4, 8, 16, 32, 64), registry=registry
    )
    depth = Gauge("vitedge_queue_depth", "queued requests by priority", ["priority"], registry=registry)
    cache_hits = Counter(
        "vitedge_cache_hits", "encode requests answered by a cache tier", ["tier"], registry=registry
    )
    images = Counter("vitedge_images", "images answered (200), cache hits included", registry=registry)
    busy = Counter(
        "vitedge_worker_busy_seconds",
        "time the model worker spent computing (rate: busy fraction)",
        registry=registry,
    )
    cap = Gauge("vitedge_batch_cap", "the batch size cap in force", registry=registry)
    cancelled = Gauge(
        "vitedge_cancelled", "queued requests dropped because their client left", registry=registry
    )
    store = None
    if config.cache:
        store = FeatureCache(CacheConfig.parse(config.cache, redis_url=config.redis_url))
    store_lock = threading.Lock()  # the feature cache is called from request threads
    if store is not None:
        for ns in namespaces.values():
            store.register(ns.digest, ns.to_json())

    def lookup(namespace: str, key: str) -> tuple[torch.Tensor | None, str]:
        """The cached feature of ``key`` and the tier that held it, or (None, "miss")."""
        if store is None:
            return None, "off"
        with store_lock:
            value, tier = store.lookup(namespace, key)
        return (None if value is None else torch.from_numpy(value)), tier or "miss"

    def remember(namespace: str, key: str, feats: torch.Tensor) -> torch.Tensor:
        """Store a computed feature; answer with what a later hit returns, so hits and misses agree."""
        if store is None:
            return feats
        with store_lock:
            return torch.from_numpy(store.put(namespace, key, feats.numpy()))

    state: dict[str, Any] = {"ready": False, "seen_batches": 0, "busy_seen": 0.0}

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        worker.start()  # warm up (and size batches), then admit work
        await asyncio.wrap_future(worker.ready)
        state["ready"] = True
        if on_ready is not None:
            on_ready()
        yield
        state["ready"] = False  # /readyz turns false; queued work finishes before the worker ends
        await asyncio.to_thread(worker.stop)
        if store is not None:
            store.close()

    app = FastAPI(title="vitedge encoder service", version="1", lifespan=lifespan)

    def authorise(request: Request) -> None:
        if config.keys is None:
            return
        key = presented_key(request.headers.get("authorization"), request.headers.get("x-api-key"))
        if config.keys.check(key) is None:
            raise HttpError(
                401,
                "missing or wrong API key (send Authorization: Bearer KEY or X-API-Key: KEY)",
                {"WWW-Authenticate": "Bearer"},
            )

    def bucket_of(request: Request, pixels: torch.Tensor) -> tuple[int, int]:
        """The input size a request runs at: ``X-Img-Size`` (N or HxW), else the smallest size at least as
        large as the image's shorter side, else the largest."""
        named = request.headers.get("x-img-size")
        if named is not None:
            parts = named.lower().split("x")
            try:
                hw = (int(parts[0]), int(parts[-1])) if len(parts) <= 2 else None
            except ValueError:
                hw = None
            if hw not in encoders:
                sizes = ", ".join(f"{h}x{w}" for h, w in encoders)
                raise HttpError(400, f"X-Img-Size {named!r} is not served here; sizes: {sizes}")
            return hw  # type: ignore[return-value]
        short = min(pixels.shape[-2:])
        return next((hw for hw in by_side if min(hw) >= short), by_side[-1])

    async def body_of(request: Request) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and int(declared) > config.max_body_bytes:
            raise HttpError(413, f"the body is {declared} bytes, over the limit of {config.max_body_bytes}")
        data = await request.body()
        if len(data) > config.max_body_bytes:
            raise HttpError(413, f"the body is {len(data)} bytes, over the limit of {config.max_body_bytes}")
        if request.headers.get("content-type", "").startswith("multipart/form-data"):
            form = await request.form()
            parts = [v for v in form.values() if hasattr(v, "read")]
            if not parts:
                raise HttpError(400, "the multipart form holds no file")
            data = await parts[0].read()  # type: ignore[union-attr]
        return data

    def decode(data: bytes) -> tuple[str, torch.Tensor]:  # -> (content key, decoded uint8 (C, H, W))
        sniff(data)
        try:
            image = decode_image_bytes(
                data, name="the body", max_pixels=config.max_pixels or DEFAULT_MAX_PIXELS
            )
        except ValueError as e:
            raise HttpError(413 if "over the limit" in str(e) else 400, str(e)) from None
        pixels = to_uint8_tensor(image)
        return content_digest(pixels.numpy()), pixels

    async def run(request: Request, route: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        authorise(request)
        priority = request.headers.get("x-priority", "normal")
        if priority not in PRIORITIES:
            raise HttpError(400, f"X-Priority must be one of {', '.join(PRIORITIES)}, got {priority!r}")
        deadline_ms = request.headers.get("x-deadline-ms")
        try:
            deadline_s = None if deadline_ms is None else float(deadline_ms) / 1e3
        except ValueError:
            raise HttpError(
                400, f"X-Deadline-Ms must be a number of milliseconds, got {deadline_ms!r}"
            ) from None
        worker.admit(priority)  # a full queue refuses before the body is read or decoded
        data = await body_of(request)
        key, pixels = await asyncio.to_thread(decode, data)  # decoding never blocks the event loop
        size = bucket_of(request, pixels)
        h, w = size
        namespace = namespaces[size].digest
        if route == "encode":  # a hit is answered without touching the queue
            cached, tier = await asyncio.to_thread(lookup, namespace, key)
            if cached is not None:
                cache_hits.labels(tier).inc()
                hit = {"X-Cache": tier, "X-Queue-Ms": "0.0", "X-Compute-Ms": "0.0", "X-Img-Size": f"{h}x{w}"}
                return {"features": cached}, hit
        # preprocessing runs on the worker with its threads (a request thread would oversubscribe the cores)
        job = worker.submit(f"{namespace}:{key}", size, pixels, priority=priority, deadline_s=deadline_s)
        result = await answered(request, job)
        headers = {
            "X-Queue-Ms": f"{job.queued_s * 1e3:.1f}",
            "X-Compute-Ms": f"{job.compute_s * 1e3:.1f}",
            "X-Img-Size": f"{h}x{w}",
        }
        if route == "encode":
            stored = await asyncio.to_thread(remember, namespace, key, result["features"])
            result = {**result, "features": stored}
            headers["X-Cache"] = "miss" if store is not None else "off"
        return result, headers

    async def answered(request: Request, job: Job) -> dict[str, torch.Tensor]:
        """The job's result; if the client disconnects first, the job leaves the queue (ClientGone)."""
        result = asyncio.wrap_future(job.future)
        gone = asyncio.ensure_future(disconnected(request))
        try:
            await asyncio.wait([result, gone], return_when=asyncio.FIRST_COMPLETED)  # type: ignore[type-var]
        finally:
            gone.cancel()
        if not result.done():
            worker.cancel(job)  # a running batch is not interrupted; its answer is thrown away
            result.cancel()
            raise ClientGone()
        return result.result()

    async def handle(request: Request, route: str, answer: Any) -> Response:
        start = time.perf_counter()
        try:
            result, headers = await run(request, route)
            response = answer(request, result, headers)
        except Exception as e:
            response = _error(e)
        if config.replica is not None:
            response.headers["X-Replica"] = config.replica
        requests_total.labels(route, str(response.status_code)).inc()
        latency.labels(route).observe(time.perf_counter() - start)
        if response.status_code == 200:
            images.inc()
        return response

    def encode_answer(request: Request, result: dict[str, torch.Tensor], headers: dict[str, str]) -> Response:
        feats = result["features"]  # (N, D)
        if "application/json" in request.headers.get("accept", ""):
            body: dict[str, Any] = {"shape": list(feats.shape), "pooled": feats.mean(0).tolist()}
            if request.query_params.get("tokens") in ("1", "true"):
                body["tokens"] = feats.tolist()
            return JSONResponse(body, headers=headers)
        blob = safetensors_bytes({"features": feats.contiguous()})
        return Response(blob, media_type="application/x-safetensors", headers=headers)

    def classify_answer(
        request: Request, result: dict[str, torch.Tensor], headers: dict[str, str]
    ) -> Response:
        if "logits" not in result:
            raise HttpError(400, f"{default.model_id} has no classifier head; use /v1/encode")
        probs = result["logits"].softmax(-1)
        top = probs.topk(min(config.top_k, probs.numel()))
        rows = [
            {"index": int(i), "probability": float(p)} for p, i in zip(top.values, top.indices, strict=True)
        ]
        return JSONResponse({"model": default.model_id, "top": rows}, headers=headers)

    @app.post("/v1/encode")
    async def encode(request: Request) -> Response:
        return await handle(request, "encode", encode_answer)

    @app.post("/v1/classify")
    async def classify(request: Request) -> Response:
        return await handle(request, "classify", classify_answer)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> Response:
        ready = bool(state["ready"])
        body = {"ready": ready, "model": default.model_id, "max_batch": worker.max_batch}
        if config.replica is not None:
            body["replica"] = config.replica
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics")
    def metrics(request: Request) -> Response:
        try:
            authorise(request)
        except HttpError as e:
            return _error(e)
        for priority, n in worker.depth().items():
            depth.labels(priority).set(n)
        for n in worker.sizes_since(state["seen_batches"]):
            batch_size.observe(n)
        state["seen_batches"] = worker.batches
        busy.inc(worker.busy_s - state["busy_seen"])
        state["busy_seen"] = worker.busy_s
        cap.set(worker.max_batch)
        cancelled.set(worker.cancelled)
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    app.state.worker = worker
    return app
