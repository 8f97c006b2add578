"""Token merging and pruning: speed against the unmodified model, interleaved in one process (2 threads).

Targets (issue #5): timm ViT-B/16 at 224, batch 16: merge:r=16 >= 1.6x; batch 1: no merge setting below 0.97x.
cifar-vit at batch 64: a merge and a prune setting each >= 1.4x at <= 1 pp top-1 loss (accuracy from
``vitedge sweep cifar-vit ... --data cifar10``). Swin (merging within windows, and window pruning): cifar-swin
at batch 64 >= 1.3x at <= 1.5 pp (accuracy from ``vitedge sweep cifar-swin ... --data cifar10``); timm Swin-T
at 224: the speed curve.

    python benchmarks/bench_tokens.py [--quick] [--only vitb|vitb1|deit|cifar|swin|swint|mnist]
"""

from __future__ import annotations

import argparse

from vitedge.commands import run_sweep

CASES: dict[str, tuple[str, int, list[str]]] = {
    "vitb": ("timm:vit_base_patch16_224", 16, ["merge:r=4,8,13,16", "prune:keep=0.7,0.5"]),
    "vitb1": ("timm:vit_base_patch16_224", 1, ["merge:r=2,4,8,13,16"]),
    "deit": ("timm:deit_tiny_patch16_224", 16, ["merge:r=8,13,16", "prune:keep=0.7,0.5"]),
    "cifar": ("cifar-vit", 64, ["merge:r=2,3,4,5,6", "prune:keep=0.8,0.7,0.6,0.5"]),
    "swin": ("cifar-swin", 64, ["merge:r=2,4,6,8", "prune:keep=0.75"]),
    "swint": ("timm:swin_tiny_patch4_window7_224", 16, ["merge:r=4,8,16,24", "prune:keep=0.75,0.5"]),
    "mnist": ("vit4mnist", 256, ["merge:r=1,2,3", "prune:keep=0.75,0.5"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short timing windows")
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run only these cases")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    for key in args.only or list(CASES):
        model, batch, sweeps = CASES[key]
        for opt in sweeps:
            try:
                r = run_sweep(model, opts=[opt], batch=batch, min_seconds=seconds)
            except ValueError as e:  # e.g. a reference model not trained on this checkout
                print(f"{model}: skipped ({e})")
                break
            base = r["baseline"]
            ips, gmacs = base["images_per_s"], base["macs"] / 1e9
            print(f"{model} batch {batch}: baseline {ips:.1f} img/s, {gmacs:.3f} GMACs")
            for row in r["rows"]:
                print(
                    f"  {row['name']:34s} {row['images_per_s']:9.1f} img/s  speed-up {row['speedup']:.2f}x  "
                    f"MACs {row['macs'] / base['macs']:.2f}x"
                )


if __name__ == "__main__":
    main()
