"""Learning-rate schedule and time-budget arithmetic (plain Python, no torch)."""

from __future__ import annotations

import math


def lr_at(step: int, *, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to zero at ``total_steps``.

    ``step`` counts from 0; the value is the rate used for that step's update.
    """
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    decay = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / decay, 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def fit_epochs(*, done: int, requested: int, elapsed_s: float, epoch_s: float, budget_s: float) -> int:
    """How many epochs in total fit the budget, given ``done`` of them and ``epoch_s`` per further epoch.

    The result lies in ``[done, requested]``; ``done`` means stop now.
    """
    if epoch_s <= 0:
        return requested
    more = math.floor(max(budget_s - elapsed_s, 0.0) / epoch_s)
    return max(done, min(requested, done + more))
