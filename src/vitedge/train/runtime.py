"""Device placement, the optimiser and on-device evaluation for the training loop."""

from __future__ import annotations

import torch
from torch import nn

from vitedge.models import Encoder
from vitedge.train.augment import to_unit
from vitedge.train.config import TrainConfig
from vitedge.train.distill import Normalizer

_NO_DECAY = ("pos_embed", "cls_token", "dist_token", "relative_position_bias_table")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA device")
    return torch.device(name)


def inner_network(enc: Encoder) -> nn.Module:
    inner = getattr(enc, "model", None)
    if not isinstance(inner, nn.Module):
        raise TypeError(f"{enc.model_id} has no inner network to save")
    return inner


def to_device(enc: Encoder, device: torch.device, *, channels_last: bool) -> Encoder:
    enc = enc.to(device)
    return enc.to(memory_format=torch.channels_last) if channels_last else enc


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_optimizer(
    named: list[tuple[str, nn.Parameter]], config: TrainConfig, device: torch.device
) -> torch.optim.Optimizer:
    """AdamW or Nesterov SGD; no weight decay on biases, norms, tokens and position tables."""
    decay = [p for n, p in named if p.ndim >= 2 and not any(k in n for k in _NO_DECAY)]
    rest = [p for n, p in named if not (p.ndim >= 2 and not any(k in n for k in _NO_DECAY))]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if config.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999), fused=device.type == "cuda" or None)


@torch.no_grad()
def evaluate_top(
    enc: Encoder,
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    batch_size: int,
    bf16: bool,
    channels_last: bool,
) -> tuple[float, float]:
    """Top-1 and top-5 accuracy of ``enc`` on uint8 images (N, C, H, W) held on its device."""
    was_training = enc.training
    enc.eval()
    device = images.device
    normalizer = Normalizer(enc, device, channels_last=channels_last)
    correct1 = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(images), batch_size):
            x = normalizer(to_unit(images[start : start + batch_size]))
            y = labels[start : start + batch_size]
            top = enc(x).topk(min(5, enc.info.num_classes), dim=1).indices  # (B, 5)
            correct1 += (top[:, 0] == y).sum()
            correct5 += (top == y[:, None]).any(dim=1).sum()
    enc.train(was_training)
    n = max(len(images), 1)
    return int(correct1) / n, int(correct5) / n
