"""Token merging for Swin that keeps the window structure (``-O merge:r=...`` on a Swin model).

ToMe merges tokens for good, which Swin cannot take: its attention needs whole, aligned windows and its patch
merging needs the whole grid. So here merging is *local and undone* (as ToMe for Stable Diffusion does for
U-Nets): inside each window of each block, ``r`` tokens are folded into a similar token of the same window,
the block's attention and MLP run on the ``N - r`` tokens left, and every folded token then takes the update
computed for the token it joined. The residual stream keeps every token, so shifted windows, patch merging
and the head see the grid as before; what is saved is the work of the attention projections, the
attention itself and the MLP on ``r`` of every ``N`` tokens.

Per block and window (``N = wh * ww`` tokens):

1. Partition. The window is cut into 2x2 cells; the top-left token of each cell is a destination, the others
   are sources (ToMe-SD's strided split: destinations spread evenly, so a merged region keeps a token nearby).
2. Matching. Each source finds its most similar destination by cosine similarity of the block's normalised
   input tokens (keys would cost the projection that merging is meant to save); in a shifted window, pairs
   that the shifted-window mask keeps apart are never matched. The ``r`` best-matched sources are folded in,
   by a plain average (every token has size 1 when a block starts, since the previous block unmerged).
3. Attention on the merged window. A merged token sits at its destination's position for the relative-
   position bias and the shifted-window mask, and carries the log of its size as a bias on its key
   (proportional attention, as in ToMe), all added to the scores as one bias. On CPU the attention is two
   batched matmuls rather than fused SDPA, which is slower for windows this small with a mask per window
   (:mod:`vitedge.attention.batched`); on accelerators it is fused SDPA.
4. Unmerge, residual, then the MLP on the same groups (merged again from the updated tokens, since
   LayerNorm and the MLP act per token), unmerged the same way.

``r`` counts tokens per window and block; an ``r`` above what a window can merge (its sources) is clamped
there, so ``r=8`` is a half of a 4x4 window and a sixth of a 7x7 one. Only the normalised inputs of attention
and MLP are merged here, never the residual stream, so ``keep_norm`` (MLERP) does not apply. Blocks whose
grid needs padding to whole windows run natively. Features always come back on the full grid, so
``restore`` changes nothing here. Measured on cifar-swin and timm Swin-T by
``benchmarks/bench_tokens.py --only swin``.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from vitedge.attention.batched import bmm_attention
from vitedge.tokens.runner import split_heads
from vitedge.tokens.windows import window_partition, window_reverse

__all__ = ["cell_split", "install_window_merging", "merged_swin_block", "window_merge_r"]


@cache
def cell_split(
    window: tuple[int, int], device: torch.device | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Destination ``(Nd,)`` and source ``(Ns,)`` positions of the 2x2-cell split, row-major in the window,
    on ``device`` (cached per window and device)."""
    wh, ww = window
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    is_dst = ((rows % 2 == 0) & (cols % 2 == 0)).flatten()
    return is_dst.nonzero().squeeze(1).to(device), (~is_dst).nonzero().squeeze(1).to(device)


def window_merge_r(r: int, window: tuple[int, int]) -> int:
    """``r`` clamped to what a window can merge (its source tokens)."""
    return max(0, min(r, len(cell_split(window)[1])))


