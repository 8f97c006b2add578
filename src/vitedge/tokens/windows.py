"""Token reduction for Swin that keeps the window structure: window pruning (``-O window_prune:keep=...``).

Merging tokens or dropping single tokens breaks Swin, whose attention needs full, aligned windows and whose
patch merging needs the whole grid. So the unit of reduction here is the *window*: in each block, the windows
of the (shifted) partition are ranked by how much they vary inside, and only the top ``keep`` fraction run
attention (with the relative-position bias and the shifted-window mask of exactly those windows) and the MLP.
The tokens of the other windows skip the block unchanged, as with token halting: the grid stays whole, patch
merging and later stages see every position, and a flat region (sky, wall, letterbox) simply stops being
refined early. The work shrinks for real: the selected windows are gathered into a smaller batch of windows,
and only their tokens go through the MLP.

Window score (Swin has no class token): ``variance`` (default) is the mean squared deviation of a window's
normalised tokens from their mean; ``norm`` is their mean L2 norm. Pruning applies in stages with at least
``min_windows`` windows; deeper stages, with one or a few windows, always run. In the execution plan every
block gets a :class:`WindowPruneStep`. Token pruning of single-sequence models is ``prune``
(:mod:`vitedge.tokens.prune`), whose scorers, schedules and fusing do not carry over to whole windows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from vitedge.api import Composition, register
from vitedge.models.base import Encoder, Trace
from vitedge.plan import PlanBuilder
from vitedge.plan.sequence import split_heads

SWIN_SCORERS = ("variance", "norm")


def check_swin(model: Encoder, name: str, sequence_option: str) -> None:
    """A ValueError unless ``model`` is a Swin encoder (``sequence_option``: what to use on other models)."""
    if model.info.family != "swin" or not hasattr(model, "block_parts"):
        raise ValueError(
            f"{name} works on the windows of Swin models; {model.model_id} is a {model.info.family} model "
            f"(use {sequence_option} there)"
        )


def window_partition(x: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, wh*ww, C) windows in row-major order (H, W multiples of the window)."""
    b, h, w, c = x.shape
    wh, ww = window
    x = x.view(b, h // wh, wh, w // ww, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (h // wh) * (w // ww), wh * ww, c)


def window_reverse(windows: torch.Tensor, window: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """(B, nW, wh*ww, C) -> (B, H, W, C), the inverse of :func:`window_partition`."""
    b, _, _, c = windows.shape
    (wh, ww), (h, w) = window, hw
    x = windows.view(b, h // wh, w // ww, wh, ww, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h, w, c)


def window_scores(windows: torch.Tensor, scorer: str) -> torch.Tensor:
    """(B, nW, N, C) -> (B, nW) importance of each window."""
    w = windows.float()
    if scorer == "norm":
        return w.norm(dim=-1).mean(-1)
    return (w - w.mean(2, keepdim=True)).pow(2).mean((2, 3))


def kept_windows(keep: float, windows: int, min_windows: int) -> int:
    if windows < min_windows:
        return windows
    return max(1, math.ceil(keep * windows))


def shifted_windows(parts: Any, x: torch.Tensor) -> torch.Tensor:
    """A Swin block's attention input: norm1, the cyclic shift, padding to whole windows, partition.
    x (B, H, W, C) -> (B, nW, wh*ww, C); :func:`unshifted_windows` is the way back."""
    _, h, w, _ = x.shape
    wh, ww = parts.window
    sh, sw = parts.shift
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    y = parts.norm1(x)
    if sh or sw:
        y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
    y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
    return window_partition(y, (wh, ww))


def unshifted_windows(parts: Any, windows: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """(B, nW, wh*ww, C) -> (B, H, W, C): reverse the partition, drop the padding, undo the shift."""
    (h, w), (wh, ww), (sh, sw) = hw, parts.window, parts.shift
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    t = window_reverse(windows, (wh, ww), (hp, wp))[:, :h, :w]
    return torch.roll(t, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else t


def pruned_swin_block(
    parts: Any, x: torch.Tensor, keep_windows: int, scorer: str
) -> torch.Tensor:  # x: (B, H, W, C) -> (B, H, W, C)
    """One Swin block computing only ``keep_windows`` windows per image; the others pass unchanged."""
    b, h, w, c = x.shape
    windows = shifted_windows(parts, x)  # (B, nW, N, C)
    n_win, n = windows.shape[1], windows.shape[2]
    idx = window_scores(windows, scorer).topk(keep_windows, dim=1).indices  # (B, k)
    sel = windows.gather(1, idx[..., None, None].expand(-1, -1, n, c)).reshape(b * keep_windows, n, c)
    q, k, v = split_heads(parts.attn, sel)  # (B*k, H, N, d)
    bias = parts.rel_bias.to(q.dtype)  # (1, H, N, N)
    if parts.mask is not None:
        mask = parts.mask.to(q.dtype)[idx.flatten()][:, None]  # (B*k, 1, N, N)
        bias = bias + mask
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.attn.scale)
    out = parts.attn.proj(out.transpose(1, 2).reshape(b * keep_windows, n, -1))
    full = windows.new_zeros(b, n_win, n, c)
    full.scatter_(1, idx[..., None, None].expand(-1, -1, n, c), out.view(b, keep_windows, n, c))
    active = torch.zeros(b, n_win, n, 1, dtype=torch.bool, device=x.device)
    active.scatter_(1, idx[..., None, None].expand(-1, -1, n, 1), True)

    x = x + parts.drop1(unshifted_windows(parts, full, (h, w)))
    mask = unshifted_windows(parts, active, (h, w))[..., 0]  # (B, H, W) tokens of computed windows
    flat = x.reshape(b, h * w, c)
    m = mask.reshape(b, h * w)
    delta = torch.zeros_like(flat)  # (B, H*W, C): the MLP branch, zero for skipped windows
    delta[m] = parts.mlp(parts.norm2(flat[m]))
    return (flat + parts.drop2(delta)).view(b, h, w, c)


@dataclass(frozen=True, kw_only=True)
class WindowPruneConfig:
    """``keep``: fraction of windows computed in each block (1.0 = off) of stages with at least
    ``min_windows`` windows; ``scorer`` ranks windows (:data:`SWIN_SCORERS`)."""

    keep: float = 1.0
    scorer: str = "variance"
    min_windows: int = 4

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"window_prune:keep must be in (0, 1], got {self.keep}")
        if self.scorer not in SWIN_SCORERS:
            raise ValueError(
                f"window_prune ranks whole windows; scorer must be one of {', '.join(SWIN_SCORERS)}, "
                f"got {self.scorer!r}"
            )
        if self.min_windows < 1:
            raise ValueError(f"window_prune:min_windows must be >= 1, got {self.min_windows}")


@dataclass(frozen=True, kw_only=True)
class WindowPruneStep:
    """The window step of one Swin block: compute only the top ``keep`` fraction of its windows."""

    keep: float
    scorer: str
    min_windows: int
    label: str
    kernel: str = "sdpa"  # the kept windows' attention

    @property
    def detail(self) -> str:
        return f"window_prune keep={self.keep:g} ({self.scorer})"

    def run(self, encoder: Any, block: Any, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        _, h, w, _ = x.shape
        wh, ww = block.window_size
        hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
        n_win = (hp // wh) * (wp // ww)
        k = self.windows(n_win)
        if k >= n_win:
            return block(x)
        return pruned_swin_block(encoder.block_parts(block, (hp, wp)), x, k, self.scorer)

    def windows(self, windows: int) -> int:
        return kept_windows(self.keep, windows, self.min_windows)

    def window_tokens(self, window: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        return window[0] * window[1], 0


def window_prune_steps(model: Encoder, config: WindowPruneConfig, plan: PlanBuilder) -> None:
    if config.keep >= 1.0:
        return  # neutral: the native blocks run untouched
    step = WindowPruneStep(
        keep=config.keep, scorer=config.scorer, min_windows=config.min_windows, label=plan.current
    )
    for i in range(plan.depth):
        plan.set_block(i, "window", step)


@register("window_prune", steps=window_prune_steps, compose=Composition(fills=frozenset({"window"})))
def _apply_window_prune(model: Encoder, config: WindowPruneConfig) -> None:
    check_swin(model, "window_prune", "-O prune:keep=F")
