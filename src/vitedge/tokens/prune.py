"""Token pruning with pluggable scorers (seed 22.1.3), ``-O prune:keep=...``.

At each pruning block, after attention, every patch token gets an importance score; the top ``keep`` fraction
stays and the rest are fused into one token (EViT), weighted by their scores, so their content is not simply
lost. Class, distillation and register tokens always stay; ``protect_border`` also keeps the patches on the
image border (useful when a VLM crops or tiles). Scorers:

- ``attn``: attention the class token pays to each token (EViT); models without a class token use the mean
  attention each token receives;
- ``attn-value``: that attention per head times the norm of the token's value vector, summed over heads
  (ATS): a token matters by how much of the class token's output it writes, not only by how much it is looked
  at;
- ``norm``: L2 norm of the token; ``variance``: variance over channels;
- ``entropy``: negative entropy of the token's own attention row (focused tokens carry more);
- ``learned``: ``attn`` in log space plus a small MLP per pruning block that the training loop learns
  (:mod:`vitedge.tokens.scorer`; train it with ``vitedge train MODEL -O prune:...,scorer=learned
  --train-only token_scorers``). The MLPs live in ``encoder.token_scorers``, so they are saved with the
  weights of a trained model directory. Untrained, it ranks tokens as ``attn`` does.

What happens to the pruned tokens (``fuse``):

- ``one`` (default, EViT): fused into one extra token, averaged with their scores' softmax weights;
- ``nearest``: each pruned token joins the kept token whose attention key (averaged over heads) is most
  similar, by a size-weighted average that keeps the largest norm among the members (MLERP, as ``merge``
  does); sizes feed proportional attention. The scorer still picks which tokens go; the fold only decides
  where their content lands, so a pruned patch lives on in a token that looks like it rather than in one
  token shared by every pruned patch of the image;
- ``none``: dropped (``fuse=false``; ``fuse=true`` means ``one``).

Schedules: ``stages`` prunes at 1/4, 1/2 and 3/4 of the depth (EViT's blocks 4, 7, 10 of 12), ``every`` at
every block; ``start`` skips the blocks before it (``schedule=every,start=2``: every block from the third
on). ``keep`` is the fraction kept at each pruning block.

Training-free, on cifar-vit (10,000 CIFAR-10 test images, 85.29 %), at about 1.4-1.5x: ``keep=0.7`` with the
defaults (three cuts, one fused token, ``attn``) loses 4.73 pp; folding instead (``fuse=nearest``) 1.32 pp;
gentle cuts in every block from the third (``schedule=every,start=2,keep=0.82``) 1.12 pp; ranking by
``attn-value`` on top 0.91 pp. Where the pruned patches' content lands matters more than which patches go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vitedge.api import Composition, register
from vitedge.models.base import Encoder, SequenceEncoder
from vitedge.models.spec import BlockTokens, LinearOp
from vitedge.plan import PlanBuilder
from vitedge.plan.sequence import AttentionInfo, Needs, TokenState, ones_size
from vitedge.tokens.runner import check_supported, flat_rows, rows_of
from vitedge.tokens.scorer import TokenScorers, scorer_hidden

SCORERS = ("attn", "attn-value", "norm", "variance", "entropy")  # fixed scorers, no parameters
LEARNED = "learned"
PRUNE_SCORERS = (*SCORERS, LEARNED)
ATTN_SCORERS = ("attn", "attn-value", LEARNED)  # rank by attention (learned adds to the attention score)
SCHEDULES = ("stages", "every")
FUSES = ("one", "nearest", "none")


def score_tokens(scorer: str, x: torch.Tensor, info: AttentionInfo, num_prefix: int) -> torch.Tensor:
    """Importance (B, Np) of the patch tokens of ``x`` (B, N, D); higher is more important."""
    p = num_prefix
    if scorer == "attn":
        if num_prefix > 0:
            assert info.cls_attn is not None
            return info.cls_attn[:, p:]
        assert info.attn_rows is not None
        return info.attn_rows.mean(1)[:, p:]
    if scorer == "attn-value":
        assert info.head_attn is not None and info.value_norm is not None
        rows = info.head_attn[:, :, 0] if num_prefix > 0 else info.head_attn.mean(2)  # (B, H, N)
        written = (rows * info.value_norm).sum(1)[:, p:]  # (B, Np)
        return written / written.sum(1, keepdim=True).clamp_min(1e-12)
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
    fuse: str = "one",
    keys: torch.Tensor | None = None,
    protect: torch.Tensor | None = None,
) -> TokenState:
    """Keep the ``keep`` fraction of patch tokens with the highest ``scores`` (B, Np); the rest are fused into
    one token (``fuse="one"``), folded into their nearest kept token by ``keys`` (B, N, C) (``"nearest"``) or
    dropped (``"none"``).

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
    if fuse == "nearest":
        assert keys is not None, "fuse=nearest needs the attention keys"
        return fold_nearest(state, keys, keep_idx, drop_idx)
    size = state.size if state.size is not None else ones_size(state)

    def take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return rows_of(t, idx + p)

    parts_x = [x[:, :p], take(x, keep_idx)]
    parts_s = [size[:, :p], take(size, keep_idx)]
    parts_src = None if state.source is None else [state.source[:, :p], take(state.source, keep_idx)]
    index = (
        None
        if state.index is None
        else torch.cat([state.index[:, :p], state.index[:, p:].gather(1, keep_idx)], 1)
    )
    if fuse == "one":
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


