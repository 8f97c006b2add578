"""The ``vitedge`` command line (names, options and JSON keys fixed by ``../shared/CONTRACT.md``).

Every command accepts ``--json`` and then prints exactly one JSON object on stdout; progress bars, tables and
logs go to stderr. Bad input ends with a one-line ``error: ...`` on stderr and exit status 2. The shared
pieces live in :mod:`vitedge.cli_common`, the feature-cache commands in :mod:`vitedge.cli_cache`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from vitedge import cli_cache, report
from vitedge.cli_common import (
    DataOpt,
    ImgOpt,
    JsonOpt,
    MaxSecondsOpt,
    ModelArg,
    OptOpt,
    PrecisionOpt,
    ThreadsOpt,
    WeightsOpt,
    app,
    emit,
    err,
    user_errors,
)
from vitedge.commands import run_bench, run_eval, run_explain, run_optimize, run_profile, run_sweep

__all__ = ["app", "cli_cache", "main"]  # cli_cache: imported for the commands it registers on app


@app.command()
@user_errors
def profile(
    model: ModelArg,
    batch: Annotated[int, typer.Option("--batch", help="images per forward")] = 1,
    dtype: Annotated[
        str | None,
        typer.Option("--dtype", help="fp32, bf16, fp16 or int8 byte counts (default: the model's)"),
    ] = None,
    budget: Annotated[
        str | None, typer.Option("--budget", help="memory budget, e.g. 4GiB: report max_batch")
    ] = None,
    measure_memory: Annotated[
        bool, typer.Option("--measure-memory", help="check the planner in a subprocess")
    ] = False,
    counted: Annotated[
        bool, typer.Option("--counted/--no-counted", help="also count FLOPs by running the model")
    ] = True,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    opt: OptOpt = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Analytic FLOPs/MACs, parameters, bytes and arithmetic intensity per layer, checked by execution."""
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
    emit(result, as_json, lambda r: report.print_profile(r, err))


