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

ModelArg = Annotated[
    str, typer.Argument(help="vit4mnist, cifar-vit, timm:<name>, hf:vit, hf:<dir>, or an optimised dir")
]
OptOpt = Annotated[
    list[str] | None, typer.Option("-O", "--opt", help="NAME[:key=value,...]; repeat to stack")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch threads", min=1)]
ImgOpt = Annotated[int | None, typer.Option("--img-size", help="input size (default: the model's)")]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", help="local .safetensors weights for timm: models")
]
DataOpt = Annotated[
    str, typer.Option("--data", help="mnist, cifar10, imagenet-sample, or an ImageFolder dir")
]


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
    _emit(result, as_json, lambda r: report.print_profile(r, err))


@app.command("eval")
@_errors
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
    _emit(result, as_json, lambda r: report.print_eval(r, err))


@app.command()
@_errors
def bench(
    model: ModelArg,
    opt: OptOpt = None,
    batch: Annotated[int, typer.Option("--batch", help="images per forward")] = 16,
    threads: ThreadsOpt = 2,
    min_seconds: Annotated[
        float, typer.Option("--min-seconds", help="time each model at least this long")
    ] = 3.0,
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
    min_seconds: Annotated[
        float, typer.Option("--min-seconds", help="time each point at least this long")
    ] = 2.0,
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


@app.command("export")
@_errors
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
    _emit(
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
@_errors
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
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Train or distil a model (CIFAR-10 or an ImageFolder), with checkpoints that --resume exactly."""
    # Before any import: every local so far is a training option.
    options = {
        k: v for k, v in locals().items() if k not in ("model", "resume", "install", "threads", "as_json")
    }
    import shlex

    import torch

    from vitedge.train.run import config_from_options, default_out, resume_config, run_train

    torch.set_num_threads(threads)
    if resume:
        config = resume_config(model, out or default_out(model), options)
    else:
        config = config_from_options(model, options)
    command = shlex.join(["vitedge", *sys.argv[1:]])
    result = run_train(config, resume=resume, install_weights=install, console=err, command=command)
    _emit(result, as_json, lambda r: err.print(r, highlight=False))


# --- feature cache: encode, cache stats|invalidate, video (issue #6) -------------------------------
CacheDirOpt = Annotated[
    str | None, typer.Option("--cache-dir", help="disk tier folder (default $VITEDGE_CACHE/features)")
]


@app.command("encode")
@_errors
def encode_(
    model: ModelArg,
    directory: Annotated[str, typer.Argument(help="a folder of images (recursive), or imagenet-sample")],
    cache: Annotated[
        str, typer.Option("--cache", help="tiers fastest first: memory,disk,redis,redis-cluster")
    ] = "memory,disk",
    value_format: Annotated[str, typer.Option("--format", help="stored value: fp16 or int8")] = "fp16",
    batch: Annotated[int, typer.Option("--batch", help="images per forward for the misses")] = 16,
    limit: Annotated[int | None, typer.Option("--limit", help="encode the first N images only")] = None,
    cache_dir: CacheDirOpt = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Encode a folder of images through the feature cache; print the hit rate and the time saved."""
    from vitedge.cache.encode import run_encode
    from vitedge.commands import _progress

    with _progress(err) as progress:
        task = progress.add_task(f"encode {model}", total=None)
        result = run_encode(
            model,
            directory,
            cache=cache,
            value_format=value_format,
            batch=batch,
            limit=limit,
            threads=threads,
            cache_dir=cache_dir,
            progress=lambda n, total: progress.update(task, completed=n, total=total),
        )
    _emit(
        result,
        as_json,
        lambda r: err.print(
            f"{r['images']} images: hit rate {r['hit_rate']:.1%}, {r['time_s']:.2f} s, "
            f"time saved {r['time_saved_s']:.2f} s",
            highlight=False,
        ),
    )


cache_app = typer.Typer(
    help="Inspect or invalidate the persistent feature-cache tiers.", no_args_is_help=True
)
app.add_typer(cache_app, name="cache")
AdminTiersOpt = Annotated[str, typer.Option("--cache", help="tiers: disk,redis,redis-cluster")]


@cache_app.command("stats")
@_errors
def cache_stats(
    cache: AdminTiersOpt = "disk,redis", cache_dir: CacheDirOpt = None, as_json: JsonOpt = False
) -> None:
    """Entries and bytes per tier, and the namespaces (model, weights, settings) they belong to."""
    from vitedge.cache.encode import run_cache_stats

    result = run_cache_stats(cache=cache, cache_dir=cache_dir)
    _emit(result, as_json, lambda r: err.print(r, highlight=False))


@cache_app.command("invalidate")
@_errors
def cache_invalidate(
    model: Annotated[str, typer.Option("--model", help="drop every cached feature of this model id")],
    cache: AdminTiersOpt = "disk,redis",
    cache_dir: CacheDirOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Drop a model's namespaces (all weights, preprocessing and optimisation variants) from the tiers."""
    from vitedge.cache.encode import run_cache_invalidate

    result = run_cache_invalidate(model, cache=cache, cache_dir=cache_dir)
    _emit(result, as_json, lambda r: err.print(r, highlight=False))


@app.command("video")
@_errors
def video_(
    model: ModelArg,
    file: Annotated[Path, typer.Argument(help="a video file OpenCV reads")],
    keyframe_interval: Annotated[
        int, typer.Option("--keyframe-interval", help="full encode every K frames", min=1)
    ] = 30,
    threshold: Annotated[
        float, typer.Option("--threshold", help="per-block token change (relative L2) that recomputes it")
    ] = 0.1,
    pixel_threshold: Annotated[
        float, typer.Option("--pixel-threshold", help="mean absolute patch change (0..1) that recomputes it")
    ] = 0.02,
    cut_threshold: Annotated[
        float, typer.Option("--cut-threshold", help="histogram distance (0..1) that marks a scene cut")
    ] = 0.3,
    flow: Annotated[
        bool, typer.Option("--flow/--no-flow", help="follow camera motion (optical flow), warping the cache")
    ] = True,
    shift_threshold: Annotated[
        float, typer.Option("--shift-threshold", help="patch change (0..1) that recomputes a moved token")
    ] = 0.04,
    min_motion: Annotated[
        float, typer.Option("--min-motion", help="median flow (px/frame) below which the camera is still")
    ] = 0.5,
    all_queries: Annotated[
        bool, typer.Option("--all-queries", help="attention for every query, not only recomputed tokens")
    ] = False,
    max_frames: Annotated[int | None, typer.Option("--max-frames", help="first N frames only")] = None,
    plot: Annotated[
        Path | None, typer.Option("--plot", help="PNG over time (default <video>-reuse.png)")
    ] = None,
    img_size: ImgOpt = None,
    weights: WeightsOpt = None,
    threads: ThreadsOpt = 2,
    as_json: JsonOpt = False,
) -> None:
    """Temporal token reuse on a video, against full per-frame encoding in the same run."""
    from vitedge.cache.video import VideoConfig, run_video

    config = VideoConfig(
        keyframe_interval=keyframe_interval,
        threshold=threshold,
        pixel_threshold=pixel_threshold,
        cut_threshold=cut_threshold,
        flow=flow,
        shift_threshold=shift_threshold,
        min_motion=min_motion,
        all_queries=all_queries,
    )
    result = run_video(
        model,
        file,
        config=config,
        max_frames=max_frames,
        plot=plot if plot is not None else Path(f"{file.stem}-reuse.png"),
        img_size=img_size,
        weights=weights,
        threads=threads,
        console=err,
    )
    _emit(result, as_json, lambda r: err.print(r, highlight=False))


@app.command("show-tokens")
@_errors
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
    _emit(
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
