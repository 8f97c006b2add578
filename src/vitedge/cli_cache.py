"""The feature-cache commands: ``encode``, ``cache stats|invalidate`` and ``video`` (issue #6).

They register on the shared :data:`vitedge.cli_common.app`, under their own panel of ``vitedge --help``;
:mod:`vitedge.cli` imports this module.
"""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Annotated, Any

import typer

from vitedge.cli_common import (
    ImgOpt,
    JsonOpt,
    ModelArg,
    OptOpt,
    ThreadsOpt,
    WeightsOpt,
    app,
    emit,
    err,
    user_errors,
)

PANEL = "Feature cache"
CacheDirOpt = Annotated[
    str | None, typer.Option("--cache-dir", help="disk tier folder (default $VITEDGE_CACHE/features)")
]


@app.command("encode", rich_help_panel=PANEL)
@user_errors
def encode_(
    model: ModelArg,
    inputs: Annotated[
        list[str],
        typer.Argument(
            help="folders of images (recursive), image files, or imagenet-sample; with --out also videos"
        ),
    ],
    cache: Annotated[
        str, typer.Option("--cache", help="tiers fastest first: memory,disk,redis,redis-cluster; or none")
    ] = "memory,disk",
    value_format: Annotated[str, typer.Option("--format", help="stored value: fp16 or int8")] = "fp16",
    batch: Annotated[int, typer.Option("--batch", help="images per forward for the misses")] = 16,
    limit: Annotated[int | None, typer.Option("--limit", help="encode the first N images only")] = None,
    cache_dir: CacheDirOpt = None,
    opt: OptOpt = None,
    weights: WeightsOpt = None,
    max_pixels: Annotated[
        int | None, typer.Option("--max-pixels", help="refuse larger images (default 64 Mpx)", min=1)
    ] = None,
    redis_ttl: Annotated[
        int | None, typer.Option("--redis-ttl", help="expire Redis entries after this many seconds", min=1)
    ] = None,
    redis_max_bytes: Annotated[
        str | None, typer.Option("--redis-max-bytes", help="bound the Redis server's memory (LRU), e.g. 2GiB")
    ] = None,
    threads: ThreadsOpt = 2,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="write the features to this Parquet table (a rerun resumes it)"),
    ] = None,
    engine: Annotated[
        str, typer.Option("--engine", help="local (this process) or ray (a Ray Data job; needs --out)")
    ] = "local",
    address: Annotated[
        str | None, typer.Option("--address", help="Ray cluster to join (default: start one on loopback)")
    ] = None,
    actors: Annotated[
        int | None, typer.Option("--actors", help="Ray encoder actors (default: CPUs // --threads)", min=1)
    ] = None,
    num_cpus: Annotated[
        int | None, typer.Option("--num-cpus", help="CPUs of the local Ray cluster it starts", min=1)
    ] = None,
    frame_step: Annotated[
        int, typer.Option("--frame-step", help="videos (with --out): encode every N-th frame", min=1)
    ] = 1,
    segment_frames: Annotated[
        int,
        typer.Option(
            "--segment-frames", help="videos (with --out): cut at keyframes into ~N-frame segments", min=1
        ),
    ] = 256,
    as_json: JsonOpt = False,
) -> None:
    """Encode images through the feature cache (with an -O stack); print the hit rate and the time saved.
    Files that cannot be read are reported (JSON ``errors``) and the rest encoded. With ``--out`` the
    features go to a Parquet table (key, path, shape, feature), in this process or with ``--engine ray`` on a
    Ray cluster; a rerun skips what the table holds. Videos are rows ``FILE#frame=N``, decoded in segments
    that start at keyframes, so one long file spreads over the workers."""
    from vitedge.commands import _progress

    if out is not None or engine != "local":
        _encode_table(
            model, inputs, out=out, engine=engine, cache=cache, value_format=value_format, batch=batch,
            limit=limit, cache_dir=cache_dir, opt=opt, weights=weights, max_pixels=max_pixels,
            threads=threads, ray_args=(address, actors, num_cpus), as_json=as_json,
            video=(frame_step, segment_frames),
        )  # fmt: skip
        return
    if (frame_step, segment_frames) != (1, 256):
        raise ValueError(
            "--frame-step and --segment-frames encode videos into a table: give --out FILE.parquet"
        )
    if len(inputs) != 1:
        raise ValueError(
            "without --out, encode takes one folder (or imagenet-sample); give --out to encode several"
        )
    directory = inputs[0]
    from vitedge.cache.encode import run_encode

    with _progress(err) as progress:
        task = progress.add_task(f"encode {model}", total=None)
        result = run_encode(
            model,
            directory,
            cache=cache,
            value_format=value_format,
            batch=batch,
            limit=limit,
            threads=threads,
            cache_dir=cache_dir,
            opts=opt or [],
            weights=weights,
            max_pixels=max_pixels,
            redis_ttl_s=redis_ttl,
            redis_max_bytes=redis_max_bytes,
            progress=lambda n, total: progress.update(task, completed=n, total=total),
        )
    emit(
        result,
        as_json,
        lambda r: err.print(
            f"{r['encoded']} of {r['images']} images encoded: hit rate {r['hit_rate']:.1%}, "
            f"{r['time_s']:.2f} s, time saved {r['time_saved_s']:.2f} s" + _skipped(r),
            highlight=False,
        ),
    )


