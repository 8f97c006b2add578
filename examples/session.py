"""A complete vitedge session from Python: load or wrap, profile, optimise, explain, evaluate on real images,
time against the baseline, save and reload.

    python examples/session.py [--limit 2000] [--out out/cifar-vit-fast]
"""

from __future__ import annotations

import argparse
import tempfile

import timm
import torch

import vitedge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--limit", type=int, default=2000, help="CIFAR-10 test images to evaluate on")
    parser.add_argument("--out", default=None, help="where to save the optimised model (default: a temp dir)")
    parser.add_argument("--seconds", type=float, default=2.0, help="timing window of the benchmark")
    args = parser.parse_args()

    model = vitedge.load("cifar-vit")  # the project's trained CIFAR-10 ViT
    deit = vitedge.wrap(timm.create_model("deit_tiny_patch16_224").eval())  # a module you already hold
    print(f"{deit.model_id}: {len(deit.blocks)} blocks, input {deit.preprocess.img_size}")
    print(f"cifar-vit: {vitedge.profile(model)['macs'] / 1e6:.1f} MMACs per image")

    vitedge.optimize_(model, "merge:r=5", vitedge.Int8Config())
    plan = vitedge.explain(model)
    first, last = plan["blocks"][0], plan["blocks"][-1]
    print(
        f"{plan['name']}: {first['tokens_in']} -> {last['tokens_out']} tokens, {plan['macs'] / 1e6:.1f} MMACs"
    )

    r = vitedge.evaluate(model, "cifar10", baseline="cifar-vit", limit=args.limit)
    print(f"top-1 {r['top1']:.4f} (baseline {r['baseline_top1']:.4f}) on {r['n']} CIFAR-10 test images")
    speed = vitedge.bench(
        model, baseline="cifar-vit", batch=64, min_seconds=args.seconds, max_seconds=10 * args.seconds
    )
    print(f"speed-up {speed['variants'][0]['speedup']:.2f}x at batch 64 (one interleaved run)")

    out = args.out or tempfile.mkdtemp(prefix="vitedge-session-")
    vitedge.save(model, out)
    again = vitedge.load(out)
    x = again.example_input(2)
    with torch.inference_mode():
        same = torch.equal(again(x), model(x))
        _, trace = again.forward_traced(x)
    print(f"reloaded {out}: same outputs {same}, {trace.tokens.x.shape[1]} tokens leave the last block")


if __name__ == "__main__":
    main()
