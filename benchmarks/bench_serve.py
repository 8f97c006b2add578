"""Load test of `vitedge serve`: throughput against the same model offline, latency per priority, overload and
the feature cache, on real images, with a bounded load generator on loopback (issue #18).

    python benchmarks/bench_serve.py --model timm:deit_tiny_patch16_224 --requests 600 --overload \\
        --overload-requests 2000 --json
    python benchmarks/bench_serve.py --model cifar-vit --requests 3000 --overload --overload-requests 10000 \\
        --repeat 20 --json
    python benchmarks/bench_serve.py --model timm:vit_base_patch16_224 --repeat 10 --requests 0 --json

It starts `vitedge serve MODEL [-O ...] --cache none --port 0 --json` itself (or takes `--url`), then, in
order, each phase with its own requests:

1. **unloaded**: one request at a time at batch 1 (``serial_images_per_s``, ``unloaded_p50_ms``);
2. **saturation**: ``--concurrency`` closed-loop clients (default 2x the batch the server chose, so a full
   next batch is always waiting), all at normal priority: throughput (``throughput_ratio``), p50/p95/p99,
   errors by code, the batches the server ran, the worker's busy fraction
   (``vitedge_worker_busy_seconds_total`` over the phase), the server's peak RSS;
   then **mixed**: the same load with every ``1/realtime_share``-th request (default 10 %) ``X-Priority:
   realtime``: p95 per priority (``realtime_over_normal_p95``) and what the realtime traffic costs in
   throughput (``mixed``);
3. **overload** (``--overload``): open-loop mixed arrivals at ``--overload-factor`` (2x) the mixed capacity
   against the same model and batch restarted with its queue per priority bounded (``--queue``, default one
   batch, so what is admitted waits for about as many batches as at capacity): 429s with Retry-After,
   admitted p99 against the mixed phase's p99, RSS and queue depth sampled through the run;
4. **cache** (``--repeat K``): a second server with ``--cache memory``; K distinct images each sent twice,
   end-to-end latency of the miss and of the hit.

Then, with the server stopped so it does not share the cores, the **offline** figure: the same model and stack
in this process, decoding and preprocessing the same JPEG bytes, at the batch size the server chose
(``throughput_ratio`` = served / offline). Every request targets 127.0.0.1 only; counts and times are bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvloop
from prometheus_client.parser import text_string_to_metric_families

from vitedge.paths import data_root

IN_FLIGHT = 256  # the open-loop generator's open requests at most


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- images -------------------------------------------------------------------------------------------
def load_images(data: str, limit: int) -> list[bytes]:
    """Up to ``limit`` JPEG files as bytes: ``cifar10`` (the test set, drawn across classes), ``imagenet``
    (the sample), or a folder."""
    if data == "cifar10":
        with tarfile.open(data_root() / "cifar10" / "test.tar.gz") as tar:
            members = sorted((m for m in tar.getmembers() if m.isfile()), key=lambda m: m.name)
            picks = np.linspace(0, len(members) - 1, num=min(limit, len(members))).round().astype(int)
            return [tar.extractfile(members[i]).read() for i in picks]  # type: ignore[union-attr]
    folder = data_root() / "imagenet-sample" if data == "imagenet" else Path(data)
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not files:
        raise SystemExit(f"no images in {folder}")
    return [p.read_bytes() for p in files[:limit]]


# --- the server -------------------------------------------------------------------------------------------
class Server:
    """`vitedge serve` in a subprocess on a free loopback port; stopped with SIGTERM."""

    def __init__(self, model: str, opts: list[str], extra: list[str]) -> None:
        cmd = [sys.executable, "-c", "from vitedge.cli import main; main()", "serve", model]
        for o in opts:
            cmd += ["-O", o]
        cmd += [*extra, "--host", "127.0.0.1", "--port", "0", "--json"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        started = time.monotonic()
        line = self._readline(timeout=300)
        self.ready: dict[str, Any] = json.loads(line)
        self.start_s = time.monotonic() - started
        self.url = str(self.ready["url"])
        self.pid = int(self.ready["pid"])

    def _readline(self, timeout: float) -> str:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        if not out or not out[0]:
            self.proc.kill()
            raise SystemExit(f"vitedge serve did not print its ready line within {timeout} s")
        return out[0]

    def rss(self) -> tuple[int, int]:
        """(current RSS, peak RSS) of the server process, in bytes."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
        return fields["VmRSS"], fields["VmHWM"]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def scrape(url: str) -> dict[str, float]:
    """The service's metrics, flattened: ``name{label=value,...}`` -> value."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    flat: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            flat[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return flat


# --- load generation --------------------------------------------------------------------------------------
@dataclass
class Result:
    priority: str
    status: int  # 0: transport failure
    seconds: float
    retry_after: str | None = None
    failure: str | None = None  # a transport failure's exception


@dataclass
class Load:
    results: list[Result] = field(default_factory=list)
    wall_s: float = 0.0

    def ok(self, priority: str | None = None) -> list[float]:
        return [r.seconds for r in self.results if r.status == 200 and priority in (None, r.priority)]

    def summary(self) -> dict[str, Any]:
        codes: dict[str, int] = {}
        for r in self.results:
            codes[str(r.status)] = codes.get(str(r.status), 0) + 1
        errors = sum(n for c, n in codes.items() if c not in ("200", "429"))
        ok = self.ok()
        out: dict[str, Any] = {
            "requests": len(self.results),
            "answered": len(ok),
            "wall_s": self.wall_s,
            "served_images_per_s": len(ok) / self.wall_s if self.wall_s else 0.0,
            "errors": errors,
            "errors_by_code": {c: n for c, n in codes.items() if c != "200"},
            "rejected": codes.get("429", 0),
            "retry_after_ok": all(
                r.retry_after is not None and int(r.retry_after) >= 1 for r in self.results if r.status == 429
            ),
        }
        failures: dict[str, int] = {}
        for r in self.results:
            if r.failure:
                failures[r.failure] = failures.get(r.failure, 0) + 1
        if failures:
            out["transport_failures"] = failures
        out.update(percentiles(ok))
        for priority in ("realtime", "normal"):
            mine = self.ok(priority)
            if mine:
                out.update({f"{priority}_{k}": v for k, v in percentiles(mine).items()})
        return out


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    if not seconds:
        return {"p50_ms": None, "p95_ms": None, "p99_ms": None}
    ms = np.asarray(seconds) * 1e3
    return {f"p{q}_ms": float(np.percentile(ms, q)) for q in (50, 95, 99)}


def priority_of(i: int, share: float) -> str:
    return "realtime" if share > 0 and i % round(1 / share) == 0 else "normal"


class LoopbackClient:
    """The load generator's HTTP/1.1 client: keep-alive connections to one loopback server over asyncio
    streams, a request written in one call and the answer read by Content-Length. httpx's async client
    spent more CPU per request than the server it loaded (80 % of a core at 330 requests/s against the
    server's 55 %), and the generator shares the server's two cores; this one spends a fraction of that.
    Only 127.0.0.1 is accepted."""

    def __init__(self, url: str, timeout: float = 120.0) -> None:
        if not url.startswith("http://127.0.0.1:"):
            raise ValueError(f"the load generator targets 127.0.0.1 only, got {url}")
        self.host, self.port = "127.0.0.1", int(url.rsplit(":", 1)[1].rstrip("/"))
        self.timeout = timeout
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []

    async def post(self, route: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
        """(status, response headers, lower-case names); the body is read and dropped.

        A kept-alive connection the server closed while it sat idle (uvicorn's keep-alive timeout) answers
        with an immediate end of stream and nothing read; the request is then sent once more on a new
        connection, as HTTP clients do for this race."""
        head = [f"POST {route} HTTP/1.1", f"Host: {self.host}:{self.port}", f"Content-Length: {len(body)}"]
        head += [f"{k}: {v}" for k, v in headers.items()]
        request = ("\r\n".join(head) + "\r\n\r\n").encode() + body
        while True:
            reused = bool(self.idle)
            conn = self.idle.pop() if reused else await asyncio.open_connection(self.host, self.port)
            reader, writer = conn
            writer.write(request)
            try:
                status, answer = await asyncio.wait_for(self._read(reader), self.timeout)
                break
            except asyncio.IncompleteReadError as e:
                writer.close()
                if not (reused and not e.partial):
                    raise
            except BaseException:
                writer.close()
                raise
        if answer.get("connection", "").lower() == "close":
            writer.close()
        else:
            self.idle.append(conn)
        return status, answer

    @staticmethod
    async def _read(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
        lines = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        answer = {}
        for line in lines[1:]:
            if line:
                key, _, value = line.partition(":")
                answer[key.strip().lower()] = value.strip()
        if "content-length" in answer:
            await reader.readexactly(int(answer["content-length"]))
        elif answer.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await reader.readexactly(size + 2)
                if size == 0:
                    break
        return status, answer

    async def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _post(client: LoopbackClient, route: str, body: bytes, priority: str) -> Result:
    start = time.perf_counter()
    try:
        status, headers = await client.post(route, body, {"X-Priority": priority})
        return Result(priority, status, time.perf_counter() - start, headers.get("retry-after"))
    except (TimeoutError, OSError, asyncio.IncompleteReadError, ValueError) as e:
        return Result(priority, 0, time.perf_counter() - start, failure=f"{type(e).__name__}: {e}"[:120])


def closed_loop(
    url: str, route: str, bodies: list[bytes], *, requests: int, concurrency: int, share: float, max_s: float
) -> Load:
    """``concurrency`` clients, each sending its next request when the last is answered; ``requests`` in all
    or until ``max_s`` seconds have passed."""

    async def run() -> Load:
        load = Load()
        counter = iter(range(requests))
        stop_at = time.perf_counter() + max_s
        client = LoopbackClient(url)

        async def one_client() -> None:
            for i in counter:
                if time.perf_counter() > stop_at:
                    return
                body = bodies[i % len(bodies)]
                load.results.append(await _post(client, route, body, priority_of(i, share)))

        start = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        load.wall_s = time.perf_counter() - start
        await client.close()
        return load

    return uvloop.run(run())


def saturate(
    url: str, route: str, bodies: list[bytes], args: argparse.Namespace, *, concurrency: int, share: float
) -> dict[str, Any]:
    """A closed-loop saturation phase: the load's summary, the worker's busy fraction and the batches run."""
    before = scrape(url)
    load = closed_loop(
        url,
        route,
        bodies,
        requests=args.requests,
        concurrency=concurrency,
        share=share,
        max_s=args.max_seconds,
    )
    after = scrape(url)
    out = load.summary()
    busy = after["vitedge_worker_busy_seconds_total"] - before["vitedge_worker_busy_seconds_total"]
    out["busy_fraction"] = busy / load.wall_s
    batches = after["vitedge_batch_size_count"] - before["vitedge_batch_size_count"]
    images = after["vitedge_batch_size_sum"] - before["vitedge_batch_size_sum"]
    out["batches"] = int(batches)
    out["mean_batch"] = images / batches if batches else None
    out["realtime_share"] = share
    kind = f"{share:.0%} realtime" if share else "normal only"
    log(f"saturation ({kind}): {out['served_images_per_s']:.1f} img/s, p95 {out['p95_ms']:.0f} ms")
    return out


def open_loop(
    server: Server,
    route: str,
    bodies: list[bytes],
    *,
    requests: int,
    rate: float,
    share: float,
    max_s: float,
) -> tuple[Load, list[tuple[float, int, int]]]:
    """Requests arriving at ``rate`` per second whatever the answers (``requests`` in all or ``max_s``
    seconds); samples (time, RSS, queue depth) every half second."""
    samples: list[tuple[float, int, int]] = []
    done = threading.Event()

    def sample() -> None:  # in a thread: a scrape must not stall the arrivals
        start = time.perf_counter()
        while not done.wait(0.5):
            depth = sum(v for k, v in scrape(server.url).items() if k.startswith("vitedge_queue_depth"))
            samples.append((time.perf_counter() - start, server.rss()[0], int(depth)))

    async def run() -> Load:
        load = Load()
        # at most IN_FLIGHT requests open at once (one connection each); an arrival that finds them all
        # busy waits for a slot, and its latency still counts from when it was due, so a client-side
        # backlog shows up in the figures rather than hiding
        slots = asyncio.Semaphore(IN_FLIGHT)
        client = LoopbackClient(server.url)

        async def one(i: int, due: float) -> None:
            async with slots:
                r = await _post(client, route, bodies[i % len(bodies)], priority_of(i, share))
            r.seconds = time.perf_counter() - due
            load.results.append(r)

        start = time.perf_counter()
        tasks = []
        for i in range(requests):
            due = start + i / rate
            now = time.perf_counter()
            if now - start > max_s:
                break
            if due > now:
                await asyncio.sleep(due - now)
            tasks.append(asyncio.ensure_future(one(i, due)))
        await asyncio.gather(*tasks)
        load.wall_s = time.perf_counter() - start
        await client.close()
        return load

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        return uvloop.run(run()), samples
    finally:
        done.set()
        sampler.join(5)


def serial(url: str, route: str, bodies: list[bytes], n: int) -> list[float]:
    """One request at a time: the latency of each (seconds)."""
    times = []
    with httpx.Client(base_url=url, timeout=120) as client:
        for body in bodies[:n]:
            start = time.perf_counter()
            r = client.post(route, content=body)
            if r.status_code != 200:
                raise SystemExit(f"serial request failed: {r.status_code} {r.text[:200]}")
            times.append(time.perf_counter() - start)
    return times


# --- offline --------------------------------------------------------------------------------------------
def offline_images_per_s(
    model: str, opts: list[str], bodies: list[bytes], *, batch: int, threads: int, max_s: float
) -> float:
    """The same model and stack in this process: decode and preprocess the same JPEG bytes, run batches of
    ``batch`` (features and, with a head, logits, as the server does)."""
    import torch

    from vitedge.commands import build_model
    from vitedge.data import build_transform, decode_image_bytes, to_uint8_tensor
    from vitedge.options import parse_options

    torch.set_num_threads(threads)
    enc = build_model(model, parse_options(opts), img_size=None, weights=None).eval()
    transform = build_transform(enc.preprocess)

    def run(chunk: list[bytes]) -> None:
        xs = [transform.batch(to_uint8_tensor(decode_image_bytes(b, name="bench"))) for b in chunk]
        with torch.inference_mode():
            x = torch.stack(xs).to(enc.compute_dtype)
            with enc.autocast(x):
                feats = enc.forward_features(x)
                if enc.info.num_classes:
                    enc.forward_head(feats)

    run(bodies[:batch])  # warm-up at this shape
    run(bodies[:batch])
    done, start = 0, time.perf_counter()
    while done < len(bodies) and time.perf_counter() - start < max_s:
        chunk = bodies[done : done + batch]
        if len(chunk) < batch:
            break
        run(chunk)
        done += len(chunk)
    return done / (time.perf_counter() - start)


# --- phases -----------------------------------------------------------------------------------------------
def cache_phase(args: argparse.Namespace, bodies: list[bytes]) -> dict[str, Any]:
    server = Server(args.model, args.opt, ["--cache", "memory", "--max-batch", "1"])
    try:
        misses, hits = [], []
        with httpx.Client(base_url=server.url, timeout=120) as client:
            for body in bodies[: args.repeat]:
                for bucket, want in ((misses, "miss"), (hits, "memory")):
                    start = time.perf_counter()
                    r = client.post(args.route, content=body)
                    bucket.append(time.perf_counter() - start)
                    if r.status_code != 200 or r.headers.get("x-cache") != want:
                        raise SystemExit(f"expected a {want}, got {r.status_code} {r.headers.get('x-cache')}")
    finally:
        server.stop()
    miss, hit = float(np.median(misses)) * 1e3, float(np.median(hits)) * 1e3
    return {"images": len(misses), "miss_p50_ms": miss, "hit_p50_ms": hit, "hit_speedup": miss / hit}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("-O", "--opt", action="append", default=[])
    ap.add_argument(
        "--data", default=None, help="cifar10, imagenet or a folder (default: by the model's size)"
    )
    ap.add_argument("--url", default=None, help="load an already running service instead of starting one")
    ap.add_argument("--route", default="/v1/encode", choices=["/v1/encode", "/v1/classify"])
    ap.add_argument("--requests", type=int, default=1000, help="saturation requests (0: skip)")
    ap.add_argument("--concurrency", default="auto", help="closed-loop clients (auto: 2x the server's batch)")
    ap.add_argument("--realtime-share", type=float, default=0.1)
    ap.add_argument("--serial", type=int, default=30, help="requests of the unloaded phase")
    ap.add_argument("--max-batch", default="auto")
    ap.add_argument(
        "--queue", type=int, default=None, help="overload: queue per priority (default: the batch)"
    )
    ap.add_argument("--overload", action="store_true")
    ap.add_argument("--overload-requests", type=int, default=2000)
    ap.add_argument("--overload-factor", type=float, default=2.0)
    ap.add_argument("--repeat", type=int, default=0, help="cache phase: K distinct images each sent twice")
    ap.add_argument("--max-seconds", type=float, default=300.0, help="time limit per phase")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.url is not None and not args.url.startswith("http://127.0.0.1:"):
        raise SystemExit("--url must be a loopback address (http://127.0.0.1:PORT)")
    data = args.data or ("cifar10" if args.model in ("cifar-vit", "cifar-swin") else "imagenet")
    bodies = load_images(data, max(args.requests, args.overload_requests, 1000))
    out: dict[str, Any] = {"model": args.model, "name": " ".join(args.opt) or "baseline", "data": data}
    out["route"] = args.route

    if args.requests > 0:
        extra = ["--cache", "none", "--max-batch", str(args.max_batch), "--threads", str(args.threads)]
        server = Server(args.model, args.opt, extra) if args.url is None else None
        url = server.url if server else args.url
        if server is not None:
            ready = server.ready
        else:
            ready = {"batcher": {"max_batch": int(httpx.get(f"{url}/readyz").json()["max_batch"])}}
        batch = int(ready["batcher"]["max_batch"])
        concurrency = 2 * batch if args.concurrency == "auto" else int(args.concurrency)
        out["startup_s"] = server.start_s if server else None
        out["max_batch"] = batch
        out["sweep"] = ready["batcher"].get("sweep")
        out["concurrency"] = concurrency
        out["saturated"] = concurrency >= 2 * batch
        state = "saturating" if out["saturated"] else "NOT saturating"
        log(f"server at {url}: batch {batch}, {concurrency} clients ({state})")

        serial(url, args.route, bodies[-5:], 5)  # the first requests page code in
        times = serial(url, args.route, bodies, args.serial)
        out["serial_images_per_s"] = len(times) / sum(times)
        out["unloaded_p50_ms"] = float(np.median(times)) * 1e3

        # throughput: every client at normal priority, so the batches are the server's full batches
        sat = saturate(url, args.route, bodies, args, concurrency=concurrency, share=0.0)
        out.update(sat)
        # priorities: the same load with every 1/share-th request realtime
        if args.realtime_share > 0:
            mixed = saturate(
                url, args.route, bodies, args, concurrency=concurrency, share=args.realtime_share
            )
            out["mixed"] = mixed
            if mixed.get("realtime_p95_ms") and mixed.get("normal_p95_ms"):
                out["realtime_p95_ms"] = mixed["realtime_p95_ms"]
                out["realtime_over_normal_p95"] = mixed["realtime_p95_ms"] / mixed["normal_p95_ms"]
        summary = out.get("mixed", sat)  # the overload phase's traffic is the mixed traffic
        if server is not None:
            out["peak_rss_bytes"] = server.rss()[1]

        if args.overload and server is not None:
            # the same model and batch, its queue per priority bounded (default: one batch) so that what is
            # admitted waits for about as many batches as at capacity
            out["exit_code"] = server.stop()
            queue = args.queue or batch
            pinned = ["--cache", "none", "--max-batch", str(batch), "--queue", str(queue)]
            server = Server(args.model, args.opt, [*pinned, "--threads", str(args.threads)])
            serial(server.url, args.route, bodies[-5:], 5)
            capacity = summary["served_images_per_s"]
            rate = args.overload_factor * capacity
            log(f"overload: {args.overload_requests} requests at {rate:.0f}/s (capacity {capacity:.0f}/s)")
            over, samples = open_loop(
                server,
                args.route,
                bodies,
                requests=args.overload_requests,
                rate=rate,
                share=args.realtime_share,
                max_s=args.max_seconds,
            )
            o = over.summary()
            rss = [s[1] for s in samples]
            depth = [s[2] for s in samples]
            third = max(1, len(rss) // 3)
            o.update(
                rate_per_s=rate,
                queue_bound=queue,
                p99_over_capacity_p99=(o["p99_ms"] / summary["p99_ms"]) if o["p99_ms"] else None,
                rss_first_third_bytes=int(np.median(rss[:third])) if rss else None,
                rss_last_third_bytes=int(np.median(rss[-third:])) if rss else None,
                queue_depth_max=max(depth) if depth else None,
                queue_depth_last_third_mean=float(np.mean(depth[-third:])) if depth else None,
                # the RSS trajectory: the median of each tenth of the run, to tell growth from a plateau
                rss_tenths_bytes=[int(np.median(part)) for part in np.array_split(rss, 10) if len(part)],
            )
            out["overload"] = o
            out["peak_rss_bytes"] = server.rss()[1]
        if server is not None:
            out["exit_code"] = server.stop()
        out["offline_images_per_s"] = offline_images_per_s(
            args.model, args.opt, bodies, batch=batch, threads=args.threads, max_s=min(args.max_seconds, 60)
        )
        out["throughput_ratio"] = out["served_images_per_s"] / out["offline_images_per_s"]
        out["serial_over_offline"] = out["serial_images_per_s"] / out["offline_images_per_s"]
    if args.repeat:
        out["cache"] = cache_phase(args, bodies)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
