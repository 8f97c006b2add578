"""What each CLI command does, as plain functions returning the contract's JSON objects.

The CLI (``cli.py``) only parses options and renders; everything here is callable from Python and tests.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vitedge import __version__
from vitedge.api import config_name, config_to_dict, describe, optimize_
from vitedge.compress.calibration import MNIST_CALIBRATION
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.measure.bench import BenchConfig, bench, bench_against_baseline
from vitedge.measure.cost import analyze
from vitedge.measure.evaluate import evaluate
from vitedge.models import Encoder, load
from vitedge.models.saved import check_writable, write_optimized
from vitedge.options import parse_options, parse_sweep
from vitedge.plan.explain import expected_macs

_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"--{name} must be a positive integer, got {value}")


def build_model(model_id: str, configs: list[Any], *, img_size: int | None, weights: Path | None) -> Encoder:
    enc = load(model_id, weights=weights, img_size=img_size)
    return optimize_(enc, *configs) if configs else enc


def _progress(console: Console | None) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console or Console(stderr=True),
        transient=True,
        disable=console is None,
    )


def variant_name(opts: list[str]) -> str:
    return " ".join(opts) if opts else "baseline"


def run_profile(
    model_id: str,
    *,
    batch: int = 1,
    dtype: str | None = None,
    budget: str | None = None,
    measure_memory: bool = False,
    counted: bool = True,
    img_size: int | None = None,
    weights: Path | None = None,
    opts: list[str] | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    from vitedge.measure.counted import count_flops
    from vitedge.measure.memory import measure_peak_rss, parse_bytes, plan_batch

    _check_positive("batch", batch)
    configs = parse_options(opts or [])
    enc = build_model(model_id, configs, img_size=img_size, weights=weights)
    dtype = dtype or _DTYPE_NAMES.get(enc.compute_dtype, "fp32")
    spec = enc.arch()
    report = analyze(spec, batch=batch, dtype=dtype)
    out: dict[str, Any] = {
        "model": model_id,
        "name": variant_name(opts or []),
        "batch": batch,
        "dtype": dtype,
    }
    out["img_size"] = list(enc.img_size)
    out.update(report.to_json())
    # what the weights occupy as stored (parameters and buffers): for quantised layers the analytic count,
    # which prices every matrix weight at the compute dtype, overstates them
    stored = sum(t.numel() * t.element_size() for t in enc.state_dict().values())
    out["stored_weight_bytes"] = stored
    if any(config_name(c) in ("int8", "int8wo", "int4", "mixed") for c in configs):
        out["weight_bytes"] = stored
    out |= dynamic_report(enc, None)  # exit: the MACs its calibration images' depths predict
    if counted:
        torch.set_num_threads(threads)
        c = count_flops(enc, enc.example_input(batch))
        out["counted_flops"] = c.total
        out["counted_over_analytic"] = c.total / out["flops"] if out["flops"] else None
    if budget is not None:
        plan = plan_batch(spec, budget_bytes=parse_bytes(budget), dtype=dtype)
        out["max_batch"] = plan.max_batch
        out["budget_bytes"] = parse_bytes(budget)
        out["plan"] = plan.to_json()
    if measure_memory:
        if configs:
            raise ValueError("--measure-memory measures the unmodified model; drop -O")
        measured = measure_peak_rss(model_id, batch=batch, dtype=dtype, img_size=img_size, threads=threads)
        out["measured_memory"] = measured.to_json()
    return out


def _default_eval_batch(enc: Encoder) -> int:
    per_image = enc.arch().macs
    return int(max(8, min(500, 4e10 // max(per_image, 1))))


def run_eval(
    model_id: str,
    *,
    data: str,
    opts: list[str] | None = None,
    batch: int | None = None,
    limit: int | None = None,
    reference: bool = False,
    img_size: int | None = None,
    weights: Path | None = None,
    threads: int = 2,
    console: Console | None = None,
) -> dict[str, Any]:
    _check_positive("batch", batch)
    _check_positive("limit", limit)
    configs = parse_options(opts or [])
    if reference and not configs:
        raise ValueError(
            "--reference compares a variant with the unmodified model; give -O options (with -O, the "
            "comparison keys mean_cosine and top1_agreement are always reported)"
        )
    base = load(model_id, weights=weights, img_size=img_size)
    models: dict[str, torch.nn.Module] = {"baseline": base}
    if configs:
        models[variant_name(opts or [])] = build_model(model_id, configs, img_size=img_size, weights=weights)
    dataset = open_dataset(data, base.preprocess, limit=limit)
    batch = batch or _default_eval_batch(base)
    total = len(dataset)  # type: ignore[arg-type]
    # vit4mnist calibrates on the first MNIST test digits: the rest are its held-out set.
    holdout = MNIST_CALIBRATION if data == "mnist" and base.model_id == "vit4mnist" else None
    with _progress(console) as progress:
        task = progress.add_task(f"eval {model_id} on {data}", total=total)
        results = evaluate(
            models,
            as_tensor_batches(dataset, batch),
            threads=threads,
            progress=lambda n: progress.update(task, completed=n),
            holdout_from=holdout,
        )
    main = results[-1]
    out: dict[str, Any] = {
        "model": model_id,
        "name": main.name,
        "data": data,
        "top1": main.top1,
        "top5": main.top5,
        "n": main.n,
        "batch": batch,
        "trained": base.info.trained,
    }
    if main.n_holdout:
        out["top1_holdout"] = main.top1_holdout
        out["n_holdout"] = main.n_holdout
    if configs:
        out["baseline_top1"] = results[0].top1
        out["baseline_top5"] = results[0].top5
        if main.n_holdout:
            out["baseline_top1_holdout"] = results[0].top1_holdout
    if configs:
        out["mean_cosine"] = main.mean_cosine
        out["top1_agreement"] = main.top1_agreement
    variant = models.get(main.name)
    if configs and isinstance(variant, Encoder):
        out |= dynamic_report(variant, main.depth)
    return out


def dynamic_report(enc: Encoder, depth: dict[int, int] | None) -> dict[str, Any]:
    """What a dynamic technique spent: ``mean_depth`` (fraction of blocks run per image), the depth
    histogram (``depth_blocks``: blocks run -> images), the exit threshold with its calibration, and the
    MACs per image expected from the calibration images' exits (``expected_macs``, against the full
    model's ``macs``)."""
    from vitedge.dynamic.exit import exit_calibration_depths, exit_info
    from vitedge.plan.explain import exit_macs

    out: dict[str, Any] = {}
    info = exit_info(enc)
    if info is not None:
        out["exit"] = info
        depths = exit_calibration_depths(enc)
        if depths is not None:
            out["expected_macs"] = exit_macs(enc, depths)
    if depth:
        blocks = len(enc.blocks)
        n = sum(depth.values())
        out["mean_depth"] = sum(d * c for d, c in depth.items()) / n / blocks
        out["depth_blocks"] = {str(d): c for d, c in depth.items()}
    return out


