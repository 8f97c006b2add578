"""Batched data augmentation on whatever device holds the images, driven by an explicit random plan.

All randomness of an epoch is drawn up front by :func:`plan_epoch` from a CPU ``torch.Generator`` seeded by
(seed, epoch): the data order, per-image crop offsets, flips, TrivialAugment op and magnitude, cutout
centres, and per-step mixup/cutmix parameters. The ops themselves are pure tensor functions with no
randomness and no host synchronisation, so an epoch (or a resumed half epoch) is reproduced exactly on
CPU, and the GPU never waits for the host.

Images are float ``(B, C, H, W)`` in [0, 1] throughout; each model normalises them with its own mean/std.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.nn.functional as F

PAD = 4  # reflect padding of the random crop
CUTOUT_SIZE = 8
# TrivialAugment ops (one per image, uniform); magnitudes scale with a uniform m in [0, 1].
TRIVIAL_OPS = (
    "identity",
    "brightness",
    "color",
    "contrast",
    "sharpness",
    "posterize",
    "solarize",
    "autocontrast",
    "rotate",
    "shear_x",
    "shear_y",
    "translate_x",
    "translate_y",
)
_OP = {name: i for i, name in enumerate(TRIVIAL_OPS)}
MAX_BLEND = 0.9  # enhance factors in 1 +- 0.9 m
MAX_ROTATE_DEG = 30.0
MAX_SHEAR = 0.3
MAX_TRANSLATE = 0.3  # fraction of the image side
GEOMETRIC_FILL = 0.5


@dataclass(frozen=True)
class EpochPlan:
    """One epoch's random choices. Per-image tensors are indexed by position in the epoch order."""

    order: torch.Tensor  # (N,) int64: image indices in visiting order
    crop: torch.Tensor  # (N, 2) int64: crop offsets (dy, dx) in [0, 2 * PAD]
    flip: torch.Tensor  # (N,) bool
    op: torch.Tensor  # (N,) int64 into TRIVIAL_OPS
    magnitude: torch.Tensor  # (N,) float32 in [0, 1], signed for the symmetric ops
    cutout: torch.Tensor  # (N, 2) int64: cutout centres (cy, cx)
    mix_kind: torch.Tensor  # (S,) int64: 0 none, 1 mixup, 2 cutmix
    mix_lam: torch.Tensor  # (S,) float32: weight of the original image in the mix
    mix_box: torch.Tensor  # (S, 4) int64: cutmix box (y0, y1, x0, x1)

    def to(self, device: torch.device | str) -> EpochPlan:
        return EpochPlan(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})


def epoch_seed(seed: int, epoch: int) -> int:
    return seed * 1_000_003 + epoch


def plan_epoch(
    n: int,
    steps: int,
    *,
    img_size: tuple[int, int],
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    generator: torch.Generator,
) -> EpochPlan:
    """Draw every random choice of one epoch of ``n`` images in ``steps`` steps (on CPU)."""
    g = generator
    h, w = img_size
    order = torch.randperm(n, generator=g)
    crop = torch.randint(0, 2 * PAD + 1, (n, 2), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    op = torch.randint(0, len(TRIVIAL_OPS), (n,), generator=g)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    magnitude = torch.rand(n, generator=g) * sign
    cutout = torch.stack([torch.randint(0, h, (n,), generator=g), torch.randint(0, w, (n,), generator=g)], 1)
    # Beta draws come from numpy, seeded from the torch generator so the plan stays a function of it.
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g)))
    kinds = [k for k, a in ((1, mixup_alpha), (2, cutmix_alpha)) if a > 0]
    mix_kind = np.zeros(steps, dtype=np.int64)
    mix_lam = np.ones(steps, dtype=np.float32)
    mix_box = np.zeros((steps, 4), dtype=np.int64)
    for s in range(steps if kinds else 0):
        kind = kinds[int(rng.integers(len(kinds)))]
        alpha = mixup_alpha if kind == 1 else cutmix_alpha
        lam = float(rng.beta(alpha, alpha))
        if kind == 2:
            cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
            cy, cx = int(rng.integers(h)), int(rng.integers(w))
            y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, h)
            x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, w)
            mix_box[s] = (y0, y1, x0, x1)
            lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
        mix_kind[s], mix_lam[s] = kind, lam
    return EpochPlan(
        order=order,
        crop=crop,
        flip=flip,
        op=op,
        magnitude=magnitude.float(),
        cutout=cutout,
        mix_kind=torch.from_numpy(mix_kind),
        mix_lam=torch.from_numpy(mix_lam),
        mix_box=torch.from_numpy(mix_box),
    )


