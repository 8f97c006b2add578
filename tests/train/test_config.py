"""TrainConfig / DistillConfig validation and JSON round trip."""

from __future__ import annotations

import pytest

from vitedge.train import DistillConfig, TrainConfig
from vitedge.train.config import distill_config


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("epochs", 0),
        ("epochs", 2.5),
        ("batch_size", -1),
        ("lr", 0.0),
        ("lr", float("nan")),
        ("weight_decay", -0.1),
        ("optimizer", "lamb"),
        ("momentum", 1.5),
        ("warmup_epochs", -1.0),
        ("label_smoothing", 1.0),
        ("augment", "autoaugment"),
        ("mixup_alpha", -0.2),
        ("drop_path", 1.0),
        ("seed", -3),
        ("limit", 0),
        ("eval_batch_size", 0),
        ("device", "tpu"),
        ("max_minutes", 0.0),
        ("stop_after_steps", 0),
        ("checkpoint_every_steps", 0),
        ("out", ""),
    ],
)
def test_bad_values_name_the_value(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field) as info:
        TrainConfig(model="cifar-vit", **{field: value})  # type: ignore[arg-type]
    assert repr(value) in str(info.value) or str(value) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"teacher": ""}, "teacher"),
        ({"teacher": "cifar-resnet", "temperature": 0.0}, "temperature"),
        ({"teacher": "cifar-resnet", "kd_weight": -1.0}, "kd_weight"),
        ({"teacher": "cifar-resnet", "kd_weight": 0.0}, "at least one"),
    ],
)
def test_bad_distill_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DistillConfig(**kwargs)


def test_distill_defaults_from_options() -> None:
    assert distill_config(None) is None
    hard = distill_config("cifar-resnet", hard=True)
    assert hard is not None and (hard.ce_weight, hard.hard_weight, hard.kd_weight) == (0.5, 0.5, 0.0)
    soft = distill_config("cifar-resnet", weights={"kd": 0.7, "feature": None})
    assert soft is not None and (soft.ce_weight, soft.kd_weight, soft.feature_weight) == (1.0, 0.7, 0.0)
    with pytest.raises(ValueError, match="--teacher"):
        distill_config(None, hard=True)


def test_json_round_trip() -> None:
    cfg = TrainConfig(
        model="cifar-vit", distill=DistillConfig(teacher="cifar-resnet", hard_weight=0.5), limit=8
    )
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match="unknown keys"):
        TrainConfig.from_json({**cfg.to_json(), "colour": "red"})