DATA_TIMING_IMAGES = 64  # real images per timing round with --data (at least one batch)


def timing_input(enc: Encoder, batch: int, data: str | None) -> torch.Tensor:
    """What ``bench`` and ``sweep`` time on: random input (one batch), or real images of ``data`` drawn
    evenly across the whole set (the test sets are stored sorted by class, so this is class-balanced):
    whole batches of at least :data:`DATA_TIMING_IMAGES` images, since a data-dependent technique (early
    exit) costs what its images make it cost, and one image says nothing about the rest."""
    if data is None:
        return enc.example_input(batch)
    return real_images(enc, data, batch * -(-DATA_TIMING_IMAGES // batch))


def real_images(enc: Encoder, data: str, count: int) -> torch.Tensor:
    """``count`` images of ``data`` drawn evenly across the whole set, in set order (repeated when the
    set is smaller)."""
    dataset = open_dataset(data, enc.preprocess)
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise ValueError(f"--data {data} holds no images to time on")
    picks = np.linspace(0, n - 1, num=count).round().astype(np.int64) if count <= n else np.arange(count) % n
    return torch.stack([dataset[int(i)][0] for i in picks])


def run_bench(
    model_id: str,
    *,
    opts: list[str] | None = None,
    batch: int = 16,
    threads: int = 2,
    min_seconds: float = 3.0,
    max_seconds: float = 30.0,
    precision: float = 0.03,
    iters: int = 5,
    data: str | None = None,
    img_size: int | None = None,
    weights: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    _check_positive("batch", batch)
    _check_positive("iters", iters)
    configs = parse_options(opts or [])
    base = load(model_id, weights=weights, img_size=img_size)
    models: dict[str, torch.nn.Module] = {"baseline": base}
    if configs:
        models[variant_name(opts or [])] = build_model(model_id, configs, img_size=img_size, weights=weights)
    cfg = BenchConfig(
        batch=batch,
        threads=threads,
        min_iters=iters,
        max_iters=max(iters, 1000),
        min_seconds=min_seconds,
        max_seconds=max(max_seconds, min_seconds),
        precision=precision,
    )
    x = timing_input(base, batch, data)
    with _progress(console) as progress:
        task = progress.add_task(f"bench {model_id}", total=None)
        results = bench(models, x, cfg, progress=lambda i, _n: progress.update(task, completed=i))
    out: dict[str, Any] = {
        "model": model_id,
        "baseline": results[0].to_json(),
        "variants": [r.to_json() for r in results[1:]],
    }
    if data is not None:
        out["data"] = data
    return out


def run_sweep(
    model_id: str,
    *,
    opts: list[str] | None = None,
    data: str | None = None,
    batch: int = 16,
    limit: int | None = None,
    plot: Path | None = None,
    threads: int = 2,
    min_seconds: float = 2.0,
    max_seconds: float = 20.0,
    precision: float = 0.03,
    img_size: int | None = None,
    weights: Path | None = None,
    console: Console | None = None,
) -> dict[str, Any]:
    _check_positive("batch", batch)
    _check_positive("limit", limit)
    if not opts:
        raise ValueError("sweep needs at least one -O option, e.g. -O merge:r=0..16")
    stacks = parse_sweep(opts)
    base = load(model_id, weights=weights, img_size=img_size)
    variants = {
        " ".join(describe(c) for c in stack): build_model(model_id, stack, img_size=img_size, weights=weights)
        for stack in stacks
    }
    x = timing_input(base, batch, data)  # real images when --data is given: data-dependent techniques vary
    cfg = BenchConfig(
        batch=batch,
        threads=threads,
        min_iters=3,
        max_iters=1000,
        min_seconds=min_seconds,
        max_seconds=max(max_seconds, min_seconds),
        precision=precision,
    )
    with _progress(console) as progress:
        task = progress.add_task(f"sweep {model_id}", total=len(variants))
        base_ips, timed = bench_against_baseline(
            base, dict(variants), x, cfg, progress=lambda _name: progress.advance(task)
        )
        rows: list[dict[str, Any]] = [
            {
                "name": name,
                "images_per_s": v.images_per_s,
                "baseline_images_per_s": v.baseline_images_per_s,
                "speedup": v.speedup,
                "speedup_low": v.speedup_low,
                "speedup_high": v.speedup_high,
                "p50_ms": v.p50_ms,
                "iterations": v.iterations,
                "stop": v.stop,
                "macs": expected_macs(variants[name], x),  # adaptive: the mean over the timed images
            }
            for name, v in timed.items()
        ]
        baseline: dict[str, Any] = {"name": "baseline", "images_per_s": base_ips, "macs": base.arch().macs}
        if data is not None:
            dataset = open_dataset(data, base.preprocess, limit=limit)
            models: dict[str, torch.nn.Module] = {"baseline": base, **variants}
            ev_task = progress.add_task(f"eval on {data}", total=len(dataset))  # type: ignore[arg-type]
            results = evaluate(
                models,
                as_tensor_batches(dataset, _default_eval_batch(base)),
                threads=threads,
                progress=lambda n: progress.update(ev_task, completed=n),
            )
            baseline["top1"] = results[0].top1
            for row, res in zip(rows, results[1:], strict=True):
                row["top1"] = res.top1
                row["mean_cosine"] = res.mean_cosine
    out: dict[str, Any] = {
        "model": model_id,
        "batch": batch,
        "threads": threads,
        "baseline": baseline,
        "rows": rows,
    }
    if plot is not None:
        from vitedge.report.plots import plot_sweep

        plot_sweep(out, plot)
        out["plot"] = str(plot)
    return out


def run_optimize(
    model_id: str,
    *,
    opts: list[str] | None,
    out: Path,
    img_size: int | None = None,
    weights: Path | None = None,
) -> dict[str, Any]:
    """Write ``out/vitedge.json`` and the unmodified weights; loading the directory re-applies the stack."""
    configs = parse_options(opts or [])
    check_writable(out)  # before the (slow) model loads
    base = load(model_id, weights=weights, img_size=img_size)
    # fail before writing anything; the optimised copy also bundles files its configs read (exit's heads)
    optimized = optimize_(load(model_id, weights=weights, img_size=img_size), *configs)
    manifest = {
        "vitedge_version": __version__,
        "base": model_id,
        "img_size": img_size,
        "configs": [config_to_dict(c) for c in configs],
        "name": variant_name(opts or []),
    }
    write_optimized(out, base, manifest=manifest, configs_from=optimized)
    saved = json.loads((out / "vitedge.json").read_text())
    return {"model": model_id, "out": str(out), "name": manifest["name"], "configs": saved["configs"]}


def run_explain(
    model_id: str,
    *,
    opts: list[str] | None,
    img_size: int | None = None,
    weights: Path | None = None,
) -> dict[str, Any]:
    """The execution plan of the -O stack on ``model_id``, per block with the cost model's MACs; writes
    nothing."""
    from vitedge.plan.explain import explain

    enc = build_model(model_id, parse_options(opts or []), img_size=img_size, weights=weights)
    out = explain(enc)
    out["name"] = variant_name(opts or [])
    return out


def run_show_tokens(
    model_id: str,
    image: Path,
    *,
    opts: list[str] | None,
    out: Path,
    img_size: int | None = None,
    weights: Path | None = None,
) -> dict[str, Any]:
    """Draw which patches the -O stack merged or pruned on one image."""
    from vitedge.data import build_transform, read_image
    from vitedge.models.base import SequenceEncoder
    from vitedge.report.token_map import draw_token_map, group_map

    configs = parse_options(opts or [])
    enc = build_model(model_id, configs, img_size=img_size, weights=weights)
    by = {} if enc.plan is None else enc.plan.by
    swin_merge = any(config_name(c) == "window_merge" for c in configs)  # Swin: the first merging block
    if not swin_merge:
        if "window" in by:
            raise ValueError(
                "show-tokens draws merged tokens; window_prune drops whole windows per block rather than "
                "tokens, so there is no token map to draw (use -O window_merge:r=N to see window merging)"
            )
        if "reducer" not in by or "router" in by:
            raise ValueError("show-tokens needs a token-merging or pruning option, e.g. -O merge:r=8")
    pre = enc.preprocess
    x = build_transform(pre)(read_image(image))[None]
    with torch.inference_mode():
        logits, trace = enc.forward_traced(x)
    fused: set[int] = set()
    if swin_merge:
        recorded = trace.window_groups
        if recorded is None:
            raise ValueError(
                f"{variant_name(opts or [])} merges nothing on {model_id} at this size (r=0, or no block "
                "whose grid divides into whole windows)"
            )
        groups = recorded.numpy()
        kept = int(recorded.unique().numel())
        tokens_in = int(recorded.numel())
        title = f"{variant_name(opts or [])}: first merging block computes {kept} of {tokens_in} tokens"
    else:
        assert isinstance(enc, SequenceEncoder)
        state = trace.tokens
        groups = group_map(state.source[0], state.num_prefix, enc.layout.grid)
        if state.index is not None:
            fused = {int(i) for i in (state.index[0] == -1).nonzero().flatten().tolist()}
        kept = int(state.x.shape[1])
        tokens_in = enc.layout.num_tokens
        title = f"{variant_name(opts or [])}: {kept} of {tokens_in} tokens left"
    mean = torch.tensor(pre.mean).view(-1, 1, 1)
    std = torch.tensor(pre.std).view(-1, 1, 1)
    pixels = (x[0].float() * std + mean).clamp(0, 1)
    if pixels.shape[0] == 1:
        pixels = pixels.expand(3, -1, -1)
    draw_token_map(pixels.permute(1, 2, 0).numpy(), groups, out, title=title, fused=fused)
    return {
        "model": model_id,
        "name": variant_name(opts or []),
        "image": str(image),
        "out": str(out),
        "tokens_in": tokens_in,
        "tokens_out": kept,
        "top1": int(logits.argmax(1)[0]),
    }
