"""INT8 attention (``-O int8attn``) against unmodified fp32: each timing interleaved with its baseline in one
process (2 threads), plus accuracy on real data.

- ``kernels``: the attention op alone at the two model shapes, fused fp32 SDPA against the INT8 pipeline with
  each integer product torch offers on CPU: ``torch._int_mm`` looped over batch x heads (what the technique
  uses), ``matmul`` on int32 tensors, and an fp32 emulation of the same integer products (an accuracy
  reference only: no INT8 instruction runs). ``torch.ops.quantized.matmul`` is not in the table: it
  requantises its output to 8 bits per tensor, so it cannot return the int32 scores the technique needs.
- ``speed``: whole models, ``bench_against_baseline``: cifar-vit at batch 64 and ViT-B/16 at 224, batch 16
  (random weights; speed only).
- ``accuracy``: cifar-vit top-1 on the CIFAR-10 test set (``--limit`` images, class-balanced), with the
  agreement and cosine of the variant's logits with the fp32 model's.

    python benchmarks/bench_int8attn.py [--quick] [--only kernels|speed|accuracy] [--limit N]
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitedge.api import optimize_
from vitedge.attention.int8 import Int8AttnConfig, int8_attention, int8_bmm
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.measure.bench import BenchConfig, bench_against_baseline
from vitedge.measure.evaluate import evaluate
from vitedge.models import load
from vitedge.options import parse_options

THREADS = 2
# (model id, batch, -O stacks timed against the fp32 model)
SPEED_CASES: list[tuple[str, int, list[list[str]]]] = [
    (
        "cifar-vit",
        64,
        [
            ["int8attn"],
            ["int8attn:granularity=head"],
            ["int8attn:softmax=bf16"],
            ["int8"],
            ["int8", "int8attn"],
        ],
    ),
    (
        "timm:vit_base_patch16_224",
        16,
        [["int8attn"], ["int8attn:granularity=head"], ["int8"], ["int8", "int8attn"]],
    ),
]
# Attention shapes of those models: (name, batch, heads, tokens, head_dim)
KERNEL_SHAPES = [("cifar-vit b64", 64, 6, 66, 32), ("ViT-B/16 b16", 16, 12, 197, 64)]
ACCURACY_STACKS = [
    ["int8attn"],
    ["int8attn:granularity=head"],
    ["int8attn:softmax=bf16"],
    ["int8"],
    ["int8", "int8attn"],
    ["merge:r=2", "int8attn"],
]

IntMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
MATMULS: dict[str, IntMatmul] = {
    "int8 _int_mm loop": int8_bmm,
    "int8 via int32 matmul": lambda a, b: a.int() @ b.int(),
    # Exact while d and N stay under ~1000 (int8 products summed below 2**24): same numbers, fp32 speed.
    "fp32 emulation (reference)": lambda a, b: (a.float() @ b.float()).int(),
}


class _Attention(nn.Module):
    """One attention op as a module for the interleaved bench. x: (B, 3, H, N, d) -> (B, H, N, d)."""

    def __init__(self, kernel: Callable[..., torch.Tensor]) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = x.unbind(1)
        return self.kernel(q, k, v, attn_mask=None, scale=q.shape[-1] ** -0.5)


def kernels(cfg: BenchConfig) -> None:
    for name, b, h, n, d in KERNEL_SHAPES:
        x = torch.randn(b, 3, h, n, d, generator=torch.Generator().manual_seed(0))
        variants: dict[str, nn.Module] = {
            label: _Attention(
                lambda *a, mm=mm, **kw: int8_attention(*a, **kw, config=Int8AttnConfig(), matmul=mm)
            )
            for label, mm in MATMULS.items()
        }
        base_ips, timed = bench_against_baseline(
            _Attention(F.scaled_dot_product_attention), variants, x, dataclasses.replace(cfg, batch=b)
        )
        print(
            f"attention {name} (H={h}, N={n}, d={d}): fused fp32 SDPA {1e3 * b / base_ips:.2f} ms", flush=True
        )
        for label, r in timed.items():
            print(f"  {label:30s} {r.p50_ms:8.2f} ms  speed-up {r.speedup:.2f}x", flush=True)


def speed(cfg: BenchConfig) -> None:
    for model_id, batch, stacks in SPEED_CASES:
        try:
            base = load(model_id)
        except ValueError as e:  # e.g. cifar-vit not trained on this checkout
            print(f"{model_id}: skipped ({e})")
            continue
        variants = {" ".join(s): optimize_(load(model_id), *parse_options(s)) for s in stacks}
        x = base.example_input(batch)
        base_ips, timed = bench_against_baseline(base, variants, x, dataclasses.replace(cfg, batch=batch))
        print(f"{model_id} batch {batch}: fp32 {base_ips:.1f} img/s", flush=True)
        for label, r in timed.items():
            print(f"  {label:34s} {r.images_per_s:9.1f} img/s  speed-up {r.speedup:.2f}x", flush=True)


def accuracy(limit: int | None) -> None:
    try:
        base = load("cifar-vit")
    except ValueError as e:
        print(f"cifar-vit: skipped ({e})")
        return
    ds = open_dataset("cifar10", base.preprocess, limit=limit)
    models: dict[str, nn.Module] = {"fp32": base}
    models.update({" ".join(s): optimize_(load("cifar-vit"), *parse_options(s)) for s in ACCURACY_STACKS})
    results = evaluate(models, as_tensor_batches(ds, 250), threads=THREADS)
    ref = results[0]
    print(f"cifar-vit on {ref.n} CIFAR-10 test images: fp32 top-1 {ref.top1:.4f}")
    for r in results[1:]:
        print(
            f"  {r.name:26s} top-1 {r.top1:.4f} ({100 * (r.top1 - ref.top1):+.2f} pp)  "
            f"agreement {r.top1_agreement:.4f}  mean cosine {r.mean_cosine:.6f}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="one warm-up and two timed rounds per pair")
    parser.add_argument("--only", choices=["kernels", "speed", "accuracy"], action="append")
    parser.add_argument("--limit", type=int, default=None, help="CIFAR-10 test images (default: all 10,000)")
    args = parser.parse_args()
    if args.quick:
        cfg = BenchConfig(threads=THREADS, warmup=1, min_iters=2, max_iters=2, min_seconds=0.0)
    else:
        cfg = BenchConfig(threads=THREADS, warmup=2, min_iters=5, max_iters=50, min_seconds=4.0)
    parts = args.only or ["kernels", "speed", "accuracy"]
    if "kernels" in parts:
        kernels(cfg)
    if "speed" in parts:
        speed(cfg)
    if "accuracy" in parts:
        accuracy(args.limit)


if __name__ == "__main__":
    main()
