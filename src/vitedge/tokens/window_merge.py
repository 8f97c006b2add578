"""Token merging for Swin that keeps the window structure (``-O window_merge:r=...``).

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

``r`` counts tokens per window and block (``merge:r`` on a ViT counts per block of the whole sequence, hence
the separate name); an ``r`` above what a window can merge (its sources) is clamped there, so ``r=8`` is a
half of a 4x4 window and a sixth of a 7x7 one. ``schedule=decreasing`` runs from
``2r`` at the first block to 0 at the last, over the blocks of all stages. Only the normalised inputs of
attention and MLP are merged here, never the residual stream, so there is no ``keep_norm`` (MLERP); blocks
whose grid needs padding to whole windows run natively; features always come back on the full grid, so
there is no ``restore``. In the execution plan, each merging block gets a :class:`WindowMergeStep`.

Cost. Every copy is a row copy of the flattened windows: merging is one ``index_add_`` and unmerging one
``index_select`` (``gather``/``scatter_add_`` with an index expanded over the channels cost twice as much
on CPU), and bias plus mask at the merged positions come from one ``(windows * N * N, H)`` table. Short
rows of scores (fewer than 16 keys) use :func:`vitedge.attention.batched.softmax_rows`. Even so the
bookkeeping costs about a fifth of a cifar-swin block, so small ``r`` is slower than the native block.

Measured on cifar-swin (batch 64, 2 threads, 10,000 CIFAR-10 test images, 84.33 %) by
``benchmarks/bench_tokens.py --only swin`` and the README: the early, high-resolution stage is where
merging is cheap in accuracy (``r=8`` in the first stage alone loses 0.4 pp on 2,000 images, in the
second stage alone 4.3 pp), but it holds only 2 of the 10 blocks, so no setting reaches 1.3x at 1.5 pp,
and fine-tuning with merging active (12 GPU epochs, distilled from the unmerged model) recovers ``r=8``
only from -9.1 to -4.4 pp.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from vitedge.api import Composition, register
from vitedge.attention.batched import bmm_attention
from vitedge.models.base import Encoder, Trace
from vitedge.plan import PlanBuilder
from vitedge.plan.sequence import split_heads
from vitedge.tokens.runner import decreasing_schedule, flat_rows
from vitedge.tokens.windows import check_swin, window_partition, window_reverse

__all__ = ["WindowMergeConfig", "WindowMergeStep", "cell_split", "merged_swin_block", "window_merge_r"]
SCHEDULES = ("constant", "decreasing")


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
        allowed: ``(nW, Ns, Nd)`` bool, pairs the shifted-window mask lets attend to each other (or None);
            window ``i`` of the batch is window ``i % nW`` of the partition.

    Returns:
        ``group``: ``(BW, N)`` merged token each position belongs to, in ``[0, N - r)``: destinations first,
        then the sources that stay; ``rep``: ``(BW, N - r)`` the window position of each merged token.
    """
    dst_pos, src_pos = cell_split(window, tokens.device)
    bw, n, _ = tokens.shape
    nd, ns = len(dst_pos), len(src_pos)
    with torch.no_grad():
        metric = tokens / tokens.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        # (BW, Ns, Nd)
        sim = metric.index_select(1, src_pos) @ metric.index_select(1, dst_pos).transpose(1, 2)
        if allowed is not None:
            sim = sim.view(-1, *allowed.shape).masked_fill(~allowed, -torch.inf).view(bw, ns, nd)
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


def _merge(t: torch.Tensor, rows: torch.Tensor, inv_counts: torch.Tensor) -> torch.Tensor:
    """Average ``t`` (BW, N, C) into ``inv_counts.shape[1]`` groups -> (BW, M, C).

    ``rows``: ``(BW * N,)`` group of each position as a row of the flattened ``(BW * M, C)`` output;
    ``inv_counts``: ``(BW, M, 1)``. One ``index_add_`` of whole rows (several times faster on CPU than
    ``scatter_add_`` with an index expanded over C).
    """
    bw, n, c = t.shape
    m = inv_counts.shape[1]
    out = t.new_zeros(bw * m, c).index_add_(0, rows, t.reshape(bw * n, c)).view(bw, m, c)
    return out.mul_(inv_counts)  # in place is safe under autograd: index_add_'s backward needs no output


