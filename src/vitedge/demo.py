"""``make demo``: profile, evaluate and bench the real models on real data, printed as one table.

Each model's variants are evaluated on the same batches as the unmodified model and timed interleaved with it
in this process, so every speed-up and accuracy delta in the table is a same-run comparison.
"""

from __future__ import annotations

import sys

from rich.console import Console

from vitedge.commands import run_bench, run_eval, run_profile
from vitedge.models import PROJECT_MODELS
from vitedge.models.project import WEIGHTS_DIR
from vitedge.report import summary_table

# (model id, data, eval/bench batch, variants as lists of -O strings). Grows as techniques land.
PLAN: list[tuple[str, str, int, list[list[str]]]] = [
    ("vit4mnist", "mnist", 256, [["bf16"]]),
    *((m, "cifar10", 64, [["bf16"]]) for m in PROJECT_MODELS),
]


def main() -> int:
    console = Console(stderr=True)
    rows = []
    for model, data, batch, variants in PLAN:
        if model in PROJECT_MODELS and not (WEIGHTS_DIR / f"{model}.safetensors").is_file():
            console.print(f"[yellow]skip {model}: not trained yet ('vitedge train {model}')[/]")
            continue
        prof = run_profile(model, counted=True)
        console.print(
            f"{model}: {prof['macs'] / 1e6:.2f} MMACs/image analytic, counted/analytic "
            f"{prof['counted_over_analytic']:.4f}, {prof['params']:,} params"
        )
        for opts in variants:
            ev = run_eval(model, data=data, opts=opts, batch=batch, console=console)
            be = run_bench(model, opts=opts, batch=batch, min_seconds=2.0, console=console)
            base_row = {
                "model": model,
                "variant": "baseline",
                "data": data,
                "top1": ev["baseline_top1"],
                "macs": prof["macs"],
                "images_per_s": be["baseline"]["images_per_s"],
                "batch": batch,
            }
            var = be["variants"][0]
            var_row = {
                "model": model,
                "variant": var["name"],
                "data": data,
                "top1": ev["top1"],
                "baseline_top1": ev["baseline_top1"],
                "macs": run_profile(model, opts=opts, counted=False)["macs"],
                "images_per_s": var["images_per_s"],
                "speedup": var["speedup"],
                "batch": batch,
            }
            rows += [base_row, var_row]
    Console().print(summary_table(rows, "vitedge demo: accuracy on real data and speed, same run, 2 threads"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
