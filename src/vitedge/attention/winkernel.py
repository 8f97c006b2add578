"""A kernel for Swin's small windows, ``-O winkernel[:kernel=auto|bmm|sdpa]``.

timm's Swin blocks call fused SDPA once for all windows with a (windows, N, N) additive mask: the
relative-position bias plus, in shifted blocks, the mask that keeps rolled-in regions apart. On CPU that
kernel tiles for long sequences, and its per-tile work dominates windows of 16-49 tokens; it also gets the
bias as a materialised (B * windows, H, N, N) tensor. This step runs each block itself (the same norm,
shift, padding, partition, projections and MLP as timm's block, from the block's own modules) and computes
window attention as two batched products, adding the relative-position bias and the shift mask by
broadcasting over a (B, windows, H, N, N) view of the scores, never copied per image. Short rows use the
written-out softmax of :func:`vitedge.attention.batched.softmax_rows`.

``kernel=auto`` (default) takes the two products for windows of at most
:data:`vitedge.attention.batched.BMM_MAX_TOKENS` tokens (where they were measured faster) and fused SDPA
for longer ones; ``bmm`` and ``sdpa`` force one (``sdpa`` reproduces timm's computation through this path,
the reference the kernel is tested against).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vitedge.api import Composition, register
from vitedge.attention.batched import BMM_MAX_TOKENS, softmax_rows
from vitedge.models.base import Encoder, Trace
from vitedge.plan import PlanBuilder
from vitedge.plan.sequence import split_heads
from vitedge.tokens.windows import check_swin, shifted_windows, unshifted_windows

KERNELS = ("auto", "bmm", "sdpa")


@dataclass(frozen=True, kw_only=True)
class WinKernelConfig:
    """``kernel`` for window attention: ``auto`` (two products up to BMM_MAX_TOKENS tokens per window),
    ``bmm`` or ``sdpa``."""

    kernel: str = "auto"

    def __post_init__(self) -> None:
        if self.kernel not in KERNELS:
            raise ValueError(f"winkernel:kernel must be one of {', '.join(KERNELS)}, got {self.kernel!r}")


def window_bmm_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_bias: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
    images: int,
) -> torch.Tensor:
    """q, k, v: (B*nW, H, N, d); rel_bias (1, H, N, N); mask (nW, N, N) or None -> (B*nW, H, N, d)."""
    bw, h, n, d = q.shape
    nw = bw // images
    scores = torch.bmm(q.reshape(bw * h, n, d), k.reshape(bw * h, n, d).transpose(1, 2))  # (BnW*H, N, N)
    s = scores.view(images, nw, h, n, n).mul_(scale).add_(rel_bias.to(scores.dtype)[None])
    if mask is not None:
        s = s.add_(mask.to(scores.dtype)[None, :, None])
    p = softmax_rows(s.float() if s.dtype != torch.float32 else s).to(v.dtype)
    return torch.bmm(p.view(bw * h, n, n), v.reshape(bw * h, n, d)).view(bw, h, n, d)


def swin_block(parts: Any, x: torch.Tensor, kernel: str) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
    """One Swin block (every window) with window attention by ``kernel`` (``bmm`` or ``sdpa``)."""
    b, h, w, c = x.shape
    windows = shifted_windows(parts, x)  # (B, nW, N, C)
    n_win, n = windows.shape[1], windows.shape[2]
    q, k, v = split_heads(parts.attn, windows.reshape(b * n_win, n, c))  # (B*nW, H, N, d)
    if kernel == "bmm":
        out = window_bmm_attention(q, k, v, parts.rel_bias, parts.mask, parts.attn.scale, b)
    else:
        bias = parts.rel_bias.to(q.dtype)  # (1, H, N, N)
        if parts.mask is not None:
            bias = bias + parts.mask.to(q.dtype).repeat(b, 1, 1)[:, None]  # (B*nW, H, N, N)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.attn.scale)
    out = parts.attn.proj(out.transpose(1, 2).reshape(b * n_win, n, -1)).view(b, n_win, n, c)
    x = x + parts.drop1(unshifted_windows(parts, out, (h, w)))
    flat = x.reshape(b, h * w, c)
    flat = flat + parts.drop2(parts.mlp(parts.norm2(flat)))
    return flat.view(b, h, w, c)


def pick_kernel(kernel: str, window: tuple[int, int]) -> str:
    if kernel != "auto":
        return kernel
    return "bmm" if window[0] * window[1] <= BMM_MAX_TOKENS else "sdpa"


@dataclass(frozen=True, kw_only=True)
class WinKernelStep:
    """The window step of one Swin block: all windows, attention by ``kernel``."""

    kernel: str
    label: str

    @property
    def detail(self) -> str:
        return f"winkernel {self.kernel}"

    def run(self, encoder: Any, block: Any, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        _, h, w, _ = x.shape
        wh, ww = block.window_size
        hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
        return swin_block(encoder.block_parts(block, (hp, wp)), x, pick_kernel(self.kernel, (wh, ww)))

    def windows(self, windows: int) -> int:
        return windows

    def window_tokens(self, window: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        return window[0] * window[1], 0


def winkernel_steps(model: Encoder, config: WinKernelConfig, plan: PlanBuilder) -> None:
    step = WinKernelStep(kernel=config.kernel, label=plan.current)
    for i in range(plan.depth):
        plan.set_block(i, "window", step)


@register("winkernel", steps=winkernel_steps, compose=Composition(fills=frozenset({"window"})))
def _apply_winkernel(model: Encoder, config: WinKernelConfig) -> None:
    check_swin(
        model, "winkernel", "the default attention, which already takes two products for short sequences"
    )
