"""Which INT8 / weight-only backend to use on this CPU: every candidate on ViT-B/16's Linear shapes at
batch 16 (3152 token rows), timed interleaved in one process at 2 threads, with bare ``torch._int_mm`` on the
same shapes as the INT8 roof. Prints GOP/s per path and the INT8 path's share of ``torch._int_mm``.

    python benchmarks/bench_compress_backends.py [--rounds N]
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from vitedge.compress.qlinear import Int8DynamicLinear, WeightOnlyLinear, quantize_per_channel_int8

SHAPES = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]  # (in, out) of qkv, proj, fc1, fc2
ROWS = 16 * 197


def _int_mm_dynamic(x: torch.Tensor, wt: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    # Per-token symmetric activation quantisation in torch ops, then torch._int_mm. x: (M, K), wt: (K, N).
    s = x.abs().amax(-1, keepdim=True).clamp_min(1e-8) / 127
    q = torch.round(x / s).clamp(-127, 127).to(torch.int8)
    return torch._int_mm(q, wt).float() * (s * w_scale)


def candidates(k: int, n: int) -> dict[str, Callable[[], torch.Tensor]]:
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    x = torch.randn(ROWS, k)
    xb = x.bfloat16()
    wq, ws = quantize_per_channel_int8(lin.weight)
    wt = wq.t().contiguous()
    xq = torch.randint(-127, 127, (ROWS, k), dtype=torch.int8)
    ours = Int8DynamicLinear(lin)
    wo8 = WeightOnlyLinear(lin, bits=8, group=k)
    wo4 = WeightOnlyLinear(lin, bits=4, group=64)
    compiled = torch.compile(_int_mm_dynamic, dynamic=False)
    out: dict[str, Callable[[], torch.Tensor]] = {
        "fp32 F.linear": lambda: lin(x),
        "bf16 F.linear": lambda: F.linear(xb, lin.weight.bfloat16()),
        "int8 fbgemm linear_dynamic (ours)": lambda: ours(x),
        "int8 _int_mm + quant, eager": lambda: _int_mm_dynamic(x, wt, ws),
        "int8 _int_mm + quant, compiled": lambda: compiled(x, wt, ws),
        "int8 _int_mm bare (roof)": lambda: torch._int_mm(xq, wt),
        "int8wo dequant+linear (ours)": lambda: wo8(x),
        "int8wo _weight_int8pack_mm": lambda: torch.ops.aten._weight_int8pack_mm(x, wq, ws),
        "int4 dequant+linear (ours)": lambda: wo4(x),
    }
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        ao = nn.Sequential(nn.Linear(k, n))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_(ao, Int8DynamicActivationInt8WeightConfig())
        out["int8 torchao eager"] = lambda: ao(x)
    except ImportError:
        pass
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(2)
    totals: dict[str, float] = {}
    with torch.inference_mode():
        for k, n in SHAPES:
            fns = candidates(k, n)
            for f in fns.values():
                f()
                f()
            times: dict[str, list[float]] = {name: [] for name in fns}
            for _ in range(args.rounds):  # interleaved: machine load hits every path alike
                for name, f in fns.items():
                    t0 = time.perf_counter()
                    f()
                    times[name].append(time.perf_counter() - t0)
            ops = 2 * ROWS * k * n
            print(f"\nLinear {k}->{n}, {ROWS} rows (GOP/s, median of {args.rounds}):")
            for name, ts in times.items():
                med = statistics.median(ts)
                totals[name] = totals.get(name, 0.0) + med
                print(f"  {name:36s} {ops / med / 1e9:7.0f}")
    all_ops = sum(2 * ROWS * k * n for k, n in SHAPES)
    print("\nAll four shapes together (GOP/s):")
    for name, t in sorted(totals.items(), key=lambda kv: kv[1]):
        print(f"  {name:36s} {all_ops / t / 1e9:7.0f}")
    roof = totals["int8 _int_mm bare (roof)"]
    ours = totals["int8 fbgemm linear_dynamic (ours)"]
    print(f"\nINT8 linear incl. activation quantisation reaches {roof / ours:.0%} of torch._int_mm")


if __name__ == "__main__":
    main()
