"""Windowed attention in plain ViTs (ViTDet style, seed 22.1.5), ``-O window:size=S,global_blocks=G``.

At high resolution a ViT's attention is quadratic in its tokens (4096 at 1024 px with 16-pixel patches).
ViTDet lets most blocks attend only within non-overlapping S x S windows of the patch grid and keeps a few
blocks global, spread evenly (``global_blocks=4`` of 12: blocks 2, 5, 8, 11), so information still crosses
the whole image. In a windowed block:

- each patch attends to the patches of its window and to the prefix tokens (class, distillation,
  registers), which carry global context in and out;
- each prefix token attends to every token, as in the original block (P x N, cheap);
- a grid that does not tile is padded to a multiple of S; padded keys are masked, padded queries dropped.

The model's absolute position embeddings are added once at the input (interpolated to the grid by the
model loader for other resolutions), so windows need no position term of their own. With S >= the grid the
single window is the whole image and the block computes exactly global attention (tested).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitedge.api import Composition, register
from vitedge.attention.batched import attention, short_enough
from vitedge.attention.linear import TOKEN_REDUCERS, check_sequence
from vitedge.models.base import Encoder, SequenceEncoder
from vitedge.models.spec import AttnOp, KernelCost
from vitedge.plan import PlanBuilder


@dataclass(frozen=True, kw_only=True)
class WindowAttnConfig:
    """``size``: window side in patches; ``global_blocks``: blocks kept global, spread evenly over depth."""

    size: int = 14
    global_blocks: int = 4

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"window:size must be >= 1 patch, got {self.size}")
        if self.global_blocks < 0:
            raise ValueError(f"window:global_blocks must be >= 0, got {self.global_blocks}")


def global_block_indices(depth: int, count: int) -> list[int]:
    """``count`` blocks spread evenly, each closing a group: depth 12, count 4 -> [2, 5, 8, 11]."""
    if count <= 0:
        return []
    count = min(count, depth)
    return sorted({round((i + 1) * depth / count) - 1 for i in range(count)})


def window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    prefix: int,
    grid: tuple[int, int],
    size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Attention of ``prefix`` global tokens and a row-major ``grid`` of patches in ``size`` x ``size``
    windows. q, k, v: (B, H, P + gh*gw, d) -> (B, H, P + gh*gw, d)."""
    b, h, n, d = q.shape
    gh, gw = grid
    if n != prefix + gh * gw:
        raise ValueError(f"window attention expected {prefix} + {gh}x{gw} tokens, got {n}")
    scale = d**-0.5 if scale is None else scale
    wh, ww = min(size, gh), min(size, gw)
    hp, wp = math.ceil(gh / wh) * wh, math.ceil(gw / ww) * ww
    nh, nw = hp // wh, wp // ww
    nwin, t = nh * nw, wh * ww

    def windows(x: torch.Tensor) -> torch.Tensor:  # (B, H, gh*gw, d) -> (B*nW, H, t, d)
        x = x.reshape(b, h, gh, gw, d)
        x = F.pad(x, (0, 0, 0, wp - gw, 0, hp - gh))
        x = x.view(b, h, nh, wh, nw, ww, d).permute(0, 2, 4, 1, 3, 5, 6)  # (B, nh, nw, H, wh, ww, d)
        return x.reshape(b * nwin, h, t, d)

    qp, kp, vp = (x[:, :, :prefix] for x in (q, k, v))  # (B, H, P, d)
    qw, kw, vw = (windows(x[:, :, prefix:]) for x in (q, k, v))
    if prefix:  # every window also sees the prefix tokens' keys
        kw = torch.cat([kp.repeat_interleave(nwin, dim=0), kw], dim=2)  # (B*nW, H, P + t, d)
        vw = torch.cat([vp.repeat_interleave(nwin, dim=0), vw], dim=2)
    bias = None
    if hp != gh or wp != gw:  # padded keys get -inf
        valid = torch.zeros(hp, wp, dtype=torch.bool, device=q.device)
        valid[:gh, :gw] = True
        valid = valid.view(nh, wh, nw, ww).permute(0, 2, 1, 3).reshape(nwin, t)
        valid = torch.cat([valid.new_ones(nwin, prefix), valid], dim=1)  # (nW, P + t)
        mask = torch.zeros(nwin, prefix + t, dtype=q.dtype, device=q.device).masked_fill_(~valid, -math.inf)
        bias = mask.repeat(b, 1)[:, None, None, :]  # (B*nW, 1, 1, P + t)
    out_w = attention(qw, kw, vw, bias, scale)  # (B*nW, H, t, d)
    del qw, kw, vw  # before the output is laid back out (a copy of its own size)
    out_w = out_w.view(b, nh, nw, h, wh, ww, d).permute(0, 3, 1, 4, 2, 5, 6).reshape(b, h, hp, wp, d)
    out_w = out_w[:, :, :gh, :gw].reshape(b, h, gh * gw, d)
    if not prefix:
        return out_w
    out_p = attention(qp, k, v, None, scale)  # (B, H, P, d): the prefix tokens stay global
    return torch.cat([out_p, out_w], dim=2)


