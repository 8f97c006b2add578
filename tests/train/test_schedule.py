"""Learning-rate schedule and budget refit."""

from __future__ import annotations

import itertools

import pytest

from vitedge.train.schedule import fit_epochs, lr_at


def test_warmup_then_cosine() -> None:
    lrs = [lr_at(s, total_steps=100, warmup_steps=10, peak=1.0) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:]))
    assert lrs[-1] < 1e-3


def test_fit_epochs() -> None:
    assert fit_epochs(done=1, requested=50, elapsed_s=10, epoch_s=10, budget_s=200) == 20
    assert fit_epochs(done=1, requested=5, elapsed_s=10, epoch_s=10, budget_s=200) == 5
    assert fit_epochs(done=3, requested=50, elapsed_s=300, epoch_s=10, budget_s=200) == 3
    assert fit_epochs(done=1, requested=9, elapsed_s=0, epoch_s=0, budget_s=1) == 9
