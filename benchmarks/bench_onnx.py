"""ONNX Runtime against torch: fp32 and INT8 on both, timed interleaved with torch fp32 in one process.

For each case the model is exported with ``vitedge export`` (fp32, and ``-O int8`` = ONNX Runtime's dynamic
INT8 path), each export checked against torch; then torch fp32 (the baseline), torch ``-O int8`` (fbgemm),
ORT fp32 and ORT INT8 are timed pair by pair against the baseline (``bench_against_baseline``), all at the
same thread count. For cifar-vit, top-1 on the CIFAR-10 test set is measured for all four on the same batches.

Cases: cifar-vit at batch 64 and timm ViT-B/16 at 224 (random weights: speed only) at batch 16, 2 threads.

    python benchmarks/bench_onnx.py [--quick] [--only cifar|vitb] [--limit N] [--min-seconds S]
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from torch import nn

from vitedge.api import optimize_
from vitedge.compress.quant import Int8Config
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.export import OrtModule, run_export
from vitedge.measure.bench import BenchConfig, bench_against_baseline
from vitedge.measure.evaluate import evaluate
from vitedge.models import load

CASES: dict[str, tuple[str, int, str | None]] = {
    "cifar": ("cifar-vit", 64, "cifar10"),
    "vitb": ("timm:vit_base_patch16_224", 16, None),
}


def _export(model_id: str, folder: Path, opts: list[str], args: argparse.Namespace) -> Path:
    out = folder / f"{'-'.join(opts) or 'fp32'}.onnx"
    r = run_export(model_id, out=out, opts=opts, threads=args.threads, check_n=args.check_n)
    keys = ("name", "bytes", "export_s", "check_data", "n", "max_abs_diff", "mean_cosine", "top1_agreement")
    print(json.dumps({"export": model_id, **{k: r[k] for k in keys}}), flush=True)
    return out


def _speed(model_id: str, batch: int, models: dict[str, nn.Module], args: argparse.Namespace) -> None:
    base, *_ = models.values()
    variants = dict(list(models.items())[1:])
    cfg = BenchConfig(
        batch=batch, threads=args.threads, min_iters=args.iters, max_iters=200, min_seconds=args.min_seconds
    )
    x = load(model_id).example_input(batch)
    base_ips, timed = bench_against_baseline(base, variants, x, cfg)
    print(f"{model_id} batch {batch}, {args.threads} threads: torch fp32 {base_ips:.1f} img/s (pair median)")
    for name, v in timed.items():
        assert v.speedup is not None
        pair_base = v.images_per_s / v.speedup  # the baseline timed interleaved with this variant
        print(
            f"  {name:12s} {v.images_per_s:9.1f} img/s  speed-up {v.speedup:.2f}x vs torch fp32 "
            f"({pair_base:.1f} img/s in the same pair)",
            flush=True,
        )
        row: dict[str, Any] = {"model": model_id, "batch": batch, "threads": args.threads, "name": name}
        row.update(images_per_s=v.images_per_s, baseline_images_per_s=pair_base, speedup=v.speedup)
        print(json.dumps(row), flush=True)


def _accuracy(model_id: str, data: str, models: dict[str, nn.Module], args: argparse.Namespace) -> None:
    base = load(model_id)
    dataset = open_dataset(data, base.preprocess, limit=args.limit)
    results = evaluate(models, as_tensor_batches(dataset, 250), threads=args.threads)
    print(f"{model_id} on {results[0].n} {data} test images:")
    for res in results:
        agreement = res.top1_agreement
        agree = "" if agreement is None else f"  top-1 agreement with torch fp32 {agreement:.4f}"
        print(f"  {res.name:12s} top-1 {res.top1:.4f}{agree}", flush=True)
        row = {"model": model_id, "data": data, "n": res.n, "name": res.name, "top1": res.top1}
        row.update(top1_agreement=res.top1_agreement, mean_cosine=res.mean_cosine)
        print(json.dumps(row), flush=True)


def run_case(key: str, args: argparse.Namespace) -> None:
    model_id, batch, data = CASES[key]
    with tempfile.TemporaryDirectory(prefix="bench-onnx-") as tmp:
        fp32_path = _export(model_id, Path(tmp), [], args)
        int8_path = _export(model_id, Path(tmp), ["int8"], args)
        models: dict[str, nn.Module] = {
            "torch fp32": load(model_id),
            "torch int8": optimize_(load(model_id), Int8Config()),
            "ort fp32": OrtModule(fp32_path, threads=args.threads),
            "ort int8": OrtModule(int8_path, threads=args.threads),
        }
        if args.only_part != "accuracy":
            _speed(model_id, args.batch or batch, models, args)
        if data is not None and args.only_part != "speed":
            _accuracy(model_id, data, models, args)


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--only", choices=sorted(CASES), action="append", help="run only these cases")
    parser.add_argument("--only-part", choices=("speed", "accuracy"), help="skip the other part")
    parser.add_argument("--quick", action="store_true", help="short timing windows, 2,000 CIFAR-10 images")
    parser.add_argument("--limit", type=int, help="CIFAR-10 test images for top-1 (default: all 10,000)")
    parser.add_argument("--min-seconds", type=float, help="time each pair at least this long (default 6)")
    parser.add_argument("--iters", type=int, default=5, help="at least this many timed rounds per pair")
    parser.add_argument("--batch", type=int, help="override every case's batch size")
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime threads")
    parser.add_argument("--check-n", type=int, default=32, help="images in each export's check against torch")
    args = parser.parse_args()
    if args.min_seconds is None:
        args.min_seconds = 2.0 if args.quick else 6.0
    if args.limit is None and args.quick:
        args.limit = 2000
    for key in args.only or list(CASES):
        run_case(key, args)


if __name__ == "__main__":
    main()
