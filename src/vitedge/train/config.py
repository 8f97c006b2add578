"""What a training run does, as frozen, JSON-serialisable configs validated at construction."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

OPTIMIZERS = ("adamw", "sgd")
AUGMENT_POLICIES = ("none", "basic", "cutout", "trivial")
DEVICES = ("auto", "cpu", "cuda")
# TrainConfig fields a resumed run may change: they do not alter what is computed (device aside).
SESSION_FIELDS = (
    "device",
    "stop_after_minutes",
    "stop_after_steps",
    "checkpoint_every_steps",
    "log_every_steps",
)


def _number(name: str, value: Any, *, low: float, high: float = math.inf, low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < low or (low_open and value == low) or value > high:
        lo = f"({low}" if low_open else f"[{low}"
        raise ValueError(f"{name} must be in {lo}, {high}], got {value!r}")


def _integer(name: str, value: Any, *, low: int, optional: bool = False) -> None:
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}{' or None' if optional else ''}, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    """Knowledge distillation from a frozen teacher.

    The loss is ``ce_weight * CE(student, labels) + kd_weight * T^2 * KL(teacher_T || student_T)
    + hard_weight * CE(student_dist, argmax teacher) + feature_weight * MSE(features)
    + attention_weight * MSE(attention maps)``. A student with a distillation token (DeiT) uses its class
    head for CE and its distillation head for the KD and hard terms; DeiT's hard distillation is
    ``ce_weight=0.5, hard_weight=0.5, kd_weight=0``.

    Attributes:
        teacher: model id of the teacher (e.g. ``cifar-resnet``), loaded with its trained weights.
        temperature: softmax temperature ``T`` of the KD term.
        ce_weight: weight of the task cross-entropy (with label smoothing).
        kd_weight: weight of the soft KD term (0 disables it).
        hard_weight: weight of hard distillation (0 disables it).
        feature_weight: weight of the final-feature MSE (student tokens through a learned linear map to the
            teacher's width, pooled to the teacher's grid); 0 disables it.
        attention_weight: weight of the MSE between the last blocks' head-averaged attention maps (both
            models need global attention over the same tokens); 0 disables it.
    """

    teacher: str
    temperature: float = 4.0
    ce_weight: float = 1.0
    kd_weight: float = 1.0
    hard_weight: float = 0.0
    feature_weight: float = 0.0
    attention_weight: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.teacher, str) or not self.teacher:
            raise ValueError(f"teacher must be a model id such as 'cifar-resnet', got {self.teacher!r}")
        _number("temperature", self.temperature, low=0.0, low_open=True)
        for name in ("ce_weight", "kd_weight", "hard_weight", "feature_weight", "attention_weight"):
            _number(name, getattr(self, name), low=0.0)
        if self.kd_weight + self.hard_weight + self.feature_weight + self.attention_weight == 0:
            raise ValueError(
                "a teacher needs at least one of kd_weight, hard_weight, feature_weight, attention_weight > 0"
            )


TRAINABLE_TECHNIQUES = (
    "structured",
    "merge",
    "prune",
    "window_merge",
    "window_prune",
    "linear",
    "linformer",
    "window",
    "winkernel",
)


def trainable_options(options: tuple[str, ...]) -> list[Any]:
    """Parse ``-O`` strings for training, refusing techniques that leave no trainable float model.

    Raises:
        ValueError: a malformed option, or one that is not in :data:`TRAINABLE_TECHNIQUES`.
    """
    from vitedge.api import config_name
    from vitedge.options import parse_options

    configs = parse_options(list(options))
    for text, config in zip(options, configs, strict=True):
        name = config_name(config)
        if name not in TRAINABLE_TECHNIQUES:
            raise ValueError(
                f"-O {text}: training accepts only {', '.join(TRAINABLE_TECHNIQUES)}; apply {name} to the "
                "trained model afterwards (vitedge optimize DIR -O ...)"
            )
    return configs


def distill_config(
    teacher: str | None,
    *,
    hard: bool = False,
    temperature: float = 4.0,
    weights: dict[str, float | None] | None = None,
) -> DistillConfig | None:
    """The DistillConfig the command-line options ask for (None without a teacher).

    ``hard`` picks DeiT's weights (CE 0.5, hard 0.5, KD 0) as defaults, otherwise CE 1 and KD 1; entries of
    ``weights`` (``ce``, ``kd``, ``hard``, ``feature``, ``attention``) that are not None override them.
    """
    given = {k: v for k, v in (weights or {}).items() if v is not None}
    if teacher is None:
        if hard or given:
            raise ValueError("distillation options need --teacher MODEL")
        return None
    unknown = set(given) - {"ce", "kd", "hard", "feature", "attention"}
    if unknown:
        raise ValueError(f"unknown distillation weights {sorted(unknown)}")
    base = {"ce": 0.5, "kd": 0.0, "hard": 0.5} if hard else {"ce": 1.0, "kd": 1.0, "hard": 0.0}
    w = {"feature": 0.0, "attention": 0.0, **base, **given}
    return DistillConfig(
        teacher=teacher,
        temperature=temperature,
        ce_weight=w["ce"],
        kd_weight=w["kd"],
        hard_weight=w["hard"],
        feature_weight=w["feature"],
        attention_weight=w["attention"],
    )


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """One training run.

    Attributes:
        model: the model to train: ``cifar-resnet``, ``cifar-vit``, ``cifar-swin`` or ``timm:<name>``.
        data: ``cifar10`` (the 50,000/10,000 tarballs) or a folder of ``<class>/<image>`` files (with
            ``train/`` and ``val/`` or ``test/`` sub-folders it evaluates on the latter).
        epochs: passes over the training images (the schedule's length).
        batch_size: images per step (the last partial batch of an epoch is dropped).
        lr: peak learning rate after warm-up.
        weight_decay: decoupled (AdamW) or L2 (SGD) decay on weight matrices and kernels.
        optimizer: ``adamw`` or ``sgd`` (Nesterov momentum ``momentum``).
        momentum: SGD momentum.
        warmup_epochs: linear warm-up length, then cosine decay to zero.
        label_smoothing: of the task cross-entropy.
        augment: ``none``, ``basic`` (random crop with 4-pixel reflect padding, horizontal flip),
            ``cutout`` (basic plus an 8x8 cutout) or ``trivial`` (basic plus one TrivialAugment op per image).
        mixup_alpha: Beta parameter of mixup; 0 disables it.
        cutmix_alpha: Beta parameter of cutmix; 0 disables it (with both, each step picks one).
        drop_path: stochastic depth override for transformer models (None: the architecture's own).
        bf16: bfloat16 autocast for the forward passes.
        seed: seeds the weights, the data order and every augmentation.
        distill: distillation from a teacher, or None.
        limit: train on the first ``limit`` images only (smoke runs, tests).
        eval_limit: evaluate on the first ``eval_limit`` test images only.
        eval_batch_size: images per evaluation forward.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        max_minutes: time budget of the whole run; after each epoch the number of epochs is refitted (never
            above ``epochs``) so the run ends within it, and the cosine schedule follows the new length.
        stop_after_minutes: stop cleanly with a checkpoint after this long (resume later); keeps the schedule.
        stop_after_steps: stop cleanly with a checkpoint after this many optimiser steps in total.
        checkpoint_every_steps: also checkpoint every this many steps (always after each epoch).
        log_every_steps: report progress every this many steps (each report waits for the device).
        out: the run folder for checkpoints and the final weights.
        init: start from these weights (a ``.safetensors`` file of the same architecture) instead of a random
            initialisation: fine-tuning, or recovering accuracy after compression.
        optimize: ``-O`` option strings applied to the student, in order, after ``init`` is loaded and before
            training: structured pruning is then recovered by the fine-tune, and token merging or pruning is
            active in every training and evaluation forward. Only techniques that leave the model trainable
            (``structured``, ``merge``, ``prune``) are accepted; quantise the result afterwards.
        train_only: train only the parameters whose name starts with this prefix (e.g. ``token_scorers``,
            the scorer MLPs of ``-O prune:scorer=learned``); the rest stay frozen. None trains everything.
    """

    model: str
    data: str = "cifar10"
    epochs: int = 30
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.05
    optimizer: str = "adamw"
    momentum: float = 0.9
    warmup_epochs: float = 3.0
    label_smoothing: float = 0.1
    augment: str = "trivial"
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    drop_path: float | None = None
    bf16: bool = True
    seed: int = 0
    distill: DistillConfig | None = None
    limit: int | None = None
    eval_limit: int | None = None
    eval_batch_size: int = 1000
    device: str = "auto"
    max_minutes: float | None = None
    stop_after_minutes: float | None = None
    stop_after_steps: int | None = None
    checkpoint_every_steps: int | None = None
    log_every_steps: int = 20
    out: str = "runs/train"
    init: str | None = None
    optimize: tuple[str, ...] = ()
    train_only: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a model id such as 'cifar-vit', got {self.model!r}")
        if not isinstance(self.data, str) or not self.data:
            raise ValueError(f"data must be 'cifar10' or a folder, got {self.data!r}")
        _integer("epochs", self.epochs, low=1)
        _integer("batch_size", self.batch_size, low=1)
        _number("lr", self.lr, low=0.0, low_open=True)
        _number("weight_decay", self.weight_decay, low=0.0)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        _number("momentum", self.momentum, low=0.0, high=1.0, low_open=False)
        _number("warmup_epochs", self.warmup_epochs, low=0.0)
        _number("label_smoothing", self.label_smoothing, low=0.0, high=0.99)
        if self.augment not in AUGMENT_POLICIES:
            raise ValueError(f"augment must be one of {', '.join(AUGMENT_POLICIES)}, got {self.augment!r}")
        _number("mixup_alpha", self.mixup_alpha, low=0.0)
        _number("cutmix_alpha", self.cutmix_alpha, low=0.0)
        if self.drop_path is not None:
            _number("drop_path", self.drop_path, low=0.0, high=0.99)
        _integer("seed", self.seed, low=0)
        if self.distill is not None and not isinstance(self.distill, DistillConfig):
            raise TypeError(f"distill must be a DistillConfig or None, got {type(self.distill).__name__}")
        _integer("limit", self.limit, low=1, optional=True)
        _integer("eval_limit", self.eval_limit, low=1, optional=True)
        _integer("eval_batch_size", self.eval_batch_size, low=1)
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        for name in ("max_minutes", "stop_after_minutes"):
            value = getattr(self, name)
            if value is not None:
                _number(name, value, low=0.0, low_open=True)
        _integer("stop_after_steps", self.stop_after_steps, low=1, optional=True)
        _integer("checkpoint_every_steps", self.checkpoint_every_steps, low=1, optional=True)
        _integer("log_every_steps", self.log_every_steps, low=1)
        if not isinstance(self.out, str) or not self.out:
            raise ValueError(f"out must be a folder path, got {self.out!r}")
        if isinstance(self.optimize, list):
            object.__setattr__(self, "optimize", tuple(self.optimize))
        if not isinstance(self.optimize, tuple) or not all(isinstance(o, str) and o for o in self.optimize):
            raise ValueError(f"optimize must be a list of -O option strings, got {self.optimize!r}")
        if self.optimize:
            trainable_options(self.optimize)
        if self.train_only is not None and (not isinstance(self.train_only, str) or not self.train_only):
            raise ValueError(
                f"train_only must be a parameter-name prefix such as 'token_scorers', got {self.train_only!r}"
            )

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> TrainConfig:
        """Inverse of :meth:`to_json` (unknown keys are an error, so a stale checkpoint is noticed)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(obj) - fields
        if unknown:
            raise ValueError(f"training config has unknown keys {sorted(unknown)}")
        distill = obj.get("distill")
        return cls(
            **{
                **obj,
                "distill": DistillConfig(**distill) if distill is not None else None,
                "optimize": tuple(obj.get("optimize", ())),
            }
        )
