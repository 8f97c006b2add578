"""``make demo``: profile, evaluate and bench the real models on real data, printed as one table.

For each model, every variant is evaluated on the same batches as the unmodified model (one pass over
the data) and timed interleaved with it in this process, so every speed-up and accuracy delta in the table
is a same-run comparison. CIFAR-10 models are evaluated on the first ``CIFAR_LIMIT`` test images to keep
the demo short (``vitedge eval MODEL --data cifar10`` gives the full 10,000).
"""

from __future__ import annotations

import sys

import torch
from rich.console import Console

from vitedge.commands import build_model, variant_name
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.measure.bench import BenchConfig, bench_against_baseline
from vitedge.measure.counted import count_flops
from vitedge.measure.evaluate import evaluate
from vitedge.models import PROJECT_MODELS, load
from vitedge.models.project import weights_path
from vitedge.options import parse_options
from vitedge.report import summary_table

CIFAR_LIMIT = 2000
# (model id, data, batch, variants as lists of -O strings). Grows as techniques land.
PLAN: list[tuple[str, str, int, list[list[str]]]] = [
    ("vit4mnist", "mnist", 256, [["bf16"], ["int8"], ["prune:keep=0.75"], ["merge:r=1"]]),
    ("cifar-resnet", "cifar10", 64, [["bf16"]]),  # a CNN: int8 here quantises nn.Linear layers only
    (
        "cifar-vit",
        "cifar10",
        64,
        [
            ["bf16"],
            ["int8"],
            ["merge:r=5"],
            ["prune:keep=0.82,fuse=nearest,schedule=every,start=2,scorer=attn-value"],
            ["merge:r=5", "int8"],
        ],
    ),
    (
        "cifar-swin",
        "cifar10",
        64,
        [["bf16"], ["window_merge:r=4"], ["window_merge:r=8"], ["window_prune:keep=0.75"]],
    ),
]


def demo_rows(
    model_id: str, data: str, batch: int, variants: list[list[str]], console: Console
) -> list[dict]:
    base = load(model_id)
    models: dict[str, torch.nn.Module] = {"baseline": base}
    for opts in variants:
        models[variant_name(opts)] = build_model(model_id, parse_options(opts), img_size=None, weights=None)
    limit = CIFAR_LIMIT if data == "cifar10" else None
    dataset = open_dataset(data, base.preprocess, limit=limit)
    with console.status(f"evaluating {model_id} and {len(variants)} variants on {data}"):
        results = {r.name: r for r in evaluate(models, as_tensor_batches(dataset, 500))}
    x = base.example_input(batch)
    cfg = BenchConfig(batch=batch, min_iters=5, max_iters=400, min_seconds=2.0, max_seconds=8.0)
    counted = count_flops(base, base.example_input(1)).total
    macs = base.arch().macs
    console.print(
        f"{model_id}: {macs / 1e6:.1f} MMACs/image, counted/analytic FLOPs {counted / (2 * macs):.4f}"
    )
    with console.status(f"timing {model_id}'s variants, each interleaved with the baseline"):
        base_ips, timed = bench_against_baseline(
            base, {n: m for n, m in models.items() if n != "baseline"}, x, cfg
        )
    rows = [
        {
            "model": model_id,
            "variant": name,
            "data": data,
            "top1": results[name].top1,
            "baseline_top1": results["baseline"].top1,
            "macs": models[name].arch().macs,  # type: ignore[operator]
            "images_per_s": v.images_per_s,
            "speedup": v.speedup,
            "batch": batch,
        }
        for name, v in timed.items()
    ]
    base_row = {
        "model": model_id,
        "variant": "baseline",
        "data": data if limit is None else f"{data} ({limit})",
        "top1": results["baseline"].top1,
        "macs": macs,
        "images_per_s": base_ips,
        "batch": batch,
    }
    return [base_row, *rows]


def main() -> int:
    console = Console(stderr=True)
    torch.set_num_threads(2)
    rows: list[dict] = []
    for model_id, data, batch, variants in PLAN:
        if model_id in PROJECT_MODELS and not weights_path(model_id).is_file():
            console.print(f"[yellow]skip {model_id}: not trained yet ('vitedge train {model_id}')[/]")
            continue
        rows += demo_rows(model_id, data, batch, variants, console)
    out = Console()
    if not out.is_terminal:  # piped to a file or a CI log: print the table whole, not cut to 80 columns
        out = Console(width=200)
    out.print(
        summary_table(rows, "vitedge demo: top-1 on real data and speed vs the baseline, same run, 2 threads")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
