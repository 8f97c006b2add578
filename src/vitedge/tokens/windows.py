"""Token reduction for Swin that keeps the window structure: window pruning (``-O prune:keep=...`` on Swin).

Merging tokens or dropping single tokens breaks Swin, whose attention needs full, aligned windows and whose
patch merging needs the whole grid. So the unit of reduction here is the *window*: in each block, the windows
of the (shifted) partition are ranked by how much they vary inside, and only the top ``keep`` fraction run
attention (with the relative-position bias and the shifted-window mask of exactly those windows) and the MLP.
The tokens of the other windows skip the block unchanged, as with token halting: the grid stays whole, patch
merging and later stages see every position, and a flat region (sky, wall, letterbox) simply stops being
refined early. The work shrinks for real: the selected windows are gathered into a smaller batch of windows,
and only their tokens go through the MLP.

Window score (Swin has no class token): ``variance`` (default; also what ``attn`` means here) is the mean
squared deviation of a window's normalised tokens from their mean; ``norm`` is their mean L2 norm. Pruning
applies in stages with at least ``min_windows`` windows; deeper stages, with one or a few windows, always run.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from vitedge.tokens.runner import split_heads

SWIN_SCORERS = ("attn", "variance", "norm")


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


def pruned_swin_block(
    parts: Any, x: torch.Tensor, keep_windows: int, scorer: str
) -> torch.Tensor:  # x: (B, H, W, C) -> (B, H, W, C)
    """One Swin block computing only ``keep_windows`` windows per image; the others pass unchanged."""
    b, h, w, c = x.shape
    wh, ww = parts.window
    sh, sw = parts.shift
    hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
    y = parts.norm1(x)
    if sh or sw:
        y = torch.roll(y, shifts=(-sh, -sw), dims=(1, 2))
    y = F.pad(y, (0, 0, 0, wp - w, 0, hp - h))
    windows = window_partition(y, (wh, ww))  # (B, nW, N, C)
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

    def unwindow(t: torch.Tensor) -> torch.Tensor:
        t = window_reverse(t, (wh, ww), (hp, wp))[:, :h, :w]
        return torch.roll(t, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else t

    x = x + parts.drop1(unwindow(full))
    mask = unwindow(active)[..., 0]  # (B, H, W) tokens of computed windows
    flat = x.reshape(b, h * w, c)
    m = mask.reshape(b, h * w)
    delta = torch.zeros_like(flat)  # (B, H*W, C): the MLP branch, zero for skipped windows
    delta[m] = parts.mlp(parts.norm2(flat[m]))
    return (flat + parts.drop2(delta)).view(b, h, w, c)


def install_window_pruning(model: Any, keep: float, scorer: str, min_windows: int = 4) -> None:
    """Make a Swin encoder (with ``block_parts``/``block_runner``/``window_plan``) prune windows."""
    if scorer not in SWIN_SCORERS:
        raise ValueError(
            f"on Swin, prune ranks whole windows; scorer must be one of {', '.join(SWIN_SCORERS)}, "
            f"got {scorer!r}"
        )
    score = "variance" if scorer == "attn" else scorer

    def run(encoder: Any, i: int, block: Any, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        wh, ww = block.window_size
        hp, wp = math.ceil(h / wh) * wh, math.ceil(w / ww) * ww
        n_win = (hp // wh) * (wp // ww)
        k = kept_windows(keep, n_win, min_windows)
        if k >= n_win:
            return block(x)
        return pruned_swin_block(encoder.block_parts(block, (hp, wp)), x, k, score)

    model.block_runner = run
    model.window_plan = lambda i, n_win: kept_windows(keep, n_win, min_windows)