def to_unit(x: torch.Tensor) -> torch.Tensor:  # uint8 (B, C, H, W) -> float32 in [0, 1]
    return x.to(torch.float32).div_(255.0)


def crop_flip(x: torch.Tensor, crop: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Random crop with reflect padding, then horizontal flip, each image its own offsets.

    x: (B, C, H, W); crop: (B, 2) offsets in [0, 2 * PAD]; flip: (B,) bool.
    """
    b, c, h, w = x.shape
    xp = F.pad(x, (PAD, PAD, PAD, PAD), mode="reflect")  # (B, C, H + 2P, W + 2P)
    rows = crop[:, 0, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = crop[:, 1, None] + torch.arange(w, device=x.device)  # (B, W)
    x = xp.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * PAD))
    x = x.gather(3, cols[:, None, None, :].expand(b, c, h, w))
    return torch.where(flip[:, None, None, None], x.flip(3), x)


def cutout(
    x: torch.Tensor, centre: torch.Tensor, fill: torch.Tensor, size: int = CUTOUT_SIZE
) -> torch.Tensor:
    """Fill a ``size`` square around each image's centre (clipped at the border) with ``fill`` (C,)."""
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)[None, :] - centre[:, 0, None]  # (B, H)
    cols = torch.arange(w, device=x.device)[None, :] - centre[:, 1, None]  # (B, W)
    half = size // 2
    inside = ((rows >= -half) & (rows < size - half))[:, :, None] & ((cols >= -half) & (cols < size - half))[
        :, None, :
    ]
    return torch.where(inside[:, None], fill[None, :, None, None], x)


def _gray(x: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, 1, H, W)
    if x.shape[1] == 1:
        return x
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)


def _blurred(x: torch.Tensor) -> torch.Tensor:
    """PIL's SMOOTH kernel as used by ImageEnhance.Sharpness (border pixels kept)."""
    c = x.shape[1]
    k = torch.ones(c, 1, 3, 3, device=x.device, dtype=x.dtype)  # built on the device: no host copy
    k[:, :, 1, 1] = 5.0
    blur = F.conv2d(x, k / 13.0, padding=1, groups=c)
    border = torch.ones_like(x[:1, :1], dtype=torch.bool)
    border[..., 1:-1, 1:-1] = False
    return torch.where(border, x, blur)