@app.command("eval")
@user_errors
def eval_(
    model: ModelArg,
    data: DataOpt = "mnist",
    opt: OptOpt = None,
    batch: Annotated[
        int | None, typer.Option("--batch", help="default: chosen from the model's cost")
    ] = None,
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
    emit(result, as_json, lambda r: report.print_eval(r, err))


@app.command()
@user_errors
def bench(
    model: ModelArg,
    opt: OptOpt = None,
    batch: Annotated[int, typer.Option("--batch", help="images per forward")] = 16,
    threads: ThreadsOpt = 2,
    min_seconds: Annotated[
        float, typer.Option("--min-seconds", help="time each model at least this long")
    ] = 3.0,
    iters: Annotated[int, typer.Option("--iters", help="at least this many timed rounds")] = 5,
    data: Annotated[
        str | None, typer.Option("--data", help="time on real images of this set, drawn evenly across it")
    ] = None,
    precision: PrecisionOpt = 0.03,
    max_seconds: MaxSecondsOpt = 30.0,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Images/s and latency of the unmodified model and the -O variant, interleaved in one process; the
    speed-up comes with a 95 % interval, timed until it is within --precision or --max-seconds pass."""
    result = run_bench(
        model,
        opts=opt or [],
        batch=batch,
        threads=threads,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        precision=precision,
        data=data,
        iters=iters,
        img_size=img_size,
        weights=weights,
        console=err,
    )
    emit(result, as_json, lambda r: report.print_bench(r, err))


@app.command()
@user_errors
def sweep(
    model: ModelArg,
    opt: OptOpt = None,
    data: Annotated[str | None, typer.Option("--data", help="also measure top-1 on this data")] = None,
    batch: Annotated[int, typer.Option("--batch", help="images per forward for timing")] = 16,
    limit: Annotated[int | None, typer.Option("--limit", help="evaluate the first N images only")] = None,
    plot: Annotated[Path | None, typer.Option("--plot", help="write an accuracy/speed PNG here")] = None,
    threads: ThreadsOpt = 2,
    min_seconds: Annotated[
        float, typer.Option("--min-seconds", help="time each point at least this long")
    ] = 2.0,
    precision: PrecisionOpt = 0.03,
    max_seconds: MaxSecondsOpt = 20.0,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Measure many settings (one -O may carry a range, e.g. merge:r=0..16) against one baseline; each row
    is timed against its own interleaved baseline, with a 95 % interval (on --data images when given)."""
    result = run_sweep(
        model,
        opts=opt or [],
        data=data,
        batch=batch,
        limit=limit,
        plot=plot,
        threads=threads,
        min_seconds=min_seconds,
        max_seconds=max_seconds,
        precision=precision,
        img_size=img_size,
        weights=weights,
        console=err,
    )
    emit(result, as_json, lambda r: report.print_sweep(r, err))


@app.command()
@user_errors
def optimize(
    model: ModelArg,
    out: Annotated[
        Path | None, typer.Option("--out", help="directory to write; it reloads as a model id")
    ] = None,
    opt: OptOpt = None,
    explain: Annotated[
        bool, typer.Option("--explain", help="print the execution plan per block with MACs; write nothing")
    ] = False,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Apply the -O stack and save the result as a directory that reloads as a model id (--explain: show
    the execution plan instead)."""
    if explain:
        result = run_explain(model, opts=opt or [], img_size=img_size, weights=weights)
        emit(result, as_json, lambda r: report.print_plan(r, err))
        return
    if out is None:
        raise ValueError("optimize needs --out DIR to write the model (or --explain to show the plan)")
    result = run_optimize(model, opts=opt or [], out=out, img_size=img_size, weights=weights)
    emit(result, as_json, lambda r: err.print(f"wrote {r['out']} ({r['name']})"))


@app.command("export")
@user_errors
def export_(
    model: ModelArg,
    out: Annotated[Path, typer.Option("--out", help="the .onnx file to write")],
    opt: OptOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="onnx")] = "onnx",
    exporter: Annotated[
        str, typer.Option("--exporter", help="dynamo (torch.export) or torchscript (faster, legacy)")
    ] = "dynamo",
    data: Annotated[
        str | None, typer.Option("--data", help="check images (default: mnist, cifar10 or imagenet-sample)")
    ] = None,
    check_n: Annotated[int, typer.Option("--check-n", help="images in the check against torch", min=1)] = 32,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    threads: Annotated[int, typer.Option("--threads", help="torch and ONNX Runtime threads", min=1)] = 2,
    as_json: JsonOpt = False,
) -> None:
    """Export to ONNX (-O int8: ONNX Runtime's INT8 path) and check it against torch on real images."""
    from vitedge.export import ExportMismatchError, run_export

    try:
        result = run_export(
            model,
            out=out,
            opts=opt or [],
            fmt=fmt,
            exporter=exporter,
            data=data,
            check_n=check_n,
            img_size=img_size,
            weights=weights,
            threads=threads,
        )
    except ExportMismatchError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from None
    emit(
        result,
        as_json,
        lambda r: err.print(
            f"wrote {r['out']} ({r['name']}, {r['bytes'] / 2**20:.1f} MiB); against torch on {r['n']} "
            f"{r['check_data']} images: max |diff| {r['max_abs_diff']:.3g}, mean cosine "
            f"{r['mean_cosine']:.6f}, top-1 agreement {r['top1_agreement']:.4f}",
            highlight=False,
        ),
    )


@app.command("train")
@user_errors
def train_(
    model: Annotated[str, typer.Argument(help="cifar-resnet, cifar-vit, cifar-swin or timm:<name>")],
    data: Annotated[
        str | None, typer.Option("--data", help="cifar10, or a folder of <class>/<image> files")
    ] = None,
    epochs: Annotated[int | None, typer.Option("--epochs", help="passes over the training images")] = None,
    batch: Annotated[int | None, typer.Option("--batch", help="images per step")] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="peak learning rate")] = None,
    weight_decay: Annotated[float | None, typer.Option("--weight-decay", help="weight decay")] = None,
    optimizer: Annotated[str | None, typer.Option("--optimizer", help="adamw or sgd (Nesterov)")] = None,
    momentum: Annotated[float | None, typer.Option("--momentum", help="SGD momentum")] = None,
    warmup_epochs: Annotated[
        float | None, typer.Option("--warmup-epochs", help="linear warm-up, then cosine")
    ] = None,
    label_smoothing: Annotated[
        float | None, typer.Option("--label-smoothing", help="label smoothing")
    ] = None,
    augment: Annotated[str | None, typer.Option("--augment", help="none, basic, cutout or trivial")] = None,
    mixup: Annotated[float | None, typer.Option("--mixup", help="mixup Beta alpha (0: off)")] = None,
    cutmix: Annotated[float | None, typer.Option("--cutmix", help="cutmix Beta alpha (0: off)")] = None,
    drop_path: Annotated[float | None, typer.Option("--drop-path", help="stochastic depth rate")] = None,
    bf16: Annotated[bool | None, typer.Option("--bf16/--no-bf16", help="bf16 autocast")] = None,
    seed: Annotated[int | None, typer.Option("--seed", help="seed of weights, order, augmentation")] = None,
    teacher: Annotated[str | None, typer.Option("--teacher", help="distil from this model id")] = None,
    hard_distill: Annotated[bool, typer.Option("--hard-distill", help="DeiT hard distillation")] = False,
    temperature: Annotated[float | None, typer.Option("--temperature", help="KD temperature (4)")] = None,
    ce_weight: Annotated[float | None, typer.Option("--ce-weight", help="task cross-entropy weight")] = None,
    kd_weight: Annotated[float | None, typer.Option("--kd-weight", help="soft KD weight")] = None,
    hard_weight: Annotated[
        float | None, typer.Option("--hard-weight", help="hard distillation weight")
    ] = None,
    feature_weight: Annotated[
        float | None, typer.Option("--feature-weight", help="feature MSE weight")
    ] = None,
    attention_weight: Annotated[
        float | None, typer.Option("--attention-weight", help="attention MSE weight")
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", help="train on N images spread over the set")
    ] = None,
    eval_limit: Annotated[int | None, typer.Option("--eval-limit", help="evaluate on N test images")] = None,
    eval_batch: Annotated[
        int | None, typer.Option("--eval-batch", help="images per evaluation forward")
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="auto, cpu or cuda")] = None,
    max_minutes: Annotated[
        float | None, typer.Option("--max-minutes", help="time budget (refits epochs)")
    ] = None,
    stop_after_minutes: Annotated[
        float | None, typer.Option("--stop-after-minutes", help="pause after")
    ] = None,
    stop_after_steps: Annotated[
        int | None, typer.Option("--stop-after-steps", help="pause after N steps")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option("--checkpoint-every", help="checkpoint every N steps")
    ] = None,
    log_every: Annotated[int | None, typer.Option("--log-every", help="progress every N steps")] = None,
    out: Annotated[str | None, typer.Option("--out", help="run folder (default runs/<model>)")] = None,
    init: Annotated[
        str | None, typer.Option("--init", help="start from these .safetensors weights (fine-tune)")
    ] = None,
    optimize: Annotated[
        list[str] | None,
        typer.Option("-O", "--optimize", help="apply before training (structured, merge, prune); repeatable"),
    ] = None,
    train_only: Annotated[
        str | None,
        typer.Option("--train-only", help="train only parameters named PREFIX... (e.g. token_scorers)"),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run checkpointed in --out")] = False,
    install: Annotated[
        bool, typer.Option("--install", help="copy the weights into vitedge/models/weights/")
    ] = False,
    exit_heads: Annotated[
        str | None,
        typer.Option(
            "--exit-heads", help="train exit heads after these blocks (3,5,7) on the frozen model (-O exit)"
        ),
    ] = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Train or distil a model (CIFAR-10 or an ImageFolder), with checkpoints that --resume exactly; with
    --exit-heads, train and calibrate exit heads on the frozen model instead."""
    # Before any import: every local so far is a training option.
    options = {
        k: v
        for k, v in locals().items()
        if k not in ("model", "resume", "install", "threads", "as_json", "exit_heads")
    }
    import shlex

    import torch

    if exit_heads is not None:
        from vitedge.cli_train import run_exit_heads

        torch.set_num_threads(threads)
        result = run_exit_heads(model, exit_heads, options, resume=resume, install=install, console=err)
        emit(result, as_json, lambda r: err.print(r, highlight=False))
        return

    from vitedge.train.run import config_from_options, default_out, resume_config, run_train

    torch.set_num_threads(threads)
    if resume:
        config = resume_config(model, out or default_out(model), options)
    else:
        config = config_from_options(model, options)
    command = shlex.join(["vitedge", *sys.argv[1:]])
    result = run_train(config, resume=resume, install_weights=install, console=err, command=command)
    emit(result, as_json, lambda r: err.print(r, highlight=False))


@app.command("show-tokens")
@user_errors
def show_tokens(
    model: ModelArg,
    image: Annotated[Path, typer.Argument(help="an image file")],
    out: Annotated[Path, typer.Option("--out", help="PNG to write")],
    opt: OptOpt = None,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Draw which patches token merging or pruning combined on one image (on Swin: the groups of the first
    merging block, since window merging is undone after every block)."""
    from vitedge.commands import run_show_tokens

    result = run_show_tokens(model, image, opts=opt or [], out=out, img_size=img_size, weights=weights)
    emit(
        result,
        as_json,
        lambda r: err.print(f"{r['tokens_out']} of {r['tokens_in']} tokens left; wrote {r['out']}"),
    )


def main() -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    app()


if __name__ == "__main__":
    main()
