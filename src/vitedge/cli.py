"""The ``vitedge`` command line (names, options and JSON keys fixed by ``../shared/CONTRACT.md``).

Every command accepts ``--json`` and then prints exactly one JSON object on stdout; progress bars, tables and
logs go to stderr. Bad input ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from vitedge import report
from vitedge.commands import run_bench, run_eval, run_optimize, run_profile, run_sweep

app = typer.Typer(
    name="vitedge",
    help="Measure and accelerate the vision encoders of vision-language models on edge hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

ModelArg = Annotated[str, typer.Argument(help="vit4mnist, cifar-vit, timm:<name>, hf:vit, hf:<dir>, or an optimised dir")]
OptOpt = Annotated[list[str] | None, typer.Option("-O", "--opt", help="NAME[:key=value,...]; repeat to stack")]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch threads", min=1)]
ImgOpt = Annotated[int | None, typer.Option("--img-size", help="input size (default: the model's)")]
WeightsOpt = Annotated[Path | None, typer.Option("--weights", help="local .safetensors weights for timm: models")]
DataOpt = Annotated[str, typer.Option("--data", help="mnist, cifar10, imagenet-sample, or an ImageFolder dir")]


def _emit(obj: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, default=float) + "\n")
    else:
        render(obj)


def _errors(fn: F) -> F:
    """Turn user-facing errors into one line on stderr and exit status 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]


@app.command()
@_errors
def profile(
    model: ModelArg,
    batch: Annotated[int, typer.Option("--batch", help="images per forward")] = 1,
    dtype: Annotated[str, typer.Option("--dtype", help="fp32, bf16, fp16 or int8 for the byte counts")] = "fp32",
    budget: Annotated[str | None, typer.Option("--budget", help="memory budget, e.g. 4GiB: report max_batch")] = None,
    measure_memory: Annotated[bool, typer.Option("--measure-memory", help="check the planner in a subprocess")] = False,
    counted: Annotated[bool, typer.Option("--counted/--no-counted", help="also count FLOPs by running the model")] = True,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    opt: OptOpt = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Analytic FLOPs/MACs, parameters, bytes and arithmetic intensity per layer, cross-checked by execution."""
    result = run_profile(
        model,
        batch=batch,
        dtype=dtype,
        budget=budget,
        measure_memory=measure_memory,
        counted=counted,
        img_size=img_size,
        weights=weights,
        opts=opt or [],
        threads=threads,
    )
    _emit(result, as_json, lambda r: report.print_profile(r, err))


@app.command("eval")
@_errors
def eval_(
    model: ModelArg,
    data: DataOpt = "mnist",
    opt: OptOpt = None,
    batch: Annotated[int | None, typer.Option("--batch", help="default: chosen from the model's cost")] = None,
    limit: Annotated[int | None, typer.Option("--limit", help="evaluate the first N images only")] = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="compare the variant's outputs with the unmodified model")
    ] = False,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Top-1/top-5 on real data (with -O: also the unmodified model's, measured on the same batches)."""
    result = run_eval(
        model,
        data=data,
        opts=opt or [],
        batch=batch,
        limit=limit,
        reference=reference,
        img_size=img_size,
        weights=weights,
        threads=threads,
        console=err,
    )
    _emit(result, as_json, lambda r: report.print_eval(r, err))


@app.command()
@_errors
def bench(
    model: ModelArg,
    opt: OptOpt = None,
    batch: Annotated[int, typer.Option("--batch", help="images per forward")] = 16,
    threads: ThreadsOpt = 2,
    min_seconds: Annotated[float, typer.Option("--min-seconds", help="time each model at least this long")] = 3.0,
    iters: Annotated[int, typer.Option("--iters", help="at least this many timed rounds")] = 5,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Images/s and latency of the unmodified model and the -O variant, interleaved in one process."""
    result = run_bench(
        model,
        opts=opt or [],
        batch=batch,
        threads=threads,
        min_seconds=min_seconds,
        iters=iters,
        img_size=img_size,
        weights=weights,
        console=err,
    )
    _emit(result, as_json, lambda r: report.print_bench(r, err))


@app.command()
@_errors
def sweep(
    model: ModelArg,
    opt: OptOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="also measure top-1 on this data")] = None,
    batch: Annotated[int, typer.Option("--batch", help="images per forward for timing")] = 16,
    limit: Annotated[int | None, typer.Option("--limit", help="evaluate the first N images only")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write an accuracy/speed PNG here")] = None,
    threads: ThreadsOpt = 2,
    min_seconds: Annotated[float, typer.Option("--min-seconds", help="time each point at least this long")] = 2.0,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure many settings (one -O may carry a range, e.g. merge:r=0..16) against one baseline."""
    result = run_sweep(
        model,
        opts=opt or [],
        data=data,
        batch=batch,
        limit=limit,
        plot=plot,
        threads=threads,
        min_seconds=min_seconds,
        img_size=img_size,
        weights=weights,
        console=err,
    )
    _emit(result, as_json, lambda r: report.print_sweep(r, err))


@app.command()
@_errors
def optimize(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="directory to write; it reloads as a model id")],
    opt: OptOpt = None,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the -O stack and save the result as a directory that reloads as a model id."""
    result = run_optimize(model, opts=opt or [], out=out, img_size=img_size, weights=weights)
    _emit(result, as_json, lambda r: err.print(f"wrote {r['out']} ({r['name']})"))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