def _skipped(result: dict[str, Any]) -> str:
    return "".join(f"\n  skipped {e['path']}: {e['reason']}" for e in result["errors"])


def _encode_table(
    model: str,
    inputs: list[str],
    *,
    out: Path | None,
    engine: str,
    ray_args: tuple[str | None, int | None, int | None],
    video: tuple[int, int],
    as_json: bool,
    **settings: Any,
) -> None:
    """``encode --out FILE.parquet [--engine ray]``: a bulk job into a feature table."""
    from vitedge.commands import _progress
    from vitedge.scale import EncodeJob, RayConfig, VideoConfig, run_bulk

    if out is None:
        raise ValueError(f"--engine {engine} writes a feature table: give --out FILE.parquet")
    address, actors, num_cpus = ray_args
    ray = None
    if engine == "ray":
        ray = RayConfig(address=address, actors=actors, num_cpus=num_cpus, show_progress=True)
    elif any(a is not None for a in ray_args):
        raise ValueError("--address, --actors and --num-cpus need --engine ray")
    job = EncodeJob(
        model=model,
        opts=tuple(settings["opt"] or ()),
        weights=None if settings["weights"] is None else str(settings["weights"]),
        cache=settings["cache"],
        value_format=settings["value_format"],
        cache_dir=settings["cache_dir"],
        threads=settings["threads"],
        batch=settings["batch"],
        max_pixels=settings["max_pixels"],
    )
    # Ray draws its own progress bars; the local engine gets ours
    with _progress(err if engine == "local" else None) as progress:
        task = progress.add_task(f"encode {model}", total=None)
        result = run_bulk(
            job,
            inputs,
            out=out,
            engine=engine,
            ray=ray,
            video=VideoConfig(frame_step=video[0], segment_frames=video[1]),
            limit=settings["limit"],
            progress=lambda n, total: progress.update(task, completed=n, total=total),
        )
    emit(
        result,
        as_json,
        lambda r: err.print(
            f"{r['encoded']} of {r['images']} images encoded"
            + (f" ({r['frames']} frames of {r['videos']} videos)" if r["videos"] else "")
            + f" ({r['skipped']} already in {r['out']}, "
            f"{r['rows']} rows now), hit rate {r['hit_rate']:.1%}, {r['time_s']:.2f} s" + _skipped(r),
            highlight=False,
        ),
    )


cache_app = typer.Typer(
    help="Inspect or invalidate the persistent feature-cache tiers.", no_args_is_help=True
)
app.add_typer(cache_app, name="cache", rich_help_panel=PANEL)
AdminTiersOpt = Annotated[str, typer.Option("--cache", help="tiers: disk,redis,redis-cluster")]


