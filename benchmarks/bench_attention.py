"""Attention variants against fused SDPA, from ViT-B's 196 tokens to 16k (issue #21).

    python benchmarks/bench_attention.py --json > docs/results/attention.json
    python benchmarks/bench_attention.py --quick --json

**Attention alone** at ViT-B width (12 heads x 64, batch 1, fp32, ``--threads`` torch threads) for each
token count N (196 ... 16384, squares, so a 2-D grid exists for windows): latency (median of
``--repeat`` calls, the methods interleaved within each repetition so drift hits them alike) and peak
memory of

- ``sdpa``: PyTorch's fused CPU kernel (``F.scaled_dot_product_attention``);
- ``unfused``: the materialised softmax(q k^T / sqrt(d)) v (scores and their softmax held in memory);
- ``performer``: FAVOR+ with ``--features`` (256) random features (``-O linear``);
- ``elu``: ELU+1 linear attention (``-O linear:kind=elu``);
- ``linformer``: keys and values projected to ``--linformer-k`` (256) rows (``-O linformer``);
- ``window``: 14 x 14 windows of the patch grid plus one class token (``-O window``'s windowed block);
- ``int8``: ``-O int8attn``'s INT8 products (only up to 4096 tokens: its int32 scores alone would need
  12 GiB at 16k).

**Peak memory** is what the op allocates beyond its inputs: each (method, N) runs once in a child
process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (so every tensor is its own mapping, returned to the
kernel when freed), which resets its peak RSS through ``/proc/self/clear_refs`` after making the inputs and
reads ``VmHWM`` minus the RSS before the call. PyTorch's CPU allocator does not cache, so this is the op's
own high-water mark (plus a few pages of noise).

Where ``unfused`` cannot run whole (12 x 16384^2 fp32 scores are 12 GiB, twice that with the softmax),
it is timed and measured **one head at a time and scaled by the head count** (the row says ``per_head``);
from ``--unfused-per-head-from`` (default 9216) tokens.

**End to end** (``--e2e``, off with ``--quick``): ViT-B/16 with random weights at 448, 896 and 1024 px,
the unmodified model against ``-O window:size=14,global_blocks=4`` and ``-O linear``; the windowed model's
feature cosine to global attention is reported as a mechanics check (random weights).

``--json`` prints one object: ``rows`` (``method``, ``tokens``, ``ms``, ``ms_spread`` (min-max over the
repetitions), ``peak_bytes``, ``speedup_vs_sdpa``, ``memory_vs_sdpa``, ``memory_vs_unfused``), ``crossover``
(method -> the smallest measured N from which it is faster than SDPA at every larger N, or None), and
``e2e``. ``--plot FILE`` draws latency and memory against N.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from vitedge.attention.int8 import Int8AttnConfig, int8_attention
from vitedge.attention.linear import linear_attention, orthogonal_features
from vitedge.attention.linformer import linformer_attention, linformer_projection
from vitedge.attention.window import window_attention

HEADS, DIM = 12, 64
FULL_TOKENS = [196, 576, 1024, 2304, 4096, 9216, 16384]
QUICK_TOKENS = [196, 1024, 4096]
METHODS = ["sdpa", "unfused", "performer", "elu", "linformer", "window", "int8"]
INT8_MAX_TOKENS = 4096
WINDOW = 14


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def inputs(n: int, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    return tuple(torch.randn(1, heads, n, DIM, generator=g) * 0.5 for _ in range(3))  # type: ignore[return-value]


def make_op(method: str, n: int, args: argparse.Namespace) -> Any:
    """A callable (q, k, v) -> out for ``method`` at ``n`` tokens (its fixed tensors built here)."""
    scale = DIM**-0.5
    if method == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v)
    if method == "unfused":
        return lambda q, k, v: ((q @ k.transpose(-2, -1)) * scale).softmax(-1) @ v
    if method == "performer":
        proj = orthogonal_features(args.features, DIM, generator=torch.Generator().manual_seed(0))
        return lambda q, k, v: linear_attention(q, k, v, kind="performer", proj=proj, chunk=args.chunk)
    if method == "elu":
        return lambda q, k, v: linear_attention(q, k, v, kind="elu", chunk=args.chunk)
    if method == "linformer":
        e = linformer_projection(args.linformer_k, n - 1, seed=0)
        f = linformer_projection(args.linformer_k, n - 1, seed=1)
        return lambda q, k, v: linformer_attention(q, k, v, e, f, prefix=1)
    if method == "window":  # a square grid of n patches, no prefix token
        side = math.isqrt(n)
        return lambda q, k, v: window_attention(q, k, v, prefix=0, grid=(side, side), size=WINDOW)
    if method == "int8":
        config = Int8AttnConfig()
        return lambda q, k, v: int8_attention(q, k, v, config=config)
    raise ValueError(method)


def runs(method: str, n: int) -> bool:
    return not (method == "int8" and n > INT8_MAX_TOKENS)


def per_head(method: str, n: int, args: argparse.Namespace) -> bool:
    return method == "unfused" and n >= args.unfused_per_head_from


def time_once(op: Any, n: int, heads: int) -> float:
    q, k, v = inputs(n, heads)
    start = time.perf_counter()
    with torch.inference_mode():
        op(q, k, v)
    return time.perf_counter() - start


# --- memory (child process) --------------------------------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


def memory_child(spec: str) -> None:
    """Run in a child: each (method, n) of ``spec`` once, printing its peak bytes beyond the inputs."""
    job = json.loads(spec)
    args = argparse.Namespace(**job["args"])
    torch.set_num_threads(args.threads)
    out = []
    for method, n in job["cases"]:
        heads = 1 if per_head(method, n, args) else HEADS
        op = make_op(method, n, args)
        q, k, v = inputs(n, heads)
        with torch.inference_mode():
            op(*inputs(min(n, 196 if method not in ("window", "linformer") else n), heads))  # page code in
            before = _status()["VmRSS"]
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            op(q, k, v)
            peak = _status()["VmHWM"] - before
        out.append({"method": method, "tokens": n, "peak_bytes": max(0, peak) * (HEADS // heads)})
    print(json.dumps(out))


def measure_memory(cases: list[tuple[str, int]], args: argparse.Namespace) -> dict[tuple[str, int], int]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    spec = json.dumps({"args": vars(args) | {"plot": None}, "cases": cases})
    proc = subprocess.run(
        [sys.executable, __file__, "--memory-child", spec],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"memory child failed:\n{proc.stderr[-3000:]}")
    return {(r["method"], r["tokens"]): r["peak_bytes"] for r in json.loads(proc.stdout)}


# --- end to end -------------------------------------------------------------------------------------
def end_to_end(args: argparse.Namespace) -> list[dict[str, Any]]:
    import copy

    import vitedge
    from vitedge.models import load
    from vitedge.options import parse_options

    rows = []
    for px in args.e2e_sizes:
        torch.manual_seed(0)
        base = load("timm:vit_base_patch16_224", img_size=px)
        variants = {"baseline": base}
        for opt in (f"window:size={WINDOW},global_blocks=4", f"linear:features={args.features}"):
            variants[opt] = vitedge.optimize_(copy.deepcopy(base), *parse_options([opt]))
        x = base.example_input(1)
        times: dict[str, list[float]] = {name: [] for name in variants}
        outs = {}
        with torch.inference_mode():
            for name, model in variants.items():
                outs[name] = model.forward_features(x)  # warm-up, and the features compared
            for _ in range(args.e2e_repeat):
                for name, model in variants.items():
                    start = time.perf_counter()
                    model.forward_features(x)
                    times[name].append(time.perf_counter() - start)
        ref = statistics.median(times["baseline"])
        for name, ts in times.items():
            cos = F.cosine_similarity(outs[name].flatten(1), outs["baseline"].flatten(1)).item()
            row = {
                "img_size": px,
                "tokens": base.layout.num_tokens,
                "name": name,
                "ms": statistics.median(ts) * 1e3,
                "ms_spread": [min(ts) * 1e3, max(ts) * 1e3],
                "speedup": ref / statistics.median(ts),
                "feature_cosine": cos,
            }
            rows.append(row)
            log(f"e2e {px}px {name}: {row['ms']:.0f} ms ({row['speedup']:.2f}x), cosine {cos:.3f}")
    return rows


def crossover(rows: list[dict[str, Any]], method: str) -> int | None:
    """The smallest N from which ``method`` beats SDPA at every larger measured N (None: never)."""
    mine = sorted(
        (r for r in rows if r["method"] == method and r["speedup_vs_sdpa"]), key=lambda r: r["tokens"]
    )
    found = None
    for r in reversed(mine):
        if r["speedup_vs_sdpa"] > 1.0:
            found = r["tokens"]
        else:
            break
    return found


def plot(rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for method in METHODS:
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["tokens"])
        if not mine:
            continue
        ns = [r["tokens"] for r in mine]
        ax1.plot(ns, [r["ms"] for r in mine], marker="o", label=method)
        ax2.plot(ns, [r["peak_bytes"] / 2**20 for r in mine], marker="o", label=method)
    for ax, label in ((ax1, "latency (ms)"), (ax2, "peak memory beyond inputs (MiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("tokens N")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    ax1.legend()
    fig.suptitle(
        f"attention at ViT-B width ({HEADS} heads x {DIM}), batch 1, {torch.get_num_threads()} threads"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="attention only, N = 196, 1024, 4096")
    ap.add_argument("--tokens", default=None, help="comma-separated token counts")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--features", type=int, default=256)
    ap.add_argument("--linformer-k", type=int, default=256)
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--unfused-per-head-from", type=int, default=9216)
    ap.add_argument("--e2e", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--e2e-sizes", default="448,896,1024")
    ap.add_argument("--e2e-repeat", type=int, default=3)
    ap.add_argument("--plot", default=None)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.memory_child:
        memory_child(args.memory_child)
        return
    torch.set_num_threads(args.threads)
    tokens = (
        [int(t) for t in args.tokens.split(",")]
        if args.tokens
        else QUICK_TOKENS
        if args.quick
        else FULL_TOKENS
    )
    methods = args.methods.split(",")
    unknown = set(methods) - set(METHODS)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; choose from {', '.join(METHODS)}")
    args.e2e_sizes = [int(s) for s in args.e2e_sizes.split(",")]
    if args.e2e is None:
        args.e2e = not args.quick

    rows: list[dict[str, Any]] = []
    for n in tokens:
        cases = [m for m in methods if runs(m, n)]
        ops = {m: make_op(m, n, args) for m in cases}
        for m in cases:  # warm-up: first calls set up kernels and threads
            time_once(ops[m], min(n, 1024) if m in ("sdpa", "unfused", "int8") else n, 1)
        times: dict[str, list[float]] = {m: [] for m in cases}
        for _ in range(args.repeat):
            for m in cases:
                heads = 1 if per_head(m, n, args) else HEADS
                times[m].append(time_once(ops[m], n, heads) * (HEADS // heads))
        memory = measure_memory([(m, n) for m in cases], args)
        sdpa = statistics.median(times["sdpa"]) if "sdpa" in times else None
        for m in cases:
            ms = statistics.median(times[m]) * 1e3
            rows.append(
                {
                    "method": m,
                    "tokens": n,
                    "ms": ms,
                    "ms_spread": [min(times[m]) * 1e3, max(times[m]) * 1e3],
                    "peak_bytes": memory[(m, n)],
                    "per_head": per_head(m, n, args),
                    "speedup_vs_sdpa": (sdpa * 1e3 / ms) if sdpa else None,
                }
            )
        by = {r["method"]: r for r in rows if r["tokens"] == n}
        for r in by.values():
            r["memory_vs_sdpa"] = r["peak_bytes"] / by["sdpa"]["peak_bytes"] if "sdpa" in by else None
            r["memory_vs_unfused"] = (
                r["peak_bytes"] / by["unfused"]["peak_bytes"] if "unfused" in by else None
            )
        log(
            f"N={n}: "
            + ", ".join(f"{m} {by[m]['ms']:.1f} ms / {by[m]['peak_bytes'] / 2**20:.0f} MiB" for m in cases)
        )
    out: dict[str, Any] = {
        "threads": args.threads,
        "heads": HEADS,
        "head_dim": DIM,
        "features": args.features,
        "linformer_k": args.linformer_k,
        "window": WINDOW,
        "rows": rows,
        "crossover": {m: crossover(rows, m) for m in methods if m != "sdpa"},
        "memory_method": "child process, MALLOC_MMAP_THRESHOLD_=65536, VmHWM after clear_refs minus VmRSS",
    }
    if args.e2e:
        out["e2e"] = end_to_end(args)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k}: {v}")


if __name__ == "__main__":
    main()