def _affine(x: torch.Tensor, op: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Rotate / shear / translate each image by its own amount (identity for other ops), filling grey."""
    b = x.shape[0]
    angle = torch.where(op == _OP["rotate"], m * math.radians(MAX_ROTATE_DEG), torch.zeros_like(m))
    cos, sin = torch.cos(angle), torch.sin(angle)
    zero = torch.zeros_like(m)
    shear_x = torch.where(op == _OP["shear_x"], m * MAX_SHEAR, zero)
    shear_y = torch.where(op == _OP["shear_y"], m * MAX_SHEAR, zero)
    tx = torch.where(op == _OP["translate_x"], m * 2 * MAX_TRANSLATE, zero)  # normalised coordinates span 2
    ty = torch.where(op == _OP["translate_y"], m * 2 * MAX_TRANSLATE, zero)
    theta = torch.stack(
        [torch.stack([cos, -sin + shear_x, tx], 1), torch.stack([sin + shear_y, cos, ty], 1)], 1
    )  # (B, 2, 3)
    grid = F.affine_grid(theta.to(x.dtype), [b, *x.shape[1:]], align_corners=False)
    out = F.grid_sample(x - GEOMETRIC_FILL, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out + GEOMETRIC_FILL


def trivial_augment(x: torch.Tensor, op: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
    """Apply one TrivialAugment op per image: x (B, C, H, W) in [0, 1], op (B,) int64, magnitude (B,) signed.

    Every op is computed for the whole batch and selected per image with ``torch.where``: a few cheap
    element-wise passes, no data-dependent shapes, no host synchronisation.
    """
    sel = op[:, None, None, None]
    m = magnitude[:, None, None, None]
    factor = 1.0 + MAX_BLEND * m
    gray = _gray(x)
    degenerate = torch.zeros_like(x)
    degenerate = torch.where(sel == _OP["color"], gray.expand_as(x), degenerate)
    degenerate = torch.where(
        sel == _OP["contrast"], gray.mean(dim=(2, 3), keepdim=True).expand_as(x), degenerate
    )
    degenerate = torch.where(sel == _OP["sharpness"], _blurred(x), degenerate)
    blended = (degenerate + factor * (x - degenerate)).clamp_(0.0, 1.0)
    is_blend = (sel >= _OP["brightness"]) & (sel <= _OP["sharpness"])
    out = torch.where(is_blend, blended, x)
    # posterize: keep 8 - round(4 |m|) bits
    step = torch.exp2(torch.round(4 * m.abs()))
    levels = torch.round(x * 255.0)
    out = torch.where(sel == _OP["posterize"], torch.floor(levels / step) * step / 255.0, out)
    out = torch.where((sel == _OP["solarize"]) & (x >= 1.0 - m.abs()), 1.0 - x, out)
    lo, hi = x.amin(dim=(2, 3), keepdim=True), x.amax(dim=(2, 3), keepdim=True)
    stretched = torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    out = torch.where(sel == _OP["autocontrast"], stretched, out)
    is_geometric = sel >= _OP["rotate"]
    return torch.where(is_geometric, _affine(x, op, magnitude).clamp_(0.0, 1.0), out)


def mix(x: torch.Tensor, kind: torch.Tensor, lam: torch.Tensor, box: torch.Tensor) -> torch.Tensor:
    """Mixup or cutmix each image with its partner in the reversed batch (``x.flip(0)``).

    x: (B, C, H, W); kind: () 0 none / 1 mixup / 2 cutmix; lam: () weight of the original; box: (4,).
    """
    partner = x.flip(0)
    _, _, h, w = x.shape
    rows = torch.arange(h, device=x.device)
    cols = torch.arange(w, device=x.device)
    in_box = ((rows >= box[0]) & (rows < box[1]))[:, None] & ((cols >= box[2]) & (cols < box[3]))[None, :]
    mixed = torch.where(kind == 1, lam * x + (1 - lam) * partner, x)
    return torch.where((kind == 2) & in_box, partner, mixed)


@dataclass(frozen=True)
class AugmentedBatch:
    x: torch.Tensor  # (B, C, H, W) float32 in [0, 1]
    y: torch.Tensor  # (B,) int64
    y_mix: torch.Tensor | None  # (B,) int64 partner labels when mixing, else None
    lam: torch.Tensor | None  # () weight of ``y`` when mixing


def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    plan: EpochPlan,
    step: int,
    *,
    batch_size: int,
    policy: str,
    fill: torch.Tensor,
    mixing: bool,
) -> AugmentedBatch:
    """The ``step``-th batch of an epoch: gather images by the plan's order, then augment them.

    Args:
        images: uint8 (N, C, H, W) on the training device; labels: int64 (N,).
        plan: the epoch's plan (on the same device).
        step: the batch is ``plan.order[step * batch_size : (step + 1) * batch_size]``.
        batch_size: images per step.
        policy: ``none``, ``basic``, ``cutout`` or ``trivial``.
        fill: (C,) cutout fill in [0, 1] (the data mean, which normalises to zero).
        mixing: apply the plan's mixup/cutmix.
    """
    sl = slice(step * batch_size, (step + 1) * batch_size)
    idx = plan.order[sl]
    x = to_unit(images[idx])
    y = labels[idx]
    if policy != "none":
        x = crop_flip(x, plan.crop[sl], plan.flip[sl])
    if policy == "trivial":
        x = trivial_augment(x, plan.op[sl], plan.magnitude[sl])
    if policy == "cutout":
        x = cutout(x, plan.cutout[sl], fill)
    if not mixing:
        return AugmentedBatch(x=x, y=y, y_mix=None, lam=None)
    x = mix(x, plan.mix_kind[step], plan.mix_lam[step], plan.mix_box[step])
    return AugmentedBatch(x=x, y=y, y_mix=y.flip(0), lam=plan.mix_lam[step])
