"""Training losses as pure functions, and their weighted sum for (distillation) training.

:func:`training_losses` returns a dict of the named, unweighted terms that the configuration switches on
(``ce`` unless distillation gives it weight 0; ``kd``, ``hard_distill``, ``feature``, ``attention`` with a
teacher and a weight > 0)
plus ``total``, their weighted sum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitedge.train.config import DistillConfig


@dataclass(frozen=True)
class StudentOutputs:
    logits: torch.Tensor  # (B, K) class head
    dist_logits: torch.Tensor | None = None  # (B, K) distillation head (DeiT), else None
    features: torch.Tensor | None = None  # (B, N, E) patch tokens mapped to the teacher's width
    attention: torch.Tensor | None = None  # (B, N, N) last block, averaged over heads


@dataclass(frozen=True)
class TeacherOutputs:
    logits: torch.Tensor  # (B, K)
    features: torch.Tensor | None = None  # (B, M, E) patch tokens
    attention: torch.Tensor | None = None  # (B, N, N)


@dataclass(frozen=True)
class Targets:
    y: torch.Tensor  # (B,) int64
    y_mix: torch.Tensor | None = None  # (B,) partner labels under mixup/cutmix
    lam: torch.Tensor | None = None  # () weight of y


def classification_loss(logits: torch.Tensor, targets: Targets, *, smoothing: float) -> torch.Tensor:
    """Cross-entropy with label smoothing; under mixing, the lam-weighted sum over both labels."""
    logits = logits.float()  # (B, K)
    ce = F.cross_entropy(logits, targets.y, label_smoothing=smoothing)
    if targets.y_mix is None or targets.lam is None:
        return ce
    other = F.cross_entropy(logits, targets.y_mix, label_smoothing=smoothing)
    return targets.lam * ce + (1 - targets.lam) * other


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's soft-target loss: ``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, batch mean.

    student, teacher: (B, K) logits.
    """
    t = temperature
    log_p = F.log_softmax(student.float() / t, dim=1)
    log_q = F.log_softmax(teacher.float() / t, dim=1)
    return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * (t * t)


def hard_distillation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """DeiT's hard distillation: cross-entropy against the teacher's top-1 class. (B, K) logits each."""
    return F.cross_entropy(student.float(), teacher.argmax(dim=1))


def _to_grid(tokens: torch.Tensor) -> torch.Tensor:  # (B, N, E) -> (B, E, s, s)
    b, n, e = tokens.shape
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"feature distillation needs a square token grid, got {n} tokens")
    return tokens.transpose(1, 2).reshape(b, e, side, side)


def feature_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between layer-normalised patch tokens, the student's grid average-pooled to the teacher's.

    student: (B, N, E) already mapped to the teacher's width E; teacher: (B, M, E); N and M square.
    """
    t_grid = _to_grid(teacher.float())
    s_grid = F.adaptive_avg_pool2d(_to_grid(student.float()), (t_grid.shape[-2], t_grid.shape[-1]))
    e = t_grid.shape[1]
    s = F.layer_norm(s_grid.flatten(2).transpose(1, 2), (e,))
    t = F.layer_norm(t_grid.flatten(2).transpose(1, 2), (e,))
    return F.mse_loss(s, t)


def attention_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """MSE between attention maps (B, N, N) (rows are probability distributions), scaled by N.

    Scaling by N makes the loss independent of sequence length for uniform attention rows.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"attention maps differ in shape: student {tuple(student.shape)}, teacher {tuple(teacher.shape)}"
        )
    return F.mse_loss(student.float(), teacher.float()) * student.shape[-1]


def training_losses(
    student: StudentOutputs,
    targets: Targets,
    *,
    smoothing: float,
    distill: DistillConfig | None = None,
    teacher: TeacherOutputs | None = None,
) -> dict[str, torch.Tensor]:
    """The configured loss terms (unweighted) and ``total``, their weighted sum.

    Without ``distill`` the total is the cross-entropy. With it, CE uses the class head and the KD and hard
    terms the distillation head when the student has one.

    Raises:
        ValueError: a configured term lacks the outputs it needs (e.g. no teacher features).
    """
    ce = classification_loss(student.logits, targets, smoothing=smoothing)
    if distill is None:
        return {"ce": ce, "total": ce}
    if teacher is None:
        raise ValueError("distillation needs the teacher's outputs")
    head = student.dist_logits if student.dist_logits is not None else student.logits
    terms: dict[str, torch.Tensor] = {}
    weights: dict[str, float] = {}
    if distill.ce_weight > 0:
        terms["ce"] = ce
        weights["ce"] = distill.ce_weight
    if distill.kd_weight > 0:
        terms["kd"] = kd_loss(head, teacher.logits, distill.temperature)
        weights["kd"] = distill.kd_weight
    if distill.hard_weight > 0:
        terms["hard_distill"] = hard_distillation_loss(head, teacher.logits)
        weights["hard_distill"] = distill.hard_weight
    if distill.feature_weight > 0:
        if student.features is None or teacher.features is None:
            raise ValueError("feature distillation needs student and teacher features")
        terms["feature"] = feature_loss(student.features, teacher.features)
        weights["feature"] = distill.feature_weight
    if distill.attention_weight > 0:
        if student.attention is None or teacher.attention is None:
            raise ValueError("attention distillation needs student and teacher attention maps")
        terms["attention"] = attention_loss(student.attention, teacher.attention)
        weights["attention"] = distill.attention_weight
    total = sum((weights[k] * v for k, v in terms.items()), start=torch.zeros((), device=head.device))
    return {**terms, "total": total}
