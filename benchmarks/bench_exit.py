"""Early exit on cifar-vit (or vit4mnist): top-1 on the CIFAR-10 test set, mean depth and speed against the
unmodified model, all from this run (2 threads). Thresholds come from the shipped heads' calibration records
(held-out training images); the test set only measures. vit4mnist's heads were trained and calibrated on the
first 5,000 MNIST test digits (the only MNIST images here), so it is measured on the other 5,000.

For each budget: the test-set loss beside the calibration loss and bound, the mean fraction of blocks run,
and the speed-up at batch 64 and batch 1, timed interleaved with the baseline on 64 real test images drawn
evenly over the set (every image counts, so the data-dependent cost is a mean, not one image's). Stacks with
``merge``, ``bf16`` and ``int8`` are measured the same way.

    python benchmarks/bench_exit.py [--model cifar-vit|vit4mnist] [--budgets 0.005,0.01,0.02]
                                    [--stack "merge:r=4 bf16"] [--limit N] [--rounds K]
                                    [--plot docs/img/exit-cifar-vit.png] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch
from torch.utils.data import Subset

from vitedge.api import optimize_
from vitedge.commands import dynamic_report, timing_input
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.measure.bench import BenchConfig, bench_against_baseline
from vitedge.measure.evaluate import evaluate
from vitedge.models import load

STACKS = {
    "cifar-vit": ["merge:r=4 exit:budget=0.01", "bf16 exit:budget=0.01", "int8 exit:budget=0.01"],
    "vit4mnist": ["int8 exit:budget=0.01"],
}
DATA = {"cifar-vit": "cifar10", "vit4mnist": "mnist"}
MNIST_HEADS_DIGITS = 5000  # vit4mnist's heads trained and calibrated on the first 5,000 test digits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=sorted(DATA), default="cifar-vit")
    parser.add_argument("--budgets", default="0.005,0.01,0.02,0.05")
    parser.add_argument("--stack", action="append", default=None, help="-O options, space-separated; repeat")
    parser.add_argument("--limit", type=int, default=None, help="evaluate on N test images (default all)")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds (median of their ratios)")
    parser.add_argument("--seconds", type=float, default=4.0, help="minimum seconds per timing pair")
    parser.add_argument("--batches", default="64,1")
    parser.add_argument("--plot", type=Path, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    torch.set_num_threads(2)
    budgets = [float(b) for b in args.budgets.split(",") if b]
    model, data = args.model, DATA[args.model]
    stacks = [f"exit:budget={b:g}" for b in budgets] + (STACKS[model] if args.stack is None else args.stack)
    baseline = load(model).eval()
    variants = {s: optimize_(load(model), *s.split()).eval() for s in stacks}
    ds = open_dataset(data, baseline.preprocess, limit=args.limit)
    if model == "vit4mnist":
        ds = Subset(ds, range(MNIST_HEADS_DIGITS, len(ds)))  # type: ignore[arg-type]
    results = evaluate({"baseline": baseline, **variants}, as_tensor_batches(ds, 500))
    base = results[0]
    rows = []
    for r in results[1:]:
        rep = dynamic_report(variants[r.name], r.depth)
        ex = rep.get("exit", {})
        rows.append(
            {
                "name": r.name,
                "top1": r.top1,
                "loss_pp": round(100 * (base.top1 - r.top1), 2),
                "calibration_loss_pp": round(100 * ex.get("calibration_loss", float("nan")), 2),
                "calibration_bound_pp": round(100 * ex.get("calibration_bound", float("nan")), 2),
                "threshold": ex.get("threshold"),
                "mean_depth": round(rep.get("mean_depth", 1.0), 4),
                "calibration_depth": round(ex.get("calibration_depth", float("nan")), 4),
            }
        )
    for batch in (int(b) for b in args.batches.split(",")):
        x = timing_input(baseline, batch, data)
        cfg = BenchConfig(batch=batch, threads=2, min_iters=5, max_iters=400, min_seconds=args.seconds)
        runs: dict[str, list[float]] = {s: [] for s in stacks}
        spread: dict[str, list[float]] = {s: [] for s in stacks}
        for _ in range(max(1, args.rounds)):
            _, timed = bench_against_baseline(baseline, variants, x, cfg)
            for name, t in timed.items():
                runs[name].append(t.speedup or 0.0)
                spread[name] += [t.speedup_low or 0.0, t.speedup_high or 0.0]
        for row in rows:
            v = runs[row["name"]]
            row[f"speedup_b{batch}"] = round(statistics.median(v), 3)
            row[f"speedup_b{batch}_range"] = [round(min(v), 3), round(max(v), 3)]
    out = {"model": model, "baseline_top1": base.top1, "n": base.n, "rows": rows}
    if args.json:
        print(json.dumps(out))
    print(f"\n{model} fp32 baseline: top-1 {base.top1:.4f} on {base.n} test images\n")
    print("| -O | top-1 | loss (pp) | calib. loss / bound (pp) | mean depth | batch 64 | batch 1 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        speed = " | ".join(
            f"{r.get(f'speedup_b{b}', float('nan')):.2f}x {r.get(f'speedup_b{b}_range', '')}" for b in (64, 1)
        )
        print(
            f"| `{r['name']}` | {r['top1']:.4f} | {r['loss_pp']:+.2f} | {r['calibration_loss_pp']:.2f} / "
            f"{r['calibration_bound_pp']:.2f} | {r['mean_depth']:.3f} | {speed} |"
        )
    if args.plot:
        plot(rows, base.top1, args.plot)


def plot(rows: list[dict], base_top1: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.5))
    exits = [r for r in rows if r["name"].startswith("exit:")]
    ax1.plot(
        [r["mean_depth"] for r in exits], [r["loss_pp"] for r in exits], "o-", label="test loss (measured)"
    )
    ax1.plot(
        [r["calibration_depth"] for r in exits],
        [r["calibration_bound_pp"] for r in exits],
        "s--",
        label="calibration bound (held-out train)",
    )
    for r in exits:
        ax1.annotate(r["name"].removeprefix("exit:"), (r["mean_depth"], r["loss_pp"]), fontsize=7)
    ax1.set_xlabel("mean fraction of blocks run")
    ax1.set_ylabel("top-1 loss vs full model (pp)")
    ax1.legend(fontsize=7)
    for r in rows:
        if "speedup_b64" in r:
            ax2.scatter(r["speedup_b64"], 100 * r["top1"], color="tab:blue")
            ax2.annotate(r["name"], (r["speedup_b64"], 100 * r["top1"]), fontsize=6)
    ax2.scatter([1.0], [100 * base_top1], color="black")
    ax2.axhline(100 * base_top1 - 1, color="grey", ls="--", lw=0.8, label="1 pp below baseline")
    ax2.set_xlabel("speed-up at batch 64 (2 threads, same run)")
    ax2.set_ylabel("top-1 (%)")
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
