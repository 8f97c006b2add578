"""bf16 against fp32, measured interleaved in one process (2 threads).

Prints images/s and the speed-up ratio for ViT4MNIST (batch 256) and timm ViT-B/16 at 224 (batch 16), plus
the accuracy cost on real MNIST. FACTS.md reports 2.62x for ViT-B/16 with model and input cast to bf16.

    python benchmarks/bench_bf16.py [--quick]
"""

from __future__ import annotations

import argparse
import json

from vitedge.commands import run_bench, run_eval


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="shorter timing windows")
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 5.0
    cases = [("vit4mnist", 256), ("timm:deit_tiny_patch16_224", 16), ("timm:vit_base_patch16_224", 16)]
    for model, batch in cases:
        for mode in ("cast", "autocast"):
            opt = "bf16" if mode == "cast" else "bf16:mode=autocast"
            r = run_bench(model, opts=[opt], batch=batch, min_seconds=seconds)
            v = r["variants"][0]
            print(
                f"{model:32s} {opt:20s} batch {batch:3d}: "
                f"baseline {r['baseline']['images_per_s']:8.1f} img/s, "
                f"variant {v['images_per_s']:8.1f} img/s, speed-up {v['speedup']:.2f}x"
            )
    acc = run_eval("vit4mnist", data="mnist", opts=["bf16"])
    print(json.dumps({k: acc[k] for k in ("top1", "baseline_top1", "mean_cosine", "top1_agreement")}))


if __name__ == "__main__":
    main()