@cache_app.command("stats")
@user_errors
def cache_stats(
    cache: AdminTiersOpt = "disk,redis", cache_dir: CacheDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Entries and bytes per tier, and the namespaces (model, weights, settings) they belong to."""
    from vitedge.cache.encode import run_cache_stats

    result = run_cache_stats(cache=cache, cache_dir=cache_dir)
    emit(result, as_json, lambda r: err.print(r, highlight=False))


@cache_app.command("invalidate")
@user_errors
def cache_invalidate(
    model: Annotated[str, typer.Option("--model", help="drop every cached feature of this model id")],
    cache: AdminTiersOpt = "disk,redis",
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop a model's namespaces (all weights, preprocessing and optimisation variants) from the tiers."""
    from vitedge.cache.encode import run_cache_invalidate

    result = run_cache_invalidate(model, cache=cache, cache_dir=cache_dir)
    emit(result, as_json, lambda r: err.print(r, highlight=False))


@app.command("video", rich_help_panel=PANEL)
@user_errors
def video_(
    model: ModelArg,
    file: Annotated[Path, typer.Argument(help="a video file OpenCV reads")],
    keyframe_interval: Annotated[
        int, typer.Option("--keyframe-interval", help="full encode every K frames", min=1)
    ] = 30,
    threshold: Annotated[
        float, typer.Option("--threshold", help="per-block token change (relative L2) that recomputes it")
    ] = 0.1,
    pixel_threshold: Annotated[
        float, typer.Option("--pixel-threshold", help="mean absolute patch change (0..1) that recomputes it")
    ] = 0.02,
    cut_threshold: Annotated[
        float, typer.Option("--cut-threshold", help="histogram distance (0..1) that marks a scene cut")
    ] = 0.3,
    flow: Annotated[
        bool, typer.Option("--flow/--no-flow", help="follow camera motion (optical flow), warping the cache")
    ] = True,
    shift_threshold: Annotated[
        float, typer.Option("--shift-threshold", help="patch change (0..1) that recomputes a moved token")
    ] = 0.04,
    min_motion: Annotated[
        float, typer.Option("--min-motion", help="median flow (px/frame) below which the camera is still")
    ] = 0.5,
    all_queries: Annotated[
        bool, typer.Option("--all-queries", help="attention for every query, not only recomputed tokens")
    ] = False,
    max_frames: Annotated[int | None, typer.Option("--max-frames", help="first N frames only")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="write a PNG of cosine and reuse over time here")
    ] = None,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Temporal token reuse on a video, against full per-frame encoding in the same run."""
    from vitedge.cache.video import VideoConfig, run_video

    config = VideoConfig(
        keyframe_interval=keyframe_interval,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        cut_threshold=cut_threshold,
        flow=flow,
        shift_threshold=shift_threshold,
        min_motion=min_motion,
        all_queries=all_queries,
    )
    result = run_video(
        model,
        file,
        config=config,
        max_frames=max_frames,
        plot=plot,
        img_size=img_size,
        weights=weights,
        threads=threads,
        console=err,
    )
    emit(result, as_json, lambda r: err.print(r, highlight=False))


@app.command("serve")
@user_errors
def serve(
    model: ModelArg,
    opt: OptOpt = None,
    host: Annotated[str, typer.Option("--host", help="address to bind (loopback by default)")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="TCP port (0: a free one)", min=0, max=65535)] = 8080,
    max_batch: Annotated[
        str,
        typer.Option(
            "--max-batch",
            help="images per forward at most; auto: the warm-up's sweet spot within the memory plan",
        ),
    ] = "auto",
    max_wait_ms: Annotated[
        float, typer.Option("--max-wait-ms", help="how long a batch waits to fill", min=0)
    ] = 10.0,
    queue: Annotated[int, typer.Option("--queue", help="queued requests per priority", min=1)] = 256,
    deadline_ms: Annotated[
        float, typer.Option("--deadline-ms", help="default request deadline", min=1)
    ] = 30_000.0,
    latency_target_ms: Annotated[
        float | None,
        typer.Option("--latency-target-ms", help="move the batch cap so a batch takes about this long"),
    ] = None,
    memory_budget: Annotated[
        str | None,
        typer.Option("--memory-budget", help="with --max-batch auto: memory for the process (default: free)"),
    ] = None,
    img_sizes: Annotated[
        str | None,
        typer.Option("--img-size", help="input sizes served, e.g. 224,160 (first: the default; X-Img-Size)"),
    ] = None,
    cache: Annotated[
        str, typer.Option("--cache", help="feature-cache tiers for /v1/encode (memory,disk,redis; none: off)")
    ] = "memory",
    redis_url: Annotated[
        str | None, typer.Option("--redis-url", help="the redis tier's server (default $VITEDGE_REDIS_URL)")
    ] = None,
    api_key_file: Annotated[
        Path | None, typer.Option("--api-key-file", help="accepted keys, hashed (sha256:HEX per line)")
    ] = None,
    insecure: Annotated[
        bool, typer.Option("--insecure", help="allow a non-loopback --host without API keys")
    ] = False,
    engine: Annotated[
        str, typer.Option("--engine", help="local: this process; ray: Ray Serve replicas behind one proxy")
    ] = "local",
    replicas: Annotated[
        int, typer.Option("--replicas", help="with --engine ray: replicas, each with --threads CPUs", min=1)
    ] = 2,
    address: Annotated[
        str | None,
        typer.Option("--address", help="with --engine ray: an existing cluster (default: start one here)"),
    ] = None,
    num_cpus: Annotated[
        int | None,
        typer.Option("--num-cpus", help="with --engine ray: CPUs of the local cluster it starts", min=1),
    ] = None,
    max_ongoing: Annotated[
        int,
        typer.Option("--max-ongoing", help="with --engine ray: requests a replica holds at once", min=1),
    ] = 64,
    ingress: Annotated[
        str,
        typer.Option(
            "--ingress",
            help="with --engine ray: proxy (Ray Serve's proxy actor) or haproxy (its HAProxy ingress)",
        ),
    ] = "proxy",
    request_timeout: Annotated[
        float,
        typer.Option(
            "--request-timeout-s",
            help="with --engine ray: the ingress answers a request no replica answered in this time (408)",
            min=0.001,
        ),
    ] = 120.0,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Serve the encoder over HTTP (POST /v1/encode, /v1/classify; GET /healthz, /readyz, /metrics) with
    dynamic batching, priorities (X-Priority) and deadlines (X-Deadline-Ms); one JSON line when ready.
    With --engine ray: --replicas copies of the service behind Ray Serve's proxy, sharing --cache redis."""
    import json
    import os
    import sys

    import uvicorn

    from vitedge.serve.auth import KeyRing, check_bind
    from vitedge.serve.spec import ServiceSpec

    auto = max_batch == "auto"
    if not auto and not (max_batch.isdigit() and int(max_batch) >= 1):
        raise ValueError(f"--max-batch takes a positive integer or auto, got {max_batch!r}")
    keys = KeyRing.from_file(api_key_file) if api_key_file is not None else None
    check_bind(host, keys=keys, insecure=insecure)
    spec = ServiceSpec(
        model=model,
        opts=tuple(opt or []),
        img_sizes=tuple(parse_sizes(img_sizes)),
        weights=None if weights is None else str(weights),
        max_batch=None if auto else int(max_batch),
        max_wait_ms=max_wait_ms,
        queue=queue,
        deadline_ms=deadline_ms,
        latency_target_ms=latency_target_ms,
        memory_budget=memory_budget,
        threads=threads,
        cache=None if cache == "none" else cache,
        redis_url=redis_url,
        keys=None if keys is None else tuple(keys.lines()),
    )
    if engine == "ray":
        from vitedge.scale.replicas import ReplicaConfig, serve_replicas

        ray_config = ReplicaConfig(
            replicas=replicas,
            address=address,
            num_cpus=num_cpus,
            max_ongoing=max_ongoing,
            ingress=ingress,
            request_timeout_s=request_timeout,
        )
        serve_replicas(spec, ray_config, host=host, port=port, as_json=as_json, console=err)
        return
    if engine != "local":
        raise ValueError(f"--engine takes local or ray, got {engine!r}")
    sock = bind_socket(host, port)  # bound before the model warms up: the ready line names the real port
    bound = sock.getsockname()[1]
    url_host = f"[{host}]" if ":" in host else host
    ready: dict[str, object] = {"url": f"http://{url_host}:{bound}", "model": model, "pid": os.getpid()}
    ready["name"] = " ".join(opt or []) or "baseline"

    def announce() -> None:
        worker = app_.state.worker
        ready["img_sizes"] = [list(hw) for hw in worker.encoders]
        ready["batcher"] = {
            "max_batch": worker.max_batch,
            "max_batch_limit": worker.batcher.config.max_batch,
            "auto": auto,
            "max_wait_ms": max_wait_ms,
            "queue": queue,
            "deadline_ms": deadline_ms,
            "latency_target_ms": latency_target_ms,
            "sweep": [p.to_json() for p in worker.sweep],
        }
        ready["api_keys"] = keys is not None
        if as_json:
            sys.stdout.write(json.dumps(ready) + "\n")
            sys.stdout.flush()
        else:
            err.print(f"serving {model} at {ready['url']} (max batch {worker.max_batch})", highlight=False)

    app_ = spec.build(on_ready=announce)
    server = _draining_server()(uvicorn.Config(app_, log_level="warning", timeout_graceful_shutdown=30))
    server.run(sockets=[sock])


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` (0: a free port) for uvicorn, with TCP_NODELAY, which accepted
    connections inherit: without it Nagle holds a response's second write until the client's delayed ACK,
    about 40 ms per request on Linux (uvicorn sets it only on sockets it creates itself)."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    return sock


def parse_sizes(text: str | None) -> list[int]:
    """``"224,160"`` -> [224, 160]; None -> []."""
    if text is None:
        return []
    try:
        sizes = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"--img-size takes sizes such as 224 or 224,160, got {text!r}") from None
    if not sizes or min(sizes) < 1 or len(set(sizes)) != len(sizes):
        raise ValueError(f"--img-size takes distinct positive sizes such as 224,160, got {text!r}")
    return sizes


def _draining_server() -> type:
    import contextlib
    import signal

    import uvicorn

    class DrainingServer(uvicorn.Server):  # type: ignore[misc]
        """uvicorn that, on SIGTERM or SIGINT, stops admitting, finishes what it holds and exits 0 (uvicorn
        itself re-raises the signal after its shutdown, so the process would die of it)."""

        @contextlib.contextmanager
        def capture_signals(self):  # type: ignore[no-untyped-def]
            def stop(_sig: int, _frame: object) -> None:
                self.should_exit = True

            previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for s, handler in previous.items():
                    signal.signal(s, handler)

    return DrainingServer