def _unmerge(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``(BW, M, C)`` -> ``(BW, N, C)``: every position takes its group's row (``rows`` as in
    :func:`_merge`)."""
    bw, m, c = t.shape
    return t.reshape(bw * m, c).index_select(0, rows).view(bw, -1, c)


def _merged_bias(
    rel_bias: torch.Tensor,
    mask: torch.Tensor | None,
    rep: torch.Tensor,
    counts: torch.Tensor,
    prop_attn: bool,
) -> torch.Tensor:  # -> (BW, H, M, M)
    """Relative-position bias (``(H, N, N)``) plus shifted-window mask (``(nW, N, N)`` or None) at the window
    positions ``rep`` (BW, M) of the merged tokens, plus ``log(counts)`` (BW, M, 1) on the keys, gathered
    as one row copy from a ``(windows * N * N, H)`` table."""
    h, n, _ = rel_bias.shape
    # (T, H, N, N): T = 1 without a mask, else one table per window of the partition
    table = rel_bias[None] if mask is None else rel_bias[None] + mask.to(rel_bias.dtype)[:, None]
    t = table.shape[0]
    bw, m = rep.shape
    win = torch.arange(bw, device=rep.device) % t  # window i of the batch is window i % nW of the partition
    idx = (win[:, None, None] * n + rep[:, :, None]) * n + rep[:, None, :]  # (BW, M, M)
    flat = table.permute(0, 2, 3, 1).reshape(t * n * n, h)
    bias = flat.index_select(0, idx.reshape(-1)).view(bw, m, m, h)
    if prop_attn:  # proportional attention: log(size) on every key
        bias = bias.add_(counts.log().to(bias.dtype).view(bw, 1, m, 1))
    return bias.permute(0, 3, 1, 2)


def merged_swin_block(
    parts: Any, x: torch.Tensor, r: int, *, prop_attn: bool = True, record: list[torch.Tensor] | None = None
) -> torch.Tensor:  # (B, H, W, C) -> (B, H, W, C)
    """One Swin block with ``r`` tokens per window merged for its attention and MLP, then unmerged.

    With ``record``, the group ids of the first image's positions ((H, W), distinct across its windows, on
    the unshifted grid) are appended to it."""
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
    allowed = None
    if parts.mask is not None:  # (nW, N, N): 0 within a region, a large negative number across
        dst_pos, src_pos = cell_split((wh, ww), x.device)
        allowed = parts.mask.index_select(1, src_pos).index_select(2, dst_pos) == 0  # (nW, Ns, Nd)
    group, rep = _groups(y, (wh, ww), r, allowed)
    m = n - r
    if record is not None:
        ids = group[:n_win] + torch.arange(n_win, device=x.device)[:, None] * m  # (nW, N) of image 0
        grid = window_reverse(ids.view(1, n_win, n, 1), (wh, ww), (h, w))[0, ..., 0]  # (H, W), shifted
        record.append(torch.roll(grid, shifts=(sh, sw), dims=(0, 1)) if (sh or sw) else grid)
    rows = flat_rows(group, m)  # (BW * N,)
    # group sizes (BW, M, 1); index_add_ rather than bincount, which syncs a GPU to size its output
    counts = y.new_zeros(b * n_win * m).index_add_(0, rows, y.new_ones(rows.numel())).view(b * n_win, m, 1)
    inv_counts = counts.reciprocal()

    q, k, v = split_heads(parts.attn, _merge(y, rows, inv_counts))  # (BW, H, M, d)
    bias = _merged_bias(parts.rel_bias[0], parts.mask, rep, counts, prop_attn)  # (BW, H, M, M)
    if q.is_cpu:  # the (BW, H, M, M) bias is built already, so two products cost no extra memory here
        out = bmm_attention(q, k, v, bias, parts.attn.scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=parts.attn.scale)
    out = parts.attn.proj(out.transpose(1, 2).reshape(b * n_win, m, -1))  # (BW, M, C)
    xw = xw + parts.drop1(_unmerge(out, rows))
    xw = xw + parts.drop2(_unmerge(parts.mlp(_merge(parts.norm2(xw), rows, inv_counts)), rows))

    x = window_reverse(xw.view(b, n_win, n, c), (wh, ww), (h, w))
    return torch.roll(x, shifts=(sh, sw), dims=(1, 2)) if (sh or sw) else x


@dataclass(frozen=True, kw_only=True)
class WindowMergeConfig:
    """``r`` tokens merged per window in every block (0 = off), ``schedule`` (``constant``, or
    ``decreasing`` from 2r at the first block to 0 at the last, over all stages), ``prop_attn`` for the
    log-size attention bias."""

    r: int = 0
    schedule: str = "constant"
    prop_attn: bool = True

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"window_merge:r must be >= 0, got {self.r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(
                f"window_merge:schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r} (the "
                "seed schedule keeps a share of the patches per quarter of the depth, which a merge undone "
                "after every block cannot)"
            )

    def per_block(self, depth: int) -> list[int]:
        """Tokens to merge per window at each block, before clamping to what a window can merge."""
        if self.schedule == "constant":
            return [self.r] * depth
        return decreasing_schedule(self.r, depth)


@dataclass(frozen=True, kw_only=True)
class WindowMergeStep:
    """The window step of one Swin block: merge ``r`` tokens per window for its attention and MLP."""

    r: int
    prop_attn: bool
    label: str
    kernel: str = "bmm"  # the merged windows' attention: two batched products on CPU (fused SDPA elsewhere)

    @property
    def detail(self) -> str:
        return f"window_merge r={self.r} per window"

    def run(self, encoder: Any, block: Any, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        _, h, w, _ = x.shape
        window = tuple(block.window_size)
        merged = window_merge_r(self.r, window)
        if merged == 0 or h % window[0] or w % window[1]:
            return block(x)
        record: list[torch.Tensor] | None = None
        if trace is not None and trace.sources and trace.window_groups is None:  # the first merging block
            record = []
        out = merged_swin_block(
            encoder.block_parts(block, (h, w)), x, merged, prop_attn=self.prop_attn, record=record
        )
        if trace is not None and record:
            trace.window_groups = record[0].cpu()
        return out

    def windows(self, windows: int) -> int:
        return windows

    def window_tokens(self, window: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        n = window[0] * window[1]
        merged = window_merge_r(self.r, window)
        if merged == 0 or grid[0] % window[0] or grid[1] % window[1]:
            return n, 0
        return n - merged, len(cell_split(window)[0])


def window_merge_steps(model: Encoder, config: WindowMergeConfig, plan: PlanBuilder) -> None:
    """A :class:`WindowMergeStep` in every block the schedule merges in."""
    for i, r in enumerate(config.per_block(plan.depth)):
        if r > 0:
            plan.set_block(i, "window", WindowMergeStep(r=r, prop_attn=config.prop_attn, label=plan.current))


@register("window_merge", steps=window_merge_steps, compose=Composition(fills=frozenset({"window"})))
def _apply_window_merge(model: Encoder, config: WindowMergeConfig) -> None:
    check_swin(model, "window_merge", "-O merge:r=N")
