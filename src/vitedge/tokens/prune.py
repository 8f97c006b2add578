"""Token pruning with pluggable scorers (seed 22.1.3), ``-O prune:keep=...``.

At each pruning block, after attention, every patch token gets an importance score; the top ``keep`` fraction
stays and the rest are fused into one token (EViT), weighted by their scores, so their content is not simply
lost. Class, distillation and register tokens always stay; ``protect_border`` also keeps the patches on the
image border (useful when a VLM crops or tiles). Scorers:

- ``attn``: attention the class token pays to each token (EViT); models without a class token use the mean
  attention each token receives;
- ``norm``: L2 norm of the token; ``variance``: variance over channels;
- ``entropy``: negative entropy of the token's own attention row (focused tokens carry more);
- ``learned``: ``attn`` in log space plus a small MLP per pruning block that the training loop learns
  (:mod:`vitedge.tokens.scorer`; train it with ``vitedge train MODEL -O prune:...,scorer=learned
  --train-only token_scorers``). The MLPs live in ``encoder.token_scorers``, so they are saved with the
  weights of a trained model directory. Untrained, it ranks tokens as ``attn`` does.

Schedules: ``stages`` prunes at 1/4, 1/2 and 3/4 of the depth (EViT's blocks 4, 7, 10 of 12), ``every`` at
every block; ``keep`` is the fraction kept at each pruning block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitedge.api import register
from vitedge.models.base import Encoder, SequenceEncoder
from vitedge.models.spec import BlockTokens, LinearOp
from vitedge.tokens.runner import (
    AttentionInfo,
    Needs,
    TokenState,
    check_supported,
    initial_state,
    ones_size,
    run_block,
)
from vitedge.tokens.scorer import TokenScorers, scorer_hidden
from vitedge.tokens.windows import install_window_pruning

SCORERS = ("attn", "norm", "variance", "entropy")  # fixed scorers, no parameters
LEARNED = "learned"
PRUNE_SCORERS = (*SCORERS, LEARNED)
SCHEDULES = ("stages", "every")


def score_tokens(scorer: str, x: torch.Tensor, info: AttentionInfo, num_prefix: int) -> torch.Tensor:
    """Importance (B, Np) of the patch tokens of ``x`` (B, N, D); higher is more important."""
    p = num_prefix
    if scorer == "attn":
        if num_prefix > 0:
            assert info.cls_attn is not None
            return info.cls_attn[:, p:]
        assert info.attn_rows is not None
        return info.attn_rows.mean(1)[:, p:]
    if scorer == "norm":
        return x[:, p:].float().norm(dim=-1)
    if scorer == "variance":
        return x[:, p:].float().var(dim=-1)
    assert info.attn_rows is not None  # entropy
    rows = info.attn_rows[:, p:].clamp_min(1e-12)
    return (rows * rows.log()).sum(-1)  # = -entropy


def border_mask(index: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> torch.Tensor:
    """True where a token (by its original index, prefix first) lies on the border of the patch grid."""
    gh, gw = grid
    pos = index - num_prefix
    row, col = pos // gw, pos % gw
    return (row == 0) | (row == gh - 1) | (col == 0) | (col == gw - 1)


def prune_state(
    state: TokenState,
    scores: torch.Tensor,
    keep: float,
    *,
    fuse: bool = True,
    protect: torch.Tensor | None = None,
) -> TokenState:
    """Keep the ``keep`` fraction of patch tokens with the highest ``scores`` (B, Np); fuse the rest into one.

    ``protect`` (B, Np) marks tokens that must stay whatever their score. Gradients reach ``scores`` only
    through the fused token's softmax weights (how the learned scorer trains).
    """
    p = state.num_prefix
    x = state.x
    b, n, _ = x.shape
    n_patch = n - p
    n_keep = max(1, math.ceil(keep * n_patch))
    if protect is not None:  # protected tokens stay even where that keeps more than asked
        n_keep = max(n_keep, int(protect.sum(1).max()))
    if n_keep >= n_patch:
        return state
    ranked = scores.float()
    if protect is not None:
        ranked = ranked.masked_fill(protect, float("inf"))
    order = ranked.argsort(dim=1, descending=True)
    keep_idx = order[:, :n_keep].sort(dim=1).values  # keep spatial order
    drop_idx = order[:, n_keep:]
    size = state.size if state.size is not None else ones_size(state)

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        patches = t[:, p:]
        return patches.gather(1, idx[..., None].expand(-1, -1, patches.shape[-1]))

    parts_x = [x[:, :p], take(x, keep_idx)]
    parts_s = [size[:, :p], take(size, keep_idx)]
    parts_src = None if state.source is None else [state.source[:, :p], take(state.source, keep_idx)]
    index = (
        None
        if state.index is None
        else torch.cat([state.index[:, :p], state.index[:, p:].gather(1, keep_idx)], 1)
    )
    if fuse:
        w = scores.float().gather(1, drop_idx).softmax(dim=1)[..., None].to(x.dtype)  # (B, Nd, 1)
        ds = take(size, drop_idx)
        fused = (take(x, drop_idx) * w * ds).sum(1, keepdim=True) / (w * ds).sum(1, keepdim=True)
        parts_x.append(fused)
        parts_s.append(ds.sum(1, keepdim=True))
        if parts_src is not None:
            parts_src.append(take(state.source, drop_idx).amax(1, keepdim=True))  # type: ignore[arg-type]
        if index is not None:
            index = torch.cat([index, torch.full((b, 1), -1, dtype=index.dtype, device=index.device)], 1)
    return TokenState(
        x=torch.cat(parts_x, 1),
        size=torch.cat(parts_s, 1),
        source=None if parts_src is None else torch.cat(parts_src, 1),
        num_prefix=p,
        prop_attn=state.prop_attn,
        index=index,
    )


def prune_blocks(schedule: str, depth: int) -> list[int]:
    if schedule == "every":
        return list(range(depth))
    return sorted({max(0, round(depth * q / 4)) for q in (1, 2, 3)} - {depth})


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """``keep``: fraction of patch tokens kept at each pruning block (1.0 = off); ``scorer`` (one of
    :data:`PRUNE_SCORERS`); ``schedule``; ``fuse`` the pruned tokens into one; ``protect_border`` keeps border
    patches."""

    keep: float = 1.0
    scorer: str = "attn"
    schedule: str = "stages"
    fuse: bool = True
    protect_border: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"prune:keep must be in (0, 1], got {self.keep}")
        if self.scorer not in PRUNE_SCORERS:
            raise ValueError(f"prune:scorer must be one of {', '.join(PRUNE_SCORERS)}, got {self.scorer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"prune:schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.scorer == LEARNED and not self.fuse:
            raise ValueError(
                "prune:scorer=learned learns through the weights of the fused token; it needs fuse=true"
            )


def prune_runner(
    config: PruneConfig, *, track_source: bool = False
) -> Callable[[SequenceEncoder, torch.Tensor], torch.Tensor]:
    attn_like = config.scorer in ("attn", LEARNED)  # the learned scorer adds to the attention score
    needs = Needs(cls_attn=attn_like, attn_rows=config.scorer == "entropy")

    def run(encoder: SequenceEncoder, x: torch.Tensor) -> torch.Tensor:
        views = encoder.blocks
        at = set(prune_blocks(config.schedule, len(views)))
        state = initial_state(encoder, x, track_source=track_source or encoder.track_sources)
        b, n, _ = x.shape
        state.index = torch.arange(n, device=x.device).expand(b, n)
        p = state.num_prefix
        block_needs = needs
        if attn_like and p == 0:
            block_needs = Needs(attn_rows=True)
        scorers = attached_scorers(encoder, len(at)) if config.scorer == LEARNED else None
        ordinal = {b: j for j, b in enumerate(sorted(at))}

        def reduce(i: int, st: TokenState, info: AttentionInfo) -> TokenState:
            if scorers is None:
                scores = score_tokens(config.scorer, st.x, info, p)
            else:
                size = None if st.size is None else st.size[:, p:]
                prior = score_tokens("attn", st.x, info, p)
                scores = scorers.scores(ordinal[i], prior, st.x[:, p:], size, training=encoder.training)
            protect = None
            if config.protect_border and st.index is not None:
                protect = border_mask(st.index[:, p:], encoder.layout.grid, p) & (st.index[:, p:] >= p)
            return prune_state(st, scores, config.keep, fuse=config.fuse, protect=protect)

        for i, view in enumerate(views):
            state = run_block(
                view, state, i, reduce if i in at else None, block_needs, encoder.attention_kernel
            )
        encoder.token_state = state
        return state.x

    return run


def attached_scorers(encoder: SequenceEncoder, count: int) -> TokenScorers:
    """The ``count`` scorer MLPs that ``optimize_`` attached to ``encoder`` for ``prune:scorer=learned``."""
    scorers = getattr(encoder, "token_scorers", None)
    if not isinstance(scorers, TokenScorers) or len(scorers.mlps) != count:
        raise ValueError(
            f"prune:scorer=learned needs {count} scorer MLPs in encoder.token_scorers; apply it with "
            "vitedge.optimize_(model, PruneConfig(..., scorer='learned')), which attaches them"
        )
    return scorers


def attach_scorers(encoder: SequenceEncoder, count: int) -> None:
    """Register fresh (untrained) scorer MLPs as ``encoder.token_scorers``, so they are in its state dict."""
    dim = encoder.blocks[0].attn.proj.out_features
    ref = next(encoder.parameters())
    scorers = TokenScorers(dim, count).to(device=ref.device, dtype=encoder.compute_dtype)
    encoder.add_module("token_scorers", scorers)


def prune_plan(config: PruneConfig, encoder: SequenceEncoder) -> list[BlockTokens]:
    """Tokens per block under ``config``, with the score products (class-token or full attention rows)."""
    views = encoder.blocks
    at = set(prune_blocks(config.schedule, len(views)))
    p = encoder.layout.num_prefix
    gh, gw = encoder.layout.grid
    border = 2 * (gh + gw) - 4 if config.protect_border else 0
    rows_needed = config.scorer == "entropy" or (config.scorer in ("attn", LEARNED) and p == 0)
    n = encoder.layout.num_tokens
    plan: list[BlockTokens] = []
    for i, view in enumerate(views):
        if i not in at:
            plan.append(BlockTokens(attn_tokens=n, mlp_tokens=n))
            continue
        a = view.attn
        extra: tuple[LinearOp, ...] = ()
        if config.scorer in ("attn", "entropy", LEARNED):
            rows = n if rows_needed else 1
            extra = (
                LinearOp(
                    name=f"blocks.{i}.prune.scores",
                    tokens=a.num_heads * rows,
                    in_features=a.head_dim,
                    out_features=n,
                    weight=False,
                ),
            )
        n_patch = n - p
        if config.scorer == LEARNED:
            extra += scorer_ops(f"blocks.{i}.prune.scorer", n_patch, a.proj.out_features)
        n_keep = max(1, math.ceil(config.keep * n_patch), min(border, n_patch))
        m = n if n_keep >= n_patch else p + n_keep + (1 if config.fuse else 0)
        plan.append(BlockTokens(attn_tokens=n, mlp_tokens=m, extra=extra))
        n = m
    return plan


def scorer_ops(name: str, tokens: int, dim: int) -> tuple[LinearOp, ...]:
    """The two linears of one scorer MLP over ``tokens`` patch tokens of width ``dim``."""
    hidden = scorer_hidden(dim)
    return (
        LinearOp(name=f"{name}.fc1", tokens=tokens, in_features=2 * dim, out_features=hidden),
        LinearOp(name=f"{name}.fc2", tokens=tokens, in_features=hidden, out_features=1),
    )


@register("prune")
def _apply_prune(model: Encoder, config: PruneConfig) -> None:
    if config.keep >= 1.0:
        return  # neutral: the native blocks run untouched
    if model.info.family == "swin":  # whole windows, so the window structure survives
        if getattr(model, "block_runner", None) is not None:
            raise ValueError("prune cannot stack on another token-reduction technique on this Swin model")
        install_window_pruning(model, config.keep, config.scorer)
        return
    check_supported(model, "prune")  # type: ignore[arg-type]
    assert isinstance(model, SequenceEncoder)
    if model.block_runner is not None:
        raise ValueError("prune cannot stack on another token-reduction technique (merge, prune or adaptive)")
    if config.scorer == LEARNED:
        attach_scorers(model, len(prune_blocks(config.schedule, len(model.blocks))))
    model.block_runner = prune_runner(config)
    model.token_plan = lambda enc: prune_plan(config, enc)
