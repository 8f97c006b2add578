"""Compression and token-reduction recipes on cifar-vit: accuracy on the CIFAR-10 test set against speed, both
measured in this run against the unmodified fp32 model (batch 64, 2 threads, each recipe timed interleaved
with the baseline).

A recipe is a model (``cifar-vit``, or a directory written by ``vitedge train ... -O`` such as a recovered
structured-pruned model) plus ``-O`` options stacked on it in order. Writes one JSON line per recipe, a
Markdown table, and with ``--plot`` a PNG of top-1 against speed-up.

    python benchmarks/bench_cifar_recipes.py [--recipe "OPT OPT" ...] [--trained DIR ...]
                                             [--on-trained "OPT OPT" ...] [--limit N] [--rounds K]
                                             [--plot FILE.png]

Each ``--trained`` directory is measured as trained and with each ``--on-trained`` stack (default: the
``ON_TRAINED`` list); a directory trained with ``-O merge`` refuses a second merge, so give it its own stacks.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch

from vitedge.api import optimize_
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.measure.bench import BenchConfig, bench_against_baseline
from vitedge.measure.evaluate import evaluate
from vitedge.models import load
from vitedge.options import parse_options

BASE = "cifar-vit"
RECIPES: list[tuple[str, list[str]]] = [
    (BASE, ["int8"]),
    (BASE, ["bf16"]),
    (BASE, ["merge:r=4"]),
    (BASE, ["merge:r=5"]),
    (BASE, ["merge:r=5,keep_norm=0"]),
    (BASE, ["prune:keep=0.9"]),
    (BASE, ["prune:keep=0.8"]),
    (BASE, ["merge:r=4", "int8"]),
    (BASE, ["merge:r=5", "int8"]),
    (BASE, ["merge:r=4", "bf16"]),
    (BASE, ["structured:heads=0.5,mlp=0.5"]),
    (BASE, ["compile"]),
    (BASE, ["bf16", "compile"]),
    (BASE, ["merge:r=5", "bf16", "compile"]),
]
ON_TRAINED = [[], ["int8"], ["bf16"], ["merge:r=2", "bf16"], ["merge:r=4", "bf16"], ["merge:r=4", "int8"]]


def build(model: str, opts: list[str]) -> torch.nn.Module:
    return optimize_(load(model), *parse_options(opts)).eval()


def label(model: str, opts: list[str]) -> str:
    path = Path(model)  # a training run's runs/NAME/model, or a committed artifacts/NAME
    head = "" if model == BASE else f"[{path.parent.name if path.name == 'model' else path.name}] "
    return head + (" ".join(opts) or "as trained")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--trained", action="append", default=[], help="a model directory from vitedge train -O"
    )
    parser.add_argument(
        "--on-trained",
        action="append",
        default=None,
        help='-O options stacked on each --trained directory, space-separated ("" = as trained); repeat',
    )
    parser.add_argument(
        "--recipe",
        action="append",
        default=None,
        help="-O options stacked on cifar-vit, space-separated; repeat (default: the RECIPES list)",
    )
    parser.add_argument("--limit", type=int, default=None, help="evaluate on N test images (default all)")
    parser.add_argument("--seconds", type=float, default=4.0, help="timing window per pair")
    parser.add_argument(
        "--rounds", type=int, default=1, help="repeat the interleaved timing; report each median speed-up"
    )
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--only-trained", action="store_true", help="skip the untrained-recipe list")
    parser.add_argument("--only", choices=("accuracy", "speed"), help="measure only this (the other shows -)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(2)
    if args.only_trained:
        recipes = []
    elif args.recipe is not None:
        recipes = [(BASE, r.split()) for r in args.recipe]
    else:
        recipes = list(RECIPES)
    stacks = ON_TRAINED if args.on_trained is None else [o.split() for o in args.on_trained]
    recipes += [(d, opts) for d in args.trained for opts in stacks]
    baseline = load(BASE).eval()
    variants = {label(m, o): build(m, o) for m, o in recipes}
    ds = open_dataset("cifar10", baseline.preprocess, limit=args.limit)
    acc: dict[str, float] = {}
    if args.only != "speed":
        results = evaluate({"baseline": baseline, **variants}, as_tensor_batches(ds, 500))
        acc = {r.name: r.top1 for r in results}
    speed: dict[str, float] = {}
    base_ips = float("nan")
    if args.only != "accuracy":
        x = next(iter(as_tensor_batches(ds, 64)))[0]
        cfg = BenchConfig(batch=64, threads=2, min_iters=5, max_iters=400, min_seconds=args.seconds)
        runs: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(max(1, args.rounds)):  # the machine is shared: a median of rounds damps its noise
            base_ips, timed = bench_against_baseline(baseline, variants, x, cfg)
            for name, r in timed.items():
                runs[name].append(r.speedup or 0.0)
        speed = {name: statistics.median(v) for name, v in runs.items()}
    b1 = acc.get("baseline", float("nan"))
    rows = []
    for name in variants:
        row = {
            "name": name,
            "top1": acc.get(name, float("nan")),
            "delta_pp": round(100 * (acc.get(name, float("nan")) - b1), 2),
            "speedup": round(speed.get(name, float("nan")), 3),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    print(f"\nbaseline cifar-vit fp32: top1 {b1:.4f} (n={len(ds)}), {base_ips:.0f} img/s at batch 64\n")  # type: ignore[arg-type]
    print("| recipe | top-1 | change (pp) | speed-up |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['top1']:.4f} | {r['delta_pp']:+.2f} | {r['speedup']:.2f}x |")
    if args.plot and args.only is None:
        plot(rows, b1, args.plot)


def plot(rows: list[dict], base_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    ax.scatter([1.0], [100 * base_top1], color="black", zorder=3)
    ax.annotate("fp32 baseline", (1.0, 100 * base_top1), fontsize=7)
    for r in rows:
        ax.scatter(r["speedup"], 100 * r["top1"], color="tab:blue")
        ax.annotate(r["name"], (r["speedup"], 100 * r["top1"]), fontsize=6)
    ax.axhline(100 * base_top1 - 1, color="grey", ls="--", lw=0.8, label="1 pp below baseline")
    ax.set_xlabel("speed-up vs fp32 (batch 64, 2 threads, same run)")
    ax.set_ylabel("CIFAR-10 top-1 (%)")
    ax.legend(loc="lower left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
