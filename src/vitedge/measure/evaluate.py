"""Accuracy on real data, and agreement of a variant with its unmodified model.

``evaluate`` runs one or several models over the same batches (so a baseline and a variant see identical
inputs) and reports top-1/top-5 against the labels, and, for each variant, the mean cosine similarity of its
outputs with the first model's and the share of images where both pick the same top-1 class. The agreement
figures also serve models without trained weights (``--reference``), whose accuracy means nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

ProgressFn = Callable[[int], None]


@dataclass(frozen=True, kw_only=True)
class EvalResult:
    name: str
    n: int
    top1: float
    top5: float
    mean_cosine: float | None = None
    top1_agreement: float | None = None
    top1_holdout: float | None = None
    n_holdout: int = 0
    depth: dict[int, int] | None = None  # blocks run -> images, for a model whose plan exits early


def _forward(model: nn.Module, x: torch.Tensor, depth: dict[int, int]) -> torch.Tensor:
    """The model's output; a vitedge encoder whose plan records per-image depth (``exit``) counts it."""
    from vitedge.models.base import Encoder

    plan = getattr(model, "plan", None)
    if isinstance(model, Encoder) and plan is not None and plan.router is not None:
        out, trace = model.forward_traced(x, sources=False)
        if trace.depth is not None:
            for d, c in zip(*trace.depth.unique(return_counts=True), strict=True):
                depth[int(d)] = depth.get(int(d), 0) + int(c)
        return out
    return model(x)


@dataclass
class _Tally:
    correct1: int = 0
    correct5: int = 0
    cosine_sum: float = 0.0
    agree: int = 0
    correct1_holdout: int = 0
    depth: dict[int, int] = field(default_factory=dict)


def evaluate(
    models: dict[str, nn.Module],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    threads: int = 2,
    progress: ProgressFn | None = None,
    holdout_from: int | None = None,
) -> list[EvalResult]:
    """Evaluate every model on every batch; the first model is the reference for agreement figures.

    Args:
        models: name -> model returning (B, classes) scores; the first entry is the reference.
        batches: ``(x, y)`` pairs, x (B, C, H, W), y int64 (B,).
        threads: torch threads for the run.
        progress: called with the number of images done after each batch.
        holdout_from: also report ``top1_holdout`` over the images from this position on (those that
            calibration did not see).
    """
    if not models:
        raise ValueError("evaluate needs at least one model")
    names = list(models)
    tallies = {name: _Tally() for name in names}
    n = 0
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.inference_mode():
            for m in models.values():
                m.eval()
            for x, y in batches:
                ref_out: torch.Tensor | None = None
                for name in names:
                    t = tallies[name]
                    out = _forward(models[name], x, t.depth).float()  # (B, K)
                    k = min(5, out.shape[1])
                    top = out.topk(k, dim=1).indices  # (B, k)
                    hit = top[:, 0] == y  # (B,)
                    t.correct1 += int(hit.sum())
                    if holdout_from is not None:
                        t.correct1_holdout += int(hit[max(holdout_from - n, 0) :].sum())
                    t.correct5 += int((top == y[:, None]).any(dim=1).sum())
                    if ref_out is None:
                        ref_out = out
                    else:
                        t.cosine_sum += float(F.cosine_similarity(out, ref_out, dim=1).sum())
                        t.agree += int((out.argmax(1) == ref_out.argmax(1)).sum())
                n += int(y.shape[0])
                if progress:
                    progress(n)
    finally:
        torch.set_num_threads(previous)
    if n == 0:
        raise ValueError("evaluate got no data")
    n_holdout = max(n - holdout_from, 0) if holdout_from is not None else 0
    results = []
    for i, name in enumerate(names):
        t = tallies[name]
        results.append(
            EvalResult(
                name=name,
                n=n,
                top1=t.correct1 / n,
                top5=t.correct5 / n,
                mean_cosine=None if i == 0 else t.cosine_sum / n,
                top1_agreement=None if i == 0 else t.agree / n,
                top1_holdout=t.correct1_holdout / n_holdout if n_holdout else None,
                n_holdout=n_holdout,
                depth=dict(sorted(t.depth.items())) or None,
            )
        )
    return results