def window_cost(
    *, name: str, prefix: int, grid: tuple[int, int], size: int, heads: int, head_dim: int
) -> KernelCost:
    """Matmul work and peak elements of :func:`window_attention` for one image: nW windows of t tokens
    (padded) attending over the P prefix keys and their own, and the P prefix queries over everything.
    Peak, per head: the windowed queries and output (t d per window each) and the keys and values with the
    prefix ((P + t) d per window each); short windows (two batched products) add their scores and softmax."""
    gh, gw = grid
    wh, ww = min(size, gh), min(size, gw)
    nwin, t = math.ceil(gh / wh) * math.ceil(gw / ww), wh * ww
    d = head_dim
    fused = not short_enough(t)
    ops = [
        AttnOp(
            name=f"{name}.windows",
            windows=nwin,
            q_tokens=t,
            kv_tokens=prefix + t,
            heads=heads,
            head_dim=d,
            fused=fused,
        )
    ]
    if prefix:
        ops.append(
            AttnOp(
                name=f"{name}.prefix",
                windows=1,
                q_tokens=prefix,
                kv_tokens=prefix + gh * gw,
                heads=heads,
                head_dim=d,
            )
        )
    scores = 0 if fused else 2 * nwin * t * (prefix + t)
    return KernelCost(ops=tuple(ops), elements=heads * (d * nwin * (2 * t + 2 * (prefix + t)) + scores))


@dataclass(frozen=True, kw_only=True)
class WindowAttentionStep:
    """The attention step of one windowed block."""

    size: int
    prefix: int
    grid: tuple[int, int]
    label: str

    @property
    def detail(self) -> str:
        return f"window {self.size}x{self.size}"

    def cost(self, *, name: str, tokens: int, heads: int, head_dim: int) -> KernelCost:
        if tokens != self.prefix + self.grid[0] * self.grid[1]:
            raise ValueError(f"window attention is planned for {self.grid} patches, not {tokens} tokens")
        return window_cost(
            name=name, prefix=self.prefix, grid=self.grid, size=self.size, heads=heads, head_dim=head_dim
        )

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        if attn_mask is not None:
            raise ValueError("window attention runs on the full patch grid; it takes no attention bias")
        return window_attention(q, k, v, prefix=self.prefix, grid=self.grid, size=self.size, scale=scale)


def window_steps(model: Encoder, config: WindowAttnConfig, plan: PlanBuilder) -> None:
    assert isinstance(model, SequenceEncoder)
    layout = model.layout
    keep = set(global_block_indices(plan.depth, config.global_blocks))
    step = WindowAttentionStep(
        size=config.size, prefix=layout.num_prefix, grid=layout.grid, label=plan.current
    )
    for i in range(plan.depth):
        if i not in keep:
            plan.set_block(i, "attention", step)


@register(
    "window",
    steps=window_steps,
    compose=Composition(
        fills=frozenset({"attention"}),
        excludes=dict.fromkeys(
            TOKEN_REDUCERS, "windows need the full patch grid, which token reduction breaks"
        ),
    ),
)
def _apply_window(model: Encoder, config: WindowAttnConfig) -> None:
    check_sequence(model, "window")
