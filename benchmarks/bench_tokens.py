"""Token merging and pruning: speed against the unmodified model, interleaved in one process (2 threads).

Targets (issue #5): timm ViT-B/16 at 224, batch 16: merge:r=16 >= 1.6x; batch 1: no merge setting below 0.97x.
cifar-vit at batch 64: a merge and a prune setting each >= 1.4x at <= 1 pp top-1 loss (accuracy from
``vitedge sweep cifar-vit ... --data cifar10``). Swin (merging within windows, and window pruning): cifar-swin
at batch 64 >= 1.3x at <= 1.5 pp (accuracy from ``vitedge sweep cifar-swin ... --data cifar10``); timm Swin-T
at 224: the speed curve.

    python benchmarks/bench_tokens.py [--quick] [--only vitb|vitb1|deit|cifar|swin|swint|mnist] [--attention]

The merge and prune runners compute attention themselves and, on CPU, use two batched matrix products for
sequences of at most 128 tokens, where they beat fused SDPA (:mod:`vitedge.attention.batched`). Part of a
speed-up on short sequences therefore comes from that choice rather than from fewer tokens; ``--attention``
prints how much: the kernels alone on each case's shapes, then per model timm's own unfused attention
(``fused_attn=False``) and vitedge's block loop with no token reduction, both against the unmodified model.
"""

from __future__ import annotations

import argparse
import copy
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from vitedge.attention.batched import attention, bmm_attention
from vitedge.commands import run_sweep
from vitedge.measure.bench import BenchConfig, bench_against_baseline
from vitedge.models import load
from vitedge.plan import BlockPlan, ExecutionPlan

CASES: dict[str, tuple[str, int, list[str]]] = {
    "vitb": ("timm:vit_base_patch16_224", 16, ["merge:r=4,8,13,16", "prune:keep=0.7,0.5"]),
    "vitb1": ("timm:vit_base_patch16_224", 1, ["merge:r=2,4,8,13,16"]),
    "deit": ("timm:deit_tiny_patch16_224", 16, ["merge:r=8,13,16", "prune:keep=0.7,0.5"]),
    "cifar": (
        "cifar-vit",
        64,
        [
            "merge:r=2,3,4,5,6",
            "prune:keep=0.8,0.7,0.6,0.5",
            "prune:keep=0.78,0.82,0.86,fuse=nearest,schedule=every,start=2,scorer=attn-value",
        ],
    ),
    "swin": (
        "cifar-swin",
        64,
        ["window_merge:r=4,6,8,10", "window_merge:r=4,6,schedule=decreasing", "window_prune:keep=0.75"],
    ),
    "swint": (
        "timm:swin_tiny_patch4_window7_224",
        16,
        ["window_merge:r=4,8,16,24", "window_prune:keep=0.75,0.5"],
    ),
    "mnist": ("vit4mnist", 256, ["merge:r=1,2,3", "prune:keep=0.75,0.5"]),
}


# (B, H, N, d): the shapes of the table in vitedge.attention.batched.
ATTENTION_SHAPES = [
    (64, 6, 66, 32),  # cifar-vit
    (64, 6, 21, 32),  # cifar-vit late in merge:r=5
    (1024, 3, 49, 32),  # Swin-T windows at batch 16
    (64, 6, 100, 32),
    (64, 6, 130, 32),
    (4, 12, 197, 64),  # ViT-B
    (8, 12, 197, 64),
    (8, 16, 257, 64),  # ViT-L/14
]
KERNEL_CASES = ["cifar", "mnist", "deit", "vitb"]


def _median_ms(fn: Callable[[], torch.Tensor], calls: int) -> float:
    with torch.inference_mode():
        for _ in range(3):
            fn()
        times = []
        for _ in range(calls):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def _vitedge_attention(q, k, v, attn_mask=None, scale=None):  # type: ignore[no-untyped-def]
    return attention(q, k, v, attn_mask, scale if scale is not None else q.shape[-1] ** -0.5)


def attention_report(seconds: float) -> None:
    """Fused SDPA against two batched products, then what the kernel choice alone gives whole models."""
    torch.set_num_threads(2)
    calls = 10 if seconds < 2 else 30
    print("attention kernels (fp32, additive key bias, 2 threads, median ms):")
    for b, h, n, d in ATTENTION_SHAPES:
        q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
        bias = torch.randn(b, 1, 1, n)
        fused = _median_ms(partial(F.scaled_dot_product_attention, q, k, v, attn_mask=bias), calls)
        bmm = _median_ms(partial(bmm_attention, q, k, v, bias, d**-0.5), calls)
        shape = str((b, h, n, d))
        print(f"  {shape:20s} fused SDPA {fused:7.2f}  two bmm {bmm:7.2f}  SDPA/bmm {fused / bmm:.2f}")
    print("whole models, no token reduction, against the unmodified model:")
    for key in KERNEL_CASES:
        model_id, batch, _ = CASES[key]
        base = load(model_id).eval()
        loop = copy.deepcopy(base)
        # vitedge's block loop, kernel chosen by shape: the default attention as every block's attention step
        steps = tuple(BlockPlan(index=i, attention=_vitedge_attention) for i in range(len(loop.blocks)))
        loop.plan = ExecutionPlan(blocks=steps)
        variants = {"vitedge loop": loop}
        unfused = copy.deepcopy(base)
        timm_attention = [m for m in unfused.modules() if hasattr(m, "fused_attn")]
        for module in timm_attention:
            module.fused_attn = False  # timm's two-product attention, for every length
        if timm_attention:  # (vit4mnist is not a timm model)
            variants["timm fused_attn=False"] = unfused
        x = base.example_input(batch)
        cfg = BenchConfig(batch=batch, threads=2, min_seconds=seconds)
        ips, timed = bench_against_baseline(base, variants, x, cfg)
        line = "  ".join(f"{name} {r.speedup:.2f}x" for name, r in timed.items())
        print(f"  {model_id} batch {batch}: baseline {ips:.1f} img/s; {line}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short timing windows")
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run only these cases")
    parser.add_argument(
        "--attention", action="store_true", help="only the attention-kernel comparison (see above)"
    )
    args = parser.parse_args()
    seconds = 1.0 if args.quick else 4.0
    if args.attention:
        attention_report(seconds)
        return
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