def fold_nearest(
    state: TokenState, keys: torch.Tensor, keep_idx: torch.Tensor, drop_idx: torch.Tensor
) -> TokenState:
    """Fold each dropped patch (``drop_idx`` (B, Nd)) into the kept patch (``keep_idx`` (B, Nk)) whose key in
    ``keys`` (B, N, C) is most similar: size-weighted average, rescaled to the largest norm of the members.

    The average's direction is that of the size-weighted sum, so the sum is rescaled to the peak norm directly
    (no division by the sizes); the kept rows, prefix included, are copied once into the output.
    """
    p = state.num_prefix
    x = state.x
    b, _, d = x.shape
    prefix = torch.arange(p, device=x.device).expand(b, p)
    out_idx = torch.cat([prefix, keep_idx + p], 1)  # (B, P + Nk) rows of x that stay
    drop_rows = drop_idx + p
    with torch.no_grad():
        metric = keys / keys.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        sim = rows_of(metric, drop_rows) @ rows_of(metric, keep_idx + p).transpose(1, 2)  # (B, Nd, Nk)
        into = sim.argmax(-1) + p  # (B, Nd) output row each dropped patch joins
    m = out_idx.shape[1]
    flat_into = flat_rows(into, m)
    x = x.contiguous()
    norms = x.norm(dim=-1, keepdim=True)  # (B, N, 1)
    peak = rows_of(norms, out_idx)  # (B, P + Nk, 1) largest norm among each output token's members
    peak.scatter_reduce_(1, into[..., None], rows_of(norms, drop_rows), reduce="amax")
    total = rows_of(x, out_idx)  # (B, P + Nk, D)
    dropped = rows_of(x, drop_rows)
    if state.size is None:  # every size 1: plain sums
        size, drop_size = torch.ones_like(peak), torch.ones_like(into[..., None], dtype=peak.dtype)
    else:
        size, drop_size = rows_of(state.size, out_idx), rows_of(state.size, drop_rows)
        total, dropped = total * size, dropped * drop_size
    size = size.view(-1).index_add(0, flat_into, drop_size.view(-1))
    if torch.is_grad_enabled() and x.requires_grad:  # training: out of place, autograd keeps its inputs
        total = total.view(-1, d).index_add(0, flat_into, dropped.view(-1, d)).view(b, m, d)
        total = total * (peak / total.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    else:  # in place: an out-of-place broadcast multiply costs 30x more here on CPU
        total.view(-1, d).index_add_(0, flat_into, dropped.view(-1, d))
        total.mul_(peak / total.norm(dim=-1, keepdim=True).clamp_min(1e-6))
    source = None
    if state.source is not None:
        src = state.source
        source = rows_of(src, out_idx).scatter_reduce_(
            1, into[..., None].expand(-1, -1, src.shape[-1]), rows_of(src, drop_rows), reduce="amax"
        )
    index = None if state.index is None else state.index.gather(1, out_idx)
    return TokenState(
        x=total, size=size.view(b, m, 1), source=source, num_prefix=p, prop_attn=state.prop_attn, index=index
    )


def prune_blocks(schedule: str, depth: int, start: int = 0) -> list[int]:
    """Blocks that prune (after their attention) under ``schedule``, none before block ``start``."""
    if schedule == "every":
        return list(range(start, depth))
    return [b for b in sorted({max(0, round(depth * q / 4)) for q in (1, 2, 3)} - {depth}) if b >= start]


@dataclass(frozen=True, kw_only=True)
class PruneConfig:
    """``keep``: fraction of patch tokens kept at each pruning block (1.0 = off); ``scorer`` (one of
    :data:`PRUNE_SCORERS`); ``schedule`` and ``start`` (first block that may prune); ``fuse``: what becomes of
    the pruned tokens (:data:`FUSES`; ``true``/``false`` read as ``one``/``none``); ``protect_border`` keeps
    border patches."""

    keep: float = 1.0
    scorer: str = "attn"
    schedule: str = "stages"
    fuse: bool | str = "one"
    protect_border: bool = False
    start: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.keep <= 1.0:
            raise ValueError(f"prune:keep must be in (0, 1], got {self.keep}")
        if self.scorer not in PRUNE_SCORERS:
            raise ValueError(f"prune:scorer must be one of {', '.join(PRUNE_SCORERS)}, got {self.scorer!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"prune:schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if isinstance(self.fuse, bool):  # the older true/false spelling, kept for saved model directories
            object.__setattr__(self, "fuse", "one" if self.fuse else "none")
        if self.fuse not in FUSES:
            raise ValueError(
                f"prune:fuse must be one of {', '.join(FUSES)} (or true/false), got {self.fuse!r}"
            )
        if self.start < 0:
            raise ValueError(f"prune:start must be >= 0, got {self.start}")
        if self.scorer == LEARNED and self.fuse != "one":
            raise ValueError(
                "prune:scorer=learned learns through the weights of the one fused token; it needs fuse=one"
            )


@dataclass(frozen=True, kw_only=True)
class PruneReducer:
    """The reducer step of block ``index``, the ``ordinal``-th pruning block: keep the ``config.keep``
    fraction of patch tokens by the configured scorer."""

    index: int
    ordinal: int
    count: int  # pruning blocks in all (the learned scorer has one MLP each)
    config: PruneConfig
    label: str
    needs: Needs

    @property
    def detail(self) -> str:
        return f"prune keep={self.config.keep:g} ({self.config.scorer}, fuse={self.config.fuse})"

    def reduce(self, encoder: SequenceEncoder, state: TokenState, info: AttentionInfo) -> TokenState:
        config, p = self.config, state.num_prefix
        if config.scorer == LEARNED:
            scorers = attached_scorers(encoder, self.count)
            size = None if state.size is None else state.size[:, p:]
            prior = score_tokens("attn", state.x, info, p)
            scores = scorers.scores(self.ordinal, prior, state.x[:, p:], size, training=encoder.training)
        else:
            scores = score_tokens(config.scorer, state.x, info, p)
        protect = None
        if config.protect_border and state.index is not None:
            idx = state.index[:, p:]
            protect = border_mask(idx, encoder.layout.grid, p) & (idx >= p)
        return prune_state(state, scores, config.keep, fuse=str(config.fuse), keys=info.keys, protect=protect)

    def tokens(self, encoder: SequenceEncoder, n: int) -> BlockTokens:
        """``n`` tokens into attention, the kept ones (plus a fused token) into the MLP, with the score
        products (class-token or full attention rows), the scorer MLP and the fold's similarity."""
        config, i = self.config, self.index
        a = encoder.blocks[i].attn
        p = encoder.layout.num_prefix
        gh, gw = encoder.layout.grid
        border = 2 * (gh + gw) - 4 if config.protect_border else 0
        rows_needed = config.scorer == "entropy" or (config.scorer in ATTN_SCORERS and p == 0)
        extra: tuple[LinearOp, ...] = ()
        if config.scorer in (*ATTN_SCORERS, "entropy"):
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
        m = n if n_keep >= n_patch else p + n_keep + (1 if config.fuse == "one" else 0)
        if config.fuse == "nearest" and n_keep < n_patch:  # similarity of the pruned keys to the kept ones
            extra += (
                LinearOp(
                    name=f"blocks.{i}.prune.fold",
                    tokens=n_patch - n_keep,
                    in_features=a.head_dim,
                    out_features=n_keep,
                    weight=False,
                ),
            )
        return BlockTokens(attn_tokens=n, mlp_tokens=m, extra=extra)


def prune_needs(config: PruneConfig, num_prefix: int) -> Needs:
    """What the pruning blocks need from attention; models without a class token rank by full rows."""
    attn_like = config.scorer in ATTN_SCORERS
    nearest = config.fuse == "nearest"
    values = config.scorer == "attn-value"
    if attn_like and num_prefix == 0:
        return Needs(attn_rows=True, keys=nearest, values=values)
    return Needs(cls_attn=attn_like, attn_rows=config.scorer == "entropy", keys=nearest, values=values)


def prune_steps(model: Encoder, config: PruneConfig, plan: PlanBuilder) -> None:
    """A :class:`PruneReducer` in every block the schedule prunes in; the token loop tracks indices."""
    assert isinstance(model, SequenceEncoder)
    if config.keep >= 1.0:
        return  # neutral: the native blocks run untouched
    at = prune_blocks(config.schedule, plan.depth, config.start)
    needs = prune_needs(config, model.layout.num_prefix)
    for j, i in enumerate(at):
        reducer = PruneReducer(
            index=i, ordinal=j, count=len(at), config=config, label=plan.current, needs=needs
        )
        plan.set_block(i, "reducer", reducer)
    plan.set_tokens(track_index=True)


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


def scorer_ops(name: str, tokens: int, dim: int) -> tuple[LinearOp, ...]:
    """The two linears of one scorer MLP over ``tokens`` patch tokens of width ``dim``."""
    hidden = scorer_hidden(dim)
    return (
        LinearOp(name=f"{name}.fc1", tokens=tokens, in_features=2 * dim, out_features=hidden),
        LinearOp(name=f"{name}.fc2", tokens=tokens, in_features=hidden, out_features=1),
    )


@register("prune", steps=prune_steps, compose=Composition(fills=frozenset({"reducer"})))
def _apply_prune(model: Encoder, config: PruneConfig) -> None:
    check_supported(model, "prune")
    assert isinstance(model, SequenceEncoder)
    if config.scorer == LEARNED and config.keep < 1.0:
        attach_scorers(model, len(prune_blocks(config.schedule, len(model.blocks), config.start)))
