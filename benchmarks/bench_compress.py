"""Compression techniques against unmodified fp32, each measured interleaved with its baseline in one process
(2 threads), plus accuracy on real data.

Speed: timm ViT-B/16 at 224, batch 16 (random weights; speed only). Accuracy: ViT4MNIST on all 10,000 MNIST
test digits (``top1``) and on the 9,000 not used for calibration (``top1_holdout``); cifar-vit on CIFAR-10
test when its weights exist.

    python benchmarks/bench_compress.py [--quick] [--only speed|accuracy]
"""

from __future__ import annotations

import argparse
import json
import warnings

import numpy as np

from vitedge.api import optimize_
from vitedge.commands import run_bench
from vitedge.compress.calibration import MNIST_CALIBRATION
from vitedge.data import open_dataset
from vitedge.measure.evaluate import evaluate
from vitedge.models import load
from vitedge.options import parse_options

VIT_B = "timm:vit_base_patch16_224"
SPEED_STACKS = [
    ["int8"],
    ["bf16"],
    ["int8wo"],
    ["int4:group=64"],
    ["structured:heads=0.5,mlp=0.5"],
    ["structured:heads=0.5,mlp=0.5", "int8"],
    ["structured:heads=0.5,mlp=0.5", "bf16"],
    ["merge:r=16", "structured:heads=0.5,mlp=0.5", "int8"],
    ["merge:r=16", "structured:heads=0.5,mlp=0.5", "bf16"],
    ["merge:r=16", "int8"],
]
MNIST_STACKS = [
    ["int8"],
    ["int8wo"],
    ["int4:group=32"],
    ["int4:group=32,outliers=4"],
    ["bf16"],
    ["int8", "bf16"],
]


def speed(seconds: float) -> None:
    for opts in SPEED_STACKS:
        try:
            r = run_bench(VIT_B, opts=opts, batch=16, min_seconds=seconds, iters=3)
        except ValueError as e:  # e.g. merge not registered yet
            print(f"{' '.join(opts):60s} skipped: {e}")
            continue
        v = r["variants"][0]
        print(
            f"{VIT_B} {' '.join(opts):52s} baseline {r['baseline']['images_per_s']:6.2f} img/s, "
            f"variant {v['images_per_s']:6.2f} img/s, speed-up {v['speedup']:.2f}x "
            f"({v['speedup_low']:.2f}-{v['speedup_high']:.2f}, {v['stop']})",
            flush=True,
        )


def mnist_accuracy() -> None:
    base = load("vit4mnist")
    models = {"baseline": base}
    for opts in MNIST_STACKS:
        models[" ".join(opts)] = optimize_(load("vit4mnist"), *parse_options(opts))
    ds = open_dataset("mnist", base.preprocess)
    full = evaluate(models, ds.batches(500))  # type: ignore[union-attr]
    holdout_idx = np.arange(MNIST_CALIBRATION, len(ds))
    held = evaluate(models, ds.batches(500, indices=holdout_idx))  # type: ignore[union-attr]
    b_full, b_held = full[0].top1, held[0].top1
    for f, h in zip(full, held, strict=True):
        print(
            json.dumps(
                {
                    "model": "vit4mnist",
                    "name": f.name,
                    "top1": f.top1,
                    "top1_holdout": h.top1,
                    "delta_pp": round(100 * (f.top1 - b_full), 2),
                    "delta_holdout_pp": round(100 * (h.top1 - b_held), 2),
                }
            ),
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    parser.add_argument("--only", choices=("speed", "accuracy"))
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    if args.only != "speed":
        mnist_accuracy()
    if args.only != "accuracy":
        speed(2.0 if args.quick else 6.0)


if __name__ == "__main__":
    main()
