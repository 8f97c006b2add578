"""Token merging by bipartite soft matching (ToMe; seed 22.1.3), ``-O merge:r=...``.

In each block, after attention, the mergeable tokens are split alternately into sets A and B; every A token
finds its most similar B token by cosine similarity of the attention keys (averaged over heads), and the ``r``
best-matched A tokens are folded into their B partners by a size-weighted average, rescaled to the largest
norm among the merged tokens (MLERP; ``keep_norm=0`` keeps ToMe's plain average). Class, distillation and
register tokens are never merged. Sizes feed proportional attention (a log-size bias on the keys, added to
the scores; :mod:`vitedge.attention.batched` picks the kernel by length), and an optional source map records
which original patches each token holds, so the merged map can be drawn or the features restored to the full
grid for projectors that expect N tokens.

Schedules: ``constant`` (``r`` per block), ``decreasing`` (2r at the first block down to 0 at the last, the
same total), or ``seed`` (the seed's keep ratios 100/75/50/25 % of the patch tokens over the four quarters of
the depth; ``r`` is ignored). An ``r`` larger than a block can merge is clamped there, as in ToMe.

Swin has its own option, ``window_merge`` (:mod:`vitedge.tokens.window_merge`): there ``r`` counts tokens
per window, folded within each block and unmerged after it; ``merge`` refuses Swin and says so.

In the execution plan (:mod:`vitedge.plan`), merging fills the *reducer* step of every block whose
scheduled ``r`` is positive (:class:`MergeReducer`) and sets the token loop's ``prop_attn`` and ``restore``.

The matching is ToMe's (``keep_norm=0`` holds to a transcription of it, in
``tests/tokens/test_tome_reference.py``): the alternating split runs over the whole sequence with the class
and distillation tokens protected, and the unmerged tokens keep their original order. Until algorithm
version 2 vitedge split only the patch tokens and kept the unmerged ones in similarity order, which paired
other tokens in the next block.

MLERP against ToMe's average under that matching, on the 10,000 CIFAR-10 test images (cifar-vit, fp32
85.29 %; ``vitedge sweep cifar-vit -O merge:r=3,4,5,6[,keep_norm=0] --data cifar10 --batch 64``): r=3 -0.38 pp
against -0.47, r=4 -0.49 against -0.66, r=5 -0.92 against -0.93, r=6 -1.35 against -1.38, at the same speed.
MLERP stays the default: no worse within noise, and better where few tokens merge; the gap that made it matter
(r=5: -0.77 against -1.02 under the old matching) came mostly from the old token order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitedge.api import Composition, register
from vitedge.models.base import Encoder, SequenceEncoder
from vitedge.models.spec import BlockTokens, LinearOp
from vitedge.plan import PlanBuilder
from vitedge.plan.sequence import AttentionInfo, Needs, TokenState, ones_size
from vitedge.tokens.runner import check_supported, decreasing_schedule

MergeFn = Callable[[torch.Tensor, str], torch.Tensor]
SCHEDULES = ("constant", "decreasing", "seed")
MERGE_NEEDS = Needs(keys=True)  # matching compares the attention keys


def bipartite_soft_matching(metric: torch.Tensor, r: int, num_prefix: int = 0) -> MergeFn:
    """ToMe's matching: ``r`` tokens of set A merged onto set B by cosine similarity of ``metric`` (B, N, C).

    As in ToMe, the split alternates over the whole sequence (A: positions 0, 2, ...; B: 1, 3, ...) and the
    first ``num_prefix`` tokens (class, distillation, register) take part only as protected tokens: they are
    never merged away and never receive a merge. Returns ``merge(x, mode)`` mapping any (B, N, C') tensor
    aligned with ``metric`` to (B, N - r, C'): the protected tokens in their order, then the unmerged A tokens
    in their original order (ToMe keeps that order when there is a class token; without protected tokens it
    keeps ToMe's similarity order), then the B tokens with their partners reduced in by ``mode`` ("sum",
    "mean", "amax").
    """
    n = metric.shape[1]
    p = num_prefix
    pa, pb = (p + 1) // 2, p // 2  # protected tokens in A and in B
    na = (n + 1) // 2
    r = max(0, min(r, (n - p) // 2))
    if r == 0:

        def identity(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
            return x

        return identity
    with torch.no_grad():
        metric = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        a, b = metric[:, ::2], metric[:, 1::2]
        scores = a @ b.transpose(-1, -2)  # (B, Na, Nb)
        if pa:
            scores[:, :pa] = -torch.inf  # protected A tokens are never merged away
        if pb:
            scores[:, :, :pb] = -torch.inf  # protected B tokens never receive a merge
        node_max, node_idx = scores.max(dim=-1)  # best partner in B for each A token
        edge_idx = node_max.argsort(dim=-1, descending=True)[..., None]  # (B, Na, 1)
        unm_idx = edge_idx[:, r:]  # A tokens that stay
        if p:
            unm_idx = unm_idx.sort(dim=1).values  # original order: the protected tokens lead
        src_idx = edge_idx[:, :r]  # A tokens merged away
        dst_idx = node_idx[..., None].gather(dim=1, index=src_idx)  # their partners in B

    def merge(x: torch.Tensor, mode: str = "mean") -> torch.Tensor:
        src, dst = x[:, ::2], x[:, 1::2]
        bsz, _, c = src.shape
        unm = src.gather(dim=1, index=unm_idx.expand(bsz, na - r, c))
        src = src.gather(dim=1, index=src_idx.expand(bsz, r, c))
        dst = dst.scatter_reduce(1, dst_idx.expand(bsz, r, c), src, reduce=mode)
        if pb == 0:  # at most a class token, which leads unm already
            return torch.cat([unm, dst], dim=1)
        prefix = [(unm if i % 2 == 0 else dst)[:, i // 2 : i // 2 + 1] for i in range(p)]  # A, B alternate
        return torch.cat([*prefix, unm[:, pa:], dst[:, pb:]], dim=1)

    return merge


def merge_state(state: TokenState, metric: torch.Tensor, r: int, *, keep_norm: bool = False) -> TokenState:
    """Merge ``r`` patch tokens of ``state`` (size-weighted average, ToMe's ``merge_wavg``); the prefix
    tokens keep their places and values. ``metric`` (B, N, C) is aligned with the whole state.

    With ``keep_norm`` a merged token keeps the direction of the size-weighted average but takes the largest
    norm among its members (MLERP, from Token Fusion): averaging tokens that point in different directions
    shrinks the norm, and the residual stream, which no LayerNorm rescales, carries that shrinkage on.
    """
    p = state.num_prefix
    merge = bipartite_soft_matching(metric, r, p)
    size = state.size if state.size is not None else ones_size(state)
    x = state.x
    d = x.shape[-1]
    merged = merge(torch.cat([x * size, size], dim=-1), "sum")  # tokens and sizes in one gather/scatter
    new_size = merged[..., d:]
    new_x = merged[..., :d] / new_size
    if keep_norm:
        peak = merge(x.norm(dim=-1, keepdim=True), "amax")  # (B, N - r, 1)
        new_x = new_x * (peak / new_x.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    return TokenState(
        x=torch.cat([x[:, :p], new_x[:, p:]], dim=1),  # the prefix exactly as it was
        size=new_size,
        source=None if state.source is None else merge(state.source, "amax"),
        num_prefix=p,
        prop_attn=state.prop_attn,
    )


def schedule_r(config: MergeConfig, depth: int, num_patches: int) -> list[int]:
    """Tokens to merge at each block (before clamping to what the block can merge)."""
    if config.schedule == "constant":
        return [config.r] * depth
    if config.schedule == "decreasing":
        return decreasing_schedule(config.r, depth)
    # seed: keep 100/75/50/25 % of the patches through the four quarters; merge at each quarter's last block.
    targets = [1.0, 0.75, 0.5, 0.25]
    plan = [0] * depth
    remaining = num_patches
    for q in range(1, 4):
        block = max(0, round(q * depth / 4) - 1)
        want = round(num_patches * targets[q])
        plan[block] += max(0, remaining - want)
        remaining = want
    return plan


@dataclass(frozen=True, kw_only=True)
class MergeConfig:
    """``r`` tokens merged per block (0 = off), ``schedule`` (constant, decreasing, seed),
    ``prop_attn`` for the log-size attention bias, ``keep_norm`` for MLERP merging (the merged token keeps its
    members' largest norm; ``keep_norm=0`` is ToMe's plain average), ``restore`` to return features on the
    full token grid."""

    r: int = 0
    schedule: str = "constant"
    prop_attn: bool = True
    keep_norm: bool = True
    restore: bool = False

    def __post_init__(self) -> None:
        if self.r < 0:
            raise ValueError(f"merge:r must be >= 0, got {self.r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"merge:schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")


@dataclass(frozen=True, kw_only=True)
class MergeReducer:
    """The reducer step of block ``index``: merge ``r`` tokens (clamped to what the block can merge)."""

    index: int
    r: int
    keep_norm: bool
    label: str
    needs: Needs = MERGE_NEEDS

    @property
    def detail(self) -> str:
        return f"merge r={self.r}"

    def reduce(self, encoder: SequenceEncoder, state: TokenState, info: AttentionInfo) -> TokenState:
        assert info.keys is not None
        return merge_state(state, info.keys, self.r, keep_norm=self.keep_norm)

    def tokens(self, encoder: SequenceEncoder, n: int) -> BlockTokens:
        """``n`` tokens into attention, ``n - r`` into the MLP, with the matching product of set A on B."""
        p = encoder.layout.num_prefix
        r = max(0, min(self.r, (n - p) // 2))
        extra: tuple[LinearOp, ...] = ()
        if r > 0:  # the alternating split runs over the whole sequence, protected tokens included
            na, nb = (n + 1) // 2, n // 2
            d = encoder.blocks[self.index].attn.head_dim
            extra = (
                LinearOp(
                    name=f"blocks.{self.index}.merge.match",
                    tokens=na,
                    in_features=d,
                    out_features=nb,
                    weight=False,
                ),
            )
        return BlockTokens(attn_tokens=n, mlp_tokens=n - r, extra=extra)


def merge_steps(model: Encoder, config: MergeConfig, plan: PlanBuilder) -> None:
    """A :class:`MergeReducer` in every block the schedule merges in."""
    assert isinstance(model, SequenceEncoder)
    rs = schedule_r(config, plan.depth, model.layout.num_patches)
    for i, r in enumerate(rs):
        if r > 0:
            plan.set_block(
                i, "reducer", MergeReducer(index=i, r=r, keep_norm=config.keep_norm, label=plan.current)
            )
    if any(rs):  # with nothing merged there is nothing to restore (and no source map to keep)
        plan.set_tokens(prop_attn=config.prop_attn, restore=config.restore)


# version 2: unmerged tokens keep their original order and the split runs over the whole sequence, as ToMe's
@register("merge", steps=merge_steps, compose=Composition(fills=frozenset({"reducer"})), version=2)
def _apply_merge(model: Encoder, config: MergeConfig) -> None:
    check_supported(model, "merge")
