"""Distillation losses: each configured term present, positive and weighted into the total; others absent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from vitedge.models.cifar import build_project_model
from vitedge.train import DistillConfig
from vitedge.train.distill import Distillation
from vitedge.train.losses import (
    StudentOutputs,
    Targets,
    TeacherOutputs,
    attention_loss,
    feature_loss,
    kd_loss,
    training_losses,
)

ALL_TERMS = {"ce", "kd", "hard_distill", "feature", "attention"}


def _outputs(seed: int = 0) -> tuple[StudentOutputs, TeacherOutputs, Targets]:
    g = torch.Generator().manual_seed(seed)
    attn_s = torch.rand(4, 16, 16, generator=g).softmax(-1)
    attn_t = torch.rand(4, 16, 16, generator=g).softmax(-1)
    student = StudentOutputs(
        logits=torch.randn(4, 10, generator=g),
        dist_logits=torch.randn(4, 10, generator=g),
        features=torch.randn(4, 64, 8, generator=g),
        attention=attn_s,
    )
    teacher = TeacherOutputs(
        logits=torch.randn(4, 10, generator=g), features=torch.randn(4, 16, 8, generator=g), attention=attn_t
    )
    return student, teacher, Targets(torch.tensor([1, 2, 3, 4]))


def test_plain_training_is_cross_entropy() -> None:
    student, _, targets = _outputs()
    terms = training_losses(student, targets, smoothing=0.1)
    assert set(terms) == {"ce", "total"}
    torch.testing.assert_close(
        terms["total"], F.cross_entropy(student.logits, targets.y, label_smoothing=0.1)
    )


@pytest.mark.parametrize(
    "weights",
    [
        {"kd": 1.0},
        {"hard": 0.5, "ce": 0.5, "kd": 0.0},
        {"kd": 0.5, "feature": 2.0},
        {"kd": 0.0, "attention": 3.0},
        {"kd": 1.0, "hard": 0.5, "feature": 0.1, "attention": 0.2},
        {"ce": 0.0, "kd": 1.0},
    ],
)
def test_configured_terms_only(weights: dict[str, float]) -> None:
    cfg = DistillConfig(
        teacher="t",
        ce_weight=weights.get("ce", 1.0),
        kd_weight=weights.get("kd", 0.0),
        hard_weight=weights.get("hard", 0.0),
        feature_weight=weights.get("feature", 0.0),
        attention_weight=weights.get("attention", 0.0),
    )
    student, teacher, targets = _outputs()
    terms = training_losses(student, targets, smoothing=0.0, distill=cfg, teacher=teacher)
    names = {"ce": cfg.ce_weight, "kd": cfg.kd_weight, "hard_distill": cfg.hard_weight}
    names.update(feature=cfg.feature_weight, attention=cfg.attention_weight)
    expected = {k for k, w in names.items() if w > 0}
    assert set(terms) - {"total"} == expected
    assert all(float(terms[k]) > 0 for k in expected)
    torch.testing.assert_close(terms["total"], sum(names[k] * terms[k] for k in expected))


def test_kd_and_hard_use_the_distillation_head() -> None:
    student, teacher, targets = _outputs()
    cfg = DistillConfig(teacher="t", kd_weight=1.0, hard_weight=1.0)
    terms = training_losses(student, targets, smoothing=0.0, distill=cfg, teacher=teacher)
    assert student.dist_logits is not None
    torch.testing.assert_close(terms["kd"], kd_loss(student.dist_logits, teacher.logits, 4.0))
    torch.testing.assert_close(
        terms["hard_distill"], F.cross_entropy(student.dist_logits, teacher.logits.argmax(1))
    )


def test_loss_zeros_and_scaling() -> None:
    logits = torch.randn(3, 10)
    assert float(kd_loss(logits, logits, 4.0)) == pytest.approx(0.0, abs=1e-6)
    # T^2 scaling keeps soft-target gradients comparable across temperatures
    assert float(kd_loss(logits, -logits, 8.0)) > float(kd_loss(logits, -logits, 8.0)) / 64 * 2
    feats = torch.randn(2, 16, 8)
    assert float(feature_loss(feats, feats)) == pytest.approx(0.0, abs=1e-6)
    attn = torch.rand(2, 5, 5).softmax(-1)
    assert float(attention_loss(attn, attn)) == 0.0
    with pytest.raises(ValueError, match="shape"):
        attention_loss(attn, attn[:, :4, :4])


def test_mixed_targets_weight_both_labels() -> None:
    logits = torch.randn(4, 10)
    y, y2 = torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0])
    terms = training_losses(StudentOutputs(logits=logits), Targets(y, y2, torch.tensor(0.7)), smoothing=0.0)
    torch.testing.assert_close(
        terms["ce"], 0.7 * F.cross_entropy(logits, y) + 0.3 * F.cross_entropy(logits, y2)
    )


def test_distillation_with_real_models_covers_every_term() -> None:
    """A DeiT student distilled from a ViT teacher with every term: all present, non-zero, with gradients."""
    torch.manual_seed(0)
    student, teacher = build_project_model("cifar-vit"), build_project_model("cifar-vit").eval()
    cfg = DistillConfig(
        teacher="cifar-vit",
        ce_weight=0.5,
        kd_weight=1.0,
        hard_weight=0.5,
        feature_weight=1.0,
        attention_weight=1.0,
    )
    d = Distillation(student, teacher, cfg, channels_last=False)
    x = torch.rand(4, 3, 32, 32)
    s_out, t_out = d.student_outputs(x), d.teacher_outputs(x)
    assert s_out.dist_logits is not None and s_out.attention is not None and s_out.features is not None
    assert s_out.attention.shape == (4, 66, 66) and s_out.features.shape == (4, 64, 192)
    terms = training_losses(s_out, Targets(torch.arange(4)), smoothing=0.1, distill=cfg, teacher=t_out)
    assert set(terms) == ALL_TERMS | {"total"}
    assert all(float(v.detach()) > 0 for v in terms.values())
    terms["total"].backward()
    assert d.projector is not None and d.projector.weight.grad is not None
    assert student.model.blocks[-1].attn.qkv.weight.grad.abs().sum() > 0
    d.close()


def test_attention_distillation_needs_attention_blocks() -> None:
    cfg = DistillConfig(teacher="cifar-resnet", kd_weight=0.0, attention_weight=1.0)
    with pytest.raises(ValueError, match="no attention blocks"):
        Distillation(
            build_project_model("cifar-vit"),
            build_project_model("cifar-resnet").eval(),
            cfg,
            channels_last=False,
        )
    cfg = DistillConfig(teacher="cifar-vit", kd_weight=0.0, attention_weight=1.0)
    with pytest.raises(ValueError, match="windows"):
        Distillation(
            build_project_model("cifar-swin"),
            build_project_model("cifar-vit").eval(),
            cfg,
            channels_last=False,
        )


def test_feature_distillation_from_a_cnn_teacher() -> None:
    torch.manual_seed(0)
    student, teacher = build_project_model("cifar-swin"), build_project_model("cifar-resnet").eval()
    cfg = DistillConfig(teacher="cifar-resnet", kd_weight=1.0, feature_weight=1.0)
    d = Distillation(student, teacher, cfg, channels_last=False)
    running = teacher.model.stem[1].running_mean.clone()
    x = torch.rand(2, 3, 32, 32)
    s_out, t_out = d.student_outputs(x), d.teacher_outputs(x)
    assert s_out.features is not None and t_out is not None and t_out.features is not None
    assert s_out.features.shape == (2, 16, 384) and t_out.features.shape == (2, 16, 384)
    terms = training_losses(s_out, Targets(torch.tensor([0, 1])), smoothing=0.0, distill=cfg, teacher=t_out)
    assert set(terms) == {"ce", "kd", "feature", "total"}
    assert torch.equal(teacher.model.stem[1].running_mean, running)  # the teacher stays frozen
