"""Bulk encoding on Ray Data against single-process `vitedge encode`, same model, stack and batch (issue #19).

    python benchmarks/bench_ray.py --model timm:deit_tiny_patch16_224 --data imagenet-sample --json
    python benchmarks/bench_ray.py --model cifar-vit --data cifar10 --json
    python benchmarks/bench_ray.py --model timm:deit_tiny_patch16_224 --data video --segment-frames 128 --json

It starts a local Ray cluster on loopback (``--num-cpus``, default this machine's cores) and keeps it for the
whole run, then encodes the data ``--rounds`` times with each engine, alternating (local, ray, local, ray...),
every time into a fresh Parquet table with the feature cache off (no hits). Both engines are the
``vitedge.scale.run_bulk`` that ``vitedge encode --out`` runs. Throughput is steady state: the inputs after
the first batch came back over the time after it, so model loading, actor start and the first (warm-up)
batch are left out of both and reported apart as ``startup_s`` (with the cluster's own start). ``cifar10``
is the CIFAR-10 test set's 10,000 JPEGs, unpacked to a temporary folder; ``video`` the two sample videos
(1,065 frames), every ``--frame-step``-th frame encoded, cut at keyframes into ``--segment-frames`` segments.

With ``--redis`` (or ``--redis-only``, which skips the encoding), it also measures the shared tier the
scaling model in ``docs/scale.md`` rests on: a ``redis-server`` on a free loopback port, one client writing
then reading features of three sizes through vitedge's Redis tier (verified and decoded, as a worker would),
and the server's own ceiling with 16 ``redis-benchmark`` clients: ``redis`` holds ops/s and MB/s per size.

Prints one JSON object: ``ray_images_per_s`` and ``local_images_per_s`` (medians over rounds),
``throughput_ratio`` (ray / local, from the medians) with ``ratio_low`` / ``ratio_high`` (the lowest and
highest ratio of one round's pair), ``rows`` (in the Ray output), ``inputs``, ``errors``, ``startup_s``
(``cluster`` and the first Ray round's time to its first batch), ``nodes``, and the settings.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def prepare_data(data: str, scratch: Path, limit: int | None) -> list[str]:
    """The inputs: ``imagenet-sample``, ``cifar10`` (its test JPEGs unpacked into ``scratch``), ``video``
    (the sample videos) or a folder."""
    from vitedge.paths import data_root

    if data == "video":
        return [str(p) for p in sorted((data_root() / "video").glob("*.avi"))]
    if data != "cifar10":
        return [data]
    folder = scratch / "cifar10-test"
    with tarfile.open(data_root() / "cifar10" / "test.tar.gz") as tar:
        members = [m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")]
        members = sorted(members, key=lambda m: m.name)[:limit]
        tar.extractall(folder, members=members, filter="data")
    return [str(folder)]


def one_round(
    job: Any, inputs: list[str], out: Path, engine: str, ray_config: Any, limit: int | None, video: Any
) -> dict:
    from vitedge.scale import run_bulk

    result = run_bulk(job, inputs, out=out, engine=engine, ray=ray_config, limit=limit, video=video)
    out.unlink()
    return result


REDIS_SHAPES = {"cifar-vit 66x192": (66, 192), "deit-tiny 197x192": (197, 192), "vit-b 197x768": (197, 768)}


def redis_throughput(ops: int = 2000) -> dict[str, dict[str, float]]:
    """Sequential put and get throughput of one client on a loopback redis-server, per feature size, and the
    server's ceiling with many clients (``server_*``: Redis's own ``redis-benchmark``, 16 connections, SET
    and GET of values of the same size; it runs on the same 2 cores, so the ceiling is a lower bound)."""
    import shutil
    import socket
    import subprocess

    import numpy as np

    from vitedge.cache.keys import content_digest
    from vitedge.cache.store import CacheConfig, FeatureCache

    if shutil.which("redis-server") is None:
        raise SystemExit("--redis needs redis-server on PATH (make test installs it)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    ns = "f" * 64
    out: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", tmp]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            config = CacheConfig(tiers=("redis",), redis_url=f"redis://127.0.0.1:{port}/0")
            with FeatureCache(config) as cache:
                for name, shape in REDIS_SHAPES.items():
                    feat = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
                    keys = [content_digest(np.array([name, i])) for i in range(ops)]
                    t0 = time.perf_counter()
                    for k in keys:
                        cache.put(ns, k, feat)
                    put_s = time.perf_counter() - t0
                    t0 = time.perf_counter()
                    for k in keys:
                        assert cache.get(ns, k) is not None
                    get_s = time.perf_counter() - t0
                    value_bytes = feat.size * 2  # fp16
                    out[name] = {
                        "value_bytes": value_bytes,
                        "put_ops_per_s": ops / put_s,
                        "get_ops_per_s": ops / get_s,
                        "get_mb_per_s": ops * value_bytes / get_s / 1e6,
                        **server_ceiling(port, value_bytes, requests=20_000),
                    }
        finally:
            proc.terminate()
            proc.wait()
    return out


def server_ceiling(port: int, value_bytes: int, *, requests: int, clients: int = 16) -> dict[str, float]:
    """SET and GET ops/s and GET MB/s of ``redis-benchmark`` with ``clients`` connections on loopback."""
    import csv
    import io
    import subprocess

    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", str(clients), "-n", str(requests)]
    cmd += ["-d", str(value_bytes), "-t", "set,get", "--csv"]
    text = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=True).stdout
    rates = {row["test"]: float(row["rps"]) for row in csv.DictReader(io.StringIO(text))}
    return {
        "server_clients": clients,
        "server_set_ops_per_s": rates["SET"],
        "server_get_ops_per_s": rates["GET"],
        "server_get_mb_per_s": rates["GET"] * value_bytes / 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:deit_tiny_patch16_224")
    parser.add_argument(
        "--data", default="imagenet-sample", help="imagenet-sample, cifar10, video or a folder"
    )
    parser.add_argument("--frame-step", type=int, default=1, help="videos: encode every N-th frame")
    parser.add_argument("--segment-frames", type=int, default=256, help="videos: ~N frames per segment")
    parser.add_argument("-O", "--opt", action="append", default=[], help="an -O option (repeatable)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2, help="torch threads, local and per Ray actor")
    parser.add_argument(
        "--actors", type=int, default=None, help="Ray encoder actors (default CPUs // threads)"
    )
    parser.add_argument(
        "--num-cpus", type=int, default=None, help="the local cluster's CPUs (default: cores)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="runs per engine, alternating")
    parser.add_argument("--limit", type=int, default=None, help="the first N inputs only")
    parser.add_argument("--redis", action="store_true", help="also measure the Redis tier's throughput")
    parser.add_argument("--redis-only", action="store_true", help="measure only the Redis tier")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.redis_only:
        redis = redis_throughput()
        print(json.dumps({"redis": redis}) if args.json else json.dumps(redis, indent=1))
        return

    import ray

    from vitedge.scale import EncodeJob, RayConfig, VideoConfig

    job = EncodeJob(
        model=args.model, opts=tuple(args.opt), cache="none", batch=args.batch, threads=args.threads
    )
    num_cpus = args.num_cpus or os.cpu_count() or 1
    ray_config = RayConfig(actors=args.actors, show_progress=False)
    video = VideoConfig(frame_step=args.frame_step, segment_frames=args.segment_frames)
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        scratch = Path(tmp)
        inputs = prepare_data(args.data, scratch, args.limit)
        t0 = time.perf_counter()
        ray.init(
            num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1"
        )
        cluster_s = time.perf_counter() - t0
        try:
            local, remote = [], []
            for r in range(args.rounds):
                local.append(
                    one_round(job, inputs, scratch / f"local{r}.parquet", "local", None, args.limit, video)
                )
                print(f"round {r}: local {local[-1]['steady_images_per_s']:.1f} img/s", file=sys.stderr)
                remote.append(
                    one_round(job, inputs, scratch / f"ray{r}.parquet", "ray", ray_config, args.limit, video)
                )
                print(f"round {r}: ray {remote[-1]['steady_images_per_s']:.1f} img/s", file=sys.stderr)
        finally:
            ray.shutdown()
    local_rate = statistics.median(r["steady_images_per_s"] for r in local)
    ray_rate = statistics.median(r["steady_images_per_s"] for r in remote)
    ratios = [b["steady_images_per_s"] / a["steady_images_per_s"] for a, b in zip(local, remote, strict=True)]
    first = remote[0]
    report = {
        "model": args.model,
        "name": " ".join(args.opt) or "baseline",
        "data": args.data,
        "batch": args.batch,
        "threads": args.threads,
        "num_cpus": num_cpus,
        "actors": args.actors or max(1, num_cpus // args.threads),
        "rounds": args.rounds,
        "ray_images_per_s": ray_rate,
        "local_images_per_s": local_rate,
        "throughput_ratio": ray_rate / local_rate,
        "ratio_low": min(ratios),
        "ratio_high": max(ratios),
        "round_ratios": ratios,
        "inputs": first["images"],
        "videos": first["videos"],
        "segments": first["segments"],
        "frame_step": args.frame_step,
        "segment_frames": args.segment_frames,
        "rows": first["rows"],
        "errors": len(first["errors"]),
        "nodes": len(first["nodes"]),
        "startup_s": {"cluster": cluster_s, "ray_first_batch": first["startup_s"]},
        "local_startup_s": local[0]["startup_s"],
        "ray_time_s": [r["time_s"] for r in remote],
        "local_time_s": [r["time_s"] for r in local],
    }
    if args.redis:
        report["redis"] = redis_throughput()
    if args.json:
        print(json.dumps(report))
    else:
        print(
            f"{args.model} on {args.data}: ray {ray_rate:.1f} img/s, local {local_rate:.1f} img/s, "
            f"ratio {report['throughput_ratio']:.3f} "
            f"[{report['ratio_low']:.3f}, {report['ratio_high']:.3f}], "
            f"{report['rows']} rows of {report['inputs']} inputs, startup {report['startup_s']}"
        )


if __name__ == "__main__":
    main()
