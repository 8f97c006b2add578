"""Student and teacher forward passes for training, through the Encoder view only.

:class:`Distillation` holds the frozen teacher, the learned map from student to teacher feature width (feature
distillation) and forward hooks on the last attention modules (attention distillation), and turns images
into :class:`~vitedge.train.losses.StudentOutputs` / :class:`~vitedge.train.losses.TeacherOutputs`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vitedge.models.base import AttentionView, Encoder
from vitedge.train.config import DistillConfig
from vitedge.train.losses import StudentOutputs, TeacherOutputs


def attention_map(view: AttentionView, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of one attention module on its input x (B, N, D) -> (B, N, N)."""
    b, n, _ = x.shape
    h, d = view.num_heads, view.head_dim
    if view.qkv is not None:
        qkv = view.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4)  # (3, B, H, N, d)
        q, k = qkv[0], qkv[1]
    elif view.q is not None and view.k is not None:
        q = view.q(x).reshape(b, n, h, d).transpose(1, 2)
        k = view.k(x).reshape(b, n, h, d).transpose(1, 2)
    else:
        raise ValueError("attention distillation needs q/k projections")
    q = getattr(view.module, "q_norm", nn.Identity())(q)
    k = getattr(view.module, "k_norm", nn.Identity())(k)
    scores = (q.float() @ k.float().transpose(-2, -1)) * view.scale  # (B, H, N, N)
    return scores.softmax(dim=-1).mean(dim=1)


class _InputTap:
    """Keeps the latest input of a module (a forward pre-hook)."""

    def __init__(self, module: nn.Module) -> None:
        self.value: torch.Tensor | None = None
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, _module: nn.Module, args: tuple[Any, ...]) -> None:
        self.value = args[0]

    def take(self) -> torch.Tensor:
        if self.value is None:
            raise RuntimeError("the attention module did not run")
        value, self.value = self.value, None
        return value


def _last_global_attention(enc: Encoder, role: str) -> AttentionView:
    blocks = enc.blocks
    if not blocks:
        raise ValueError(
            f"attention distillation needs a transformer {role}; {enc.model_id} has no attention blocks"
        )
    if blocks[-1].window is not None:
        raise ValueError(
            f"attention distillation needs global attention; the {role} {enc.model_id} uses windows"
        )
    return blocks[-1].attn


class Normalizer:
    """Images in [0, 1] -> one encoder's input: resized to its size, normalised, channels-last for CNNs.

    The mean/std live on the device once, so a training step copies nothing from the host (a host-to-device
    copy would wait for the GPU to drain).
    """

    def __init__(self, enc: Encoder, device: torch.device, *, channels_last: bool) -> None:
        self.size = enc.img_size
        self.mean = torch.tensor(enc.preprocess.mean, device=device)[:, None, None]
        self.std = torch.tensor(enc.preprocess.std, device=device)[:, None, None]
        self.channels_last = channels_last and enc.info.family == "cnn"

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) in [0, 1]
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        x = (x - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def _patch_tokens(enc: Encoder, feats: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, N - prefix, D)
    return feats[:, enc.layout.num_prefix :] if feats.shape[1] > enc.layout.num_patches else feats


class Distillation:
    """The student's training forward, and the teacher's when there is one.

    Args:
        student: the model being trained (train mode).
        teacher: the frozen teacher (eval mode, no gradients) or None.
        config: the distillation settings (None without a teacher).
        channels_last: feed convolutional models (family ``cnn``) channels-last tensors (faster on GPUs).
    """

    def __init__(
        self, student: Encoder, teacher: Encoder | None, config: DistillConfig | None, *, channels_last: bool
    ) -> None:
        if (teacher is None) != (config is None):
            raise ValueError("a teacher and its DistillConfig come together")
        self.student = student
        self.teacher = teacher
        self.config = config
        self.channels_last = channels_last
        self.projector: nn.Linear | None = None
        self._taps: tuple[_InputTap, _InputTap] | None = None
        self._views: tuple[AttentionView, AttentionView] | None = None
        self.distilled_head = False
        device = next(student.parameters()).device
        self.student_input = Normalizer(student, device, channels_last=channels_last)
        self.teacher_input = Normalizer(teacher, device, channels_last=channels_last) if teacher else None
        if teacher is None or config is None:
            return
        if config.kd_weight > 0 or config.hard_weight > 0:
            self.distilled_head = student.set_distilled_training(True)
        if config.attention_weight > 0:
            views = (_last_global_attention(student, "student"), _last_global_attention(teacher, "teacher"))
            self._views = views
            self._taps = (_InputTap(views[0].module), _InputTap(views[1].module))
        if config.feature_weight > 0:
            s_dim, t_dim = self._probe_widths()
            self.projector = nn.Linear(s_dim, t_dim)

    def _probe_widths(self) -> tuple[int, int]:
        assert self.teacher is not None
        device = next(self.student.parameters()).device
        was_training = self.student.training
        self.student.eval()  # no batch-norm statistics updates, no stochastic depth draws
        with torch.no_grad():
            s = self.student.forward_features(self.student.example_input(2).to(device))
            t = self.teacher.forward_features(self.teacher.example_input(2).to(device))
        self.student.train(was_training)
        if self._taps is not None:
            self._taps[0].value = self._taps[1].value = None
        return int(s.shape[-1]), int(t.shape[-1])

    def parameters(self) -> list[nn.Parameter]:
        """Trainable parameters besides the student's (the feature map)."""
        return list(self.projector.parameters()) if self.projector is not None else []

    def student_outputs(self, x: torch.Tensor) -> StudentOutputs:
        """x: (B, C, H, W) in [0, 1]."""
        enc = self.student
        feats = enc.forward_features(self.student_input(x))
        out = enc.forward_head(feats)
        logits, dist = (out[0], out[1]) if isinstance(out, tuple) else (out, None)
        features = self.projector(_patch_tokens(enc, feats)) if self.projector is not None else None
        attention = None
        if self._taps is not None and self._views is not None:
            attention = attention_map(self._views[0], self._taps[0].take())
        return StudentOutputs(logits=logits, dist_logits=dist, features=features, attention=attention)

    @torch.no_grad()
    def teacher_outputs(self, x: torch.Tensor) -> TeacherOutputs | None:
        """x: (B, C, H, W) in [0, 1]; None without a teacher."""
        if self.teacher is None or self.teacher_input is None:
            return None
        enc = self.teacher
        feats = enc.forward_features(self.teacher_input(x))
        logits = enc.forward_head(feats)
        features = _patch_tokens(enc, feats) if self.projector is not None else None
        attention = None
        if self._taps is not None and self._views is not None:
            attention = attention_map(self._views[1], self._taps[1].take())
        return TeacherOutputs(logits=logits, features=features, attention=attention)

    def close(self) -> None:
        if self._taps is not None:
            for tap in self._taps:
                tap.handle.remove()
        self.student.set_distilled_training(False)
