"""Building a run: freezing by name, the resume check and the model-directory refusals, called directly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vitedge.models import build_untrained
from vitedge.train.config import TrainConfig
from vitedge.train.setup import check_resume, from_directory, train_only


def test_train_only_freezes_everything_else() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    named = list(net.named_parameters())
    chosen = train_only(named, "1.")
    assert [n for n, _ in chosen] == ["1.weight", "1.bias"]
    assert [p.requires_grad for _, p in named] == [False, False, True, True]
    with pytest.raises(ValueError, match="matches no parameter; names start with 0, 1"):
        train_only(named, "head")


def test_fresh_run_has_no_checkpoint_and_a_folder_needs_a_manifest(tmp_path: Path) -> None:
    cfg = TrainConfig(model="cifar-vit", out=str(tmp_path / "run"))
    assert check_resume(cfg, resume=False) is None
    fresh = build_untrained("cifar-vit", num_classes=10, img_size=32)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"without vitedge\.json"):
        from_directory(cfg, fresh, tmp_path / "empty")
