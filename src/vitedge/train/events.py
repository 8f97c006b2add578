"""What the training loop reports: progress while it runs, and its result."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vitedge.models import Encoder


@dataclass(frozen=True, kw_only=True)
class TrainProgress:
    """A progress report: ``kind`` is ``step`` (every ``log_every_steps``), ``epoch`` or ``note``."""

    kind: str
    epoch: int  # 1-based epoch in progress (or just finished)
    epochs: int
    step: int  # steps done in this epoch
    steps: int
    loss: float | None = None
    train_acc: float | None = None
    lr: float | None = None
    images_per_s: float | None = None
    eta_s: float | None = None
    epoch_s: float | None = None  # train + evaluation time of the finished epoch
    elapsed_s: float = 0.0  # since the run started (all sessions)
    test_top1: float | None = None
    message: str = ""


ProgressFn = Callable[[TrainProgress], None]


@dataclass(frozen=True, kw_only=True)
class TrainResult:
    model: Encoder  # eval mode
    status: str  # "done" or "paused" (resume with the same out folder)
    top1: float | None
    top5: float | None
    epochs_run: int
    epochs_requested: int
    history: list[dict[str, Any]]
    seconds: float
    out: Path
    weights: Path | None = None  # final weights (status "done")
    card: dict[str, Any] | None = None
