"""Ray Serve replicas against one `vitedge serve` process, same model, stack, batch cap and load (issue #19).

    python benchmarks/bench_ray_serve.py --model timm:deit_tiny_patch16_224 --data imagenet --json
    python benchmarks/bench_ray_serve.py --model cifar-vit --data cifar10 --json

Each round starts each engine in turn on a free loopback port, saturates it with a closed loop of
``--concurrency`` clients (``--requests`` in all, or ``--max-seconds``, whichever ends first), and stops it
with SIGTERM before the next starts, so no two share the cores. ``local`` is ``vitedge serve --threads
LOCAL_THREADS`` (one process, one model worker); each ``--ingress`` is ``vitedge serve --engine ray
--replicas R --threads T --ingress I`` on a local Ray cluster of R x T CPUs on loopback (``proxy``: Ray
Serve's proxy actor; ``haproxy``: its HAProxy ingress). Rounds repeat the sequence (local, proxy, haproxy,
local, ...). The feature cache is off, so every request runs the model; all engines use the same
``--max-batch`` and ``--max-wait-ms``. A short unmeasured warm-up burst precedes each measured loop. The
load generator is bench_serve.py's loopback client.

Prints one JSON object: ``local_images_per_s`` (the median over rounds), ``ratios`` (per ingress:
``throughput_ratio``, Ray's median over local's, and ``ratio_low`` / ``ratio_high``, the extremes of one
round's pair), ``engines`` (per engine: images/s, p50/p95 latency, errors, start-up time, exit codes), and
the settings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import Server, closed_loop, load_images, log


def measure(cmd_extra: list[str], args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    """Start a server, warm it up, saturate it, stop it; its summary with ``startup_s`` and ``exit``."""
    started = time.perf_counter()
    server = Server(args.model, args.opt, cmd_extra)
    startup_s = time.perf_counter() - started
    try:
        warm = bodies[: max(4, args.concurrency)]
        closed_loop(server.url, args.route, warm, requests=len(warm), concurrency=4, share=0.0, max_s=60)
        load = closed_loop(
            server.url,
            args.route,
            bodies,
            requests=args.requests,
            concurrency=args.concurrency,
            share=0.0,
            max_s=args.max_seconds,
        )
    finally:
        code = server.stop()
    out = load.summary()
    out["startup_s"] = startup_s
    out["exit"] = code
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:deit_tiny_patch16_224")
    ap.add_argument("-O", "--opt", action="append", default=[])
    ap.add_argument("--data", default="imagenet", help="imagenet (the sample), cifar10, or a folder")
    ap.add_argument("--images", type=int, default=200, help="distinct images, cycled")
    ap.add_argument("--route", default="/v1/encode", choices=["/v1/encode", "/v1/classify"])
    ap.add_argument("--requests", type=int, default=600, help="measured requests per round")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-seconds", type=float, default=120.0, help="time limit of one measured loop")
    ap.add_argument("--max-batch", default="16")
    ap.add_argument("--max-wait-ms", default="10")
    ap.add_argument("--replicas", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per Ray replica")
    ap.add_argument("--local-threads", type=int, default=2, help="torch threads of the one local process")
    ap.add_argument("--max-ongoing", type=int, default=64, help="requests a replica holds at once")
    ap.add_argument("--ingress", default="proxy,haproxy", help="Ray Serve ingresses to measure, in turn")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.rounds < 1 or args.requests < 1 or args.concurrency < 1:
        ap.error("--rounds, --requests and --concurrency must be >= 1")
    bodies = load_images(args.data, args.images)
    common = ["--cache", "none", "--max-batch", args.max_batch, "--max-wait-ms", args.max_wait_ms]
    local_cmd = [*common, "--threads", str(args.local_threads)]
    cpus = args.replicas * args.threads
    ray_cmd = [
        *common,
        "--engine",
        "ray",
        "--replicas",
        str(args.replicas),
        "--threads",
        str(args.threads),
        "--num-cpus",
        str(cpus),
        "--max-ongoing",
        str(args.max_ongoing),
    ]
    ingresses = [i for i in args.ingress.split(",") if i]
    runs: dict[str, list[dict[str, Any]]] = {"local": [], **{i: [] for i in ingresses}}
    for r in range(args.rounds):
        for engine in runs:
            extra = local_cmd if engine == "local" else [*ray_cmd, "--ingress", engine]
            runs[engine].append(measure(extra, args, bodies))
            log(f"round {r}: {engine} {runs[engine][-1]['served_images_per_s']:.1f} img/s")

    def digest(results: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "images_per_s": statistics.median(x["served_images_per_s"] for x in results),
            "round_images_per_s": [x["served_images_per_s"] for x in results],
            "p50_ms": [x["p50_ms"] for x in results],
            "p95_ms": [x["p95_ms"] for x in results],
            "requests": [x["requests"] for x in results],
            "errors": sum(x["errors"] for x in results),
            "rejected": sum(x["rejected"] for x in results),
            "startup_s": [x["startup_s"] for x in results],
            "exit": [x["exit"] for x in results],
        }

    local_rate = digest(runs["local"])["images_per_s"]
    ratios = {}
    for ingress in ingresses:
        pairs = [
            b["served_images_per_s"] / a["served_images_per_s"]
            for a, b in zip(runs["local"], runs[ingress], strict=True)
        ]
        ratios[ingress] = {
            "throughput_ratio": digest(runs[ingress])["images_per_s"] / local_rate,
            "ratio_low": min(pairs),
            "ratio_high": max(pairs),
            "round_ratios": pairs,
        }
    report = {
        "model": args.model,
        "name": " ".join(args.opt) or "baseline",
        "data": args.data,
        "route": args.route,
        "max_batch": args.max_batch,
        "concurrency": args.concurrency,
        "replicas": args.replicas,
        "threads_per_replica": args.threads,
        "local_threads": args.local_threads,
        "rounds": args.rounds,
        "local_images_per_s": local_rate,
        "ratios": ratios,
        "engines": {engine: digest(results) for engine, results in runs.items()},
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.model}: local ({args.local_threads} threads) {local_rate:.1f} img/s")
        for ingress, r in ratios.items():
            print(
                f"  ray {args.replicas}x{args.threads} via {ingress}: ratio {r['throughput_ratio']:.3f} "
                f"[{r['ratio_low']:.3f}, {r['ratio_high']:.3f}]"
            )


if __name__ == "__main__":
    main()
