"""One-call entry points of the Python API over an encoder in memory: ``profile``, ``evaluate``, ``bench``.

They take what a script holds (an Encoder from :func:`vitedge.load` or :func:`vitedge.wrap`, or a model id)
and return the same JSON-ready dictionaries as the CLI's ``--json`` (keys in ``../shared/CONTRACT.md``).
``vitedge profile/eval/bench MODEL`` build their models from ids; these measure the object you pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from vitedge.models.base import Encoder


def _encoder(model: Any) -> Encoder:
    from vitedge.models import load
    from vitedge.models.wrap import wrap

    return load(model) if isinstance(model, str) else wrap(model)


def _name(enc: Encoder) -> str:
    from vitedge.api import describe

    return " ".join(describe(c) for c in enc.applied) or "baseline"


def _with_baseline(enc: Encoder, baseline: Any) -> dict[str, torch.nn.Module]:
    """``{"baseline": ..., name: enc}`` (the baseline first, as evaluate and bench expect), or just enc."""
    models: dict[str, torch.nn.Module] = {} if baseline is None else {"baseline": _encoder(baseline)}
    models[_name(enc)] = enc
    return models


def profile(model: Any, *, batch: int = 1, counted: bool = True, threads: int = 2) -> dict[str, Any]:
    """Analytic MACs, FLOPs, parameters and memory of ``model`` as it is now (its execution plan included),
    and, with ``counted``, the FLOPs counted by running it once on random input.

    Raises:
        ValueError: ``batch`` below 1.
    """
    from vitedge.measure import analyze, count_flops

    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    enc = _encoder(model)
    dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(enc.compute_dtype, "fp32")
    out: dict[str, Any] = {"model": enc.model_id, "name": _name(enc), "batch": batch, "dtype": dtype}
    out.update(analyze(enc.arch(), batch=batch, dtype=dtype).to_json())
    if counted:
        previous = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out["counted_flops"] = count_flops(enc, enc.example_input(batch)).total
        finally:
            torch.set_num_threads(previous)
    return out


def evaluate(
    model: Any,
    data: str | Path,
    *,
    baseline: Any = None,
    batch: int = 64,
    limit: int | None = None,
    threads: int = 2,
) -> dict[str, Any]:
    """Top-1 and top-5 of ``model`` on ``data`` (``mnist``, ``cifar10``, ``imagenet-sample`` or an image
    folder laid out as ImageFolder); with ``baseline`` (another model), also its top-1 and the agreement of
    the two on the same batches (``baseline_top1``, ``mean_cosine``, ``top1_agreement``).

    Raises:
        ValueError: a bad data name or folder, ``batch`` or ``limit`` below 1.
    """
    from vitedge.data import as_tensor_batches, open_dataset
    from vitedge.measure.evaluate import evaluate as run

    if batch < 1 or (limit is not None and limit < 1):
        raise ValueError(f"batch and limit must be positive integers, got {batch} and {limit}")
    enc = _encoder(model)
    models = _with_baseline(enc, baseline)
    dataset = open_dataset(data, enc.preprocess, limit=limit)
    results = run(models, as_tensor_batches(dataset, batch), threads=threads)
    main = results[-1]
    out: dict[str, Any] = {
        "model": enc.model_id,
        "name": main.name,
        "data": str(data),
        "top1": main.top1,
        "top5": main.top5,
        "n": main.n,
    }
    if baseline is not None:
        out.update(
            baseline_top1=results[0].top1, mean_cosine=main.mean_cosine, top1_agreement=main.top1_agreement
        )
    return out


def bench(
    model: Any,
    *,
    baseline: Any = None,
    batch: int = 16,
    threads: int = 2,
    min_seconds: float = 3.0,
    max_seconds: float = 30.0,
) -> dict[str, Any]:
    """Images per second and latency of ``model`` at ``batch`` on random input; with ``baseline`` (e.g.
    the unmodified model, loaded again), both interleaved in this process and the ``speedup`` of ``model``
    with its 95 % interval, timed until that is within 3 % or ``max_seconds`` pass.

    Returns:
        ``{"model", "variants": [one result]}``, and ``"baseline"`` when one was given.

    Raises:
        ValueError: ``batch`` below 1.
    """
    from vitedge.measure.bench import BenchConfig
    from vitedge.measure.bench import bench as run

    if batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch}")
    enc = _encoder(model)
    models = _with_baseline(enc, baseline)
    cfg = BenchConfig(
        batch=batch,
        threads=threads,
        max_iters=1000,
        min_seconds=min_seconds,
        max_seconds=max(min_seconds, max_seconds),
    )
    results = run(models, enc.example_input(batch), cfg)
    out: dict[str, Any] = {"model": enc.model_id, "variants": [results[-1].to_json()]}
    if baseline is not None:
        out["baseline"] = results[0].to_json()
    return out