def _groups(
    tokens: torch.Tensor, window: tuple[int, int], r: int, allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match ``r`` sources per window onto destinations.

    Args:
        tokens: ``(BW, N, C)`` normalised tokens of every window.
        allowed: ``(BW, Ns, Nd)`` bool, pairs the shifted-window mask lets attend to each other (or None).

    Returns:
        ``group``: ``(BW, N)`` merged token each position belongs to, in ``[0, N - r)``: destinations first,
        then the sources that stay; ``rep``: ``(BW, N - r)`` the window position of each merged token.
    """
    dst_pos, src_pos = cell_split(window, tokens.device)
    bw, n, _ = tokens.shape
    nd, ns = len(dst_pos), len(src_pos)
    with torch.no_grad():
        metric = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        sim = metric[:, src_pos] @ metric[:, dst_pos].transpose(1, 2)  # (BW, Ns, Nd)
        if allowed is not None:
            sim = sim.masked_fill(~allowed, -torch.inf)
        best, best_dst = sim.max(dim=-1)  # (BW, Ns)
        order = best.argsort(dim=-1, descending=True)
        merged, kept = order[:, :r], order[:, r:]  # indices into the sources
        if allowed is not None and torch.isinf(best.gather(1, merged)).any():
            raise ValueError(
                f"merge:r={r} is more than a {window[0]}x{window[1]} shifted window can merge without "
                "joining tokens the shifted-window mask keeps apart; lower r"
            )
        group = torch.empty(bw, n, dtype=torch.long, device=tokens.device)
        group[:, dst_pos] = torch.arange(nd, device=tokens.device)
        group.scatter_(1, src_pos[kept], torch.arange(nd, nd + ns - r, device=tokens.device).expand(bw, -1))
        group.scatter_(1, src_pos[merged], best_dst.gather(1, merged))
        rep = torch.cat([dst_pos.expand(bw, -1), src_pos[kept]], dim=1)
    return group, rep


def _merge(t: torch.Tensor, group: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Average ``t`` (BW, N, C) over ``group`` (BW, N) -> (BW, N', C); ``counts`` is (BW, N', 1)."""
    bw, _, c = t.shape
    out = t.new_zeros(bw, counts.shape[1], c)
    out.scatter_add_(1, group[..., None].expand(-1, -1, c), t)
    return out / counts


def _unmerge(t: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """``(BW, N', C)`` -> ``(BW, N, C)``: every position takes its group's value."""
    return t.gather(1, group[..., None].expand(-1, -1, t.shape[-1]))


def merged_swin_block(
    parts: Any, x: torch.Tensor, r: int, *, prop_attn: bool = True
) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
    """One Swin block with ``r`` tokens per window merged for its attention and MLP, then unmerged."""
    b, h, w, c = x.shape
    wh, ww = parts.window
    sh, sw = parts.shift
    n = wh * ww
    if sh or sw:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    xw = window_partition(x, (wh, ww))  # (B, nW, N, C)
    n_win = xw.shape[1]
    xw = xw.reshape(b * n_win, n, c)
    y = parts.norm1(xw)
    dst_pos, src_pos = cell_split((wh, ww), x.device)
    allowed = None
    mask = None
    if parts.mask is not None:  # (nW, N, N): 0 within a region, a large negative number across
        mask = parts.mask.to(y.dtype).repeat(b, 1, 1)  # (BW, N, N): window of row i is i % nW
        allowed = mask[:, src_pos][:, :, dst_pos] == 0
    group, rep = _groups(y, (wh, ww), r, allowed)
    m = n - r
    counts = y.new_zeros(b * n_win, m, 1).scatter_add_(1, group[..., None], y.new_ones(b * n_win, n, 1))

    q, k, v = split_heads(parts.attn, _merge(y, group, counts))  # (BW, H, M, d)
    rb = parts.rel_bias[0].to(q.dtype)  # (H, N, N)
    bias = rb[:, rep[:, :, None], rep[:, None, :]].transpose(0, 1)  # (BW, H, M, M)
    # (BW, 1, M): proportional attention on the keys
    extra = counts.log().transpose(1, 2) if prop_attn else counts.new_zeros(b * n_win, 1, m)
    if mask is not None:
        rows = mask.gather(1, rep[..., None].expand(-1, -1, n))  # (BW, M, N)
        extra = extra + rows.gather(2, rep[:, None, :].expand(-1, m, -1))  # (BW, M, M)
    bias = bias + extra[:, None]
    if q.is_cpu:  # the (BW, H, M, M) bias is built already, so two products cost no extra memory here
        out = bmm_attention(q, k, v, bias, parts.attn.scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=parts.attn.scale)
    out = parts.attn.proj(out.transpose(1, 2).reshape(b * n_win, m, -1))  # (BW, M, C)
    xw = xw + parts.drop1(_unmerge(out, group))
    xw = xw + parts.drop2(_unmerge(parts.mlp(_merge(parts.norm2(xw), group, counts)), group))

    x = window_reverse(xw.view(b, n_win, n, c), (wh, ww), (h, w))
    return torch.roll(x, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else x


def install_window_merging(model: Any, r: int, *, prop_attn: bool = True) -> None:
    """Make a Swin encoder (block_parts, block_runner, window_tokens) merge ``r`` tokens per window."""

    def run(encoder: Any, i: int, block: Any, x: torch.Tensor) -> torch.Tensor:
        _, h, w, _ = x.shape
        window = tuple(block.window_size)
        merged = window_merge_r(r, window)
        if merged == 0 or h % window[0] or w % window[1]:
            return block(x)
        return merged_swin_block(encoder.block_parts(block, (h, w)), x, merged, prop_attn=prop_attn)

    def tokens(i: int, window: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        n = window[0] * window[1]
        merged = window_merge_r(r, window)
        if merged == 0 or grid[0] % window[0] or grid[1] % window[1]:
            return n, 0
        return n - merged, len(cell_split(window)[0])

    model.block_runner = run
    model.window_tokens = tokens
