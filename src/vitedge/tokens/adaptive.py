"""Complexity-adaptive token pruning (seed 22.1.3, 22.2.2), ``-O adaptive:...``.

Each image gets its own keep rate from its visual complexity: the mean Shannon entropy of the grey-level
histograms of its patches (flat sky: low; foliage, text: high), mapped linearly from ``[low, high]`` bits onto
``[min_keep, max_keep]``. Mixed budgets in one batch are handled by *grouping*: keep rates are rounded to
``buckets`` levels, the images of each level run together through the pruning runner with that keep rate, and
the outputs are put back in input order. Grouping keeps every sub-batch dense (no padding, no masks), at the
cost of one forward per distinct level present in the batch.

In the execution plan this is the whole-model *router* step (:class:`AdaptiveRouter`): each group runs the
encoder's plan with ``prune``'s reducers for its keep rate added, so an attention step stacked before or
after (``int8attn``) applies in every group.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vitedge.api import Composition, register
from vitedge.models.base import Encoder, SequenceEncoder, Trace
from vitedge.plan import ExecutionPlan, PlanBuilder
from vitedge.tokens.prune import SCORERS, PruneConfig, prune_steps
from vitedge.tokens.runner import check_supported

HIST_BINS = 16


def patch_entropy(x: torch.Tensor, patch: int, bins: int = HIST_BINS) -> torch.Tensor:
    """Mean grey-level histogram entropy (bits) of the ``patch``-square tiles of ``x`` (B, C, H, W) -> (B,).

    Values are min-max scaled per image first, so the measure ignores the normalisation constants.
    """
    g = x.float().mean(1)  # (B, H, W)
    b = g.shape[0]
    lo = g.flatten(1).amin(1).view(b, 1, 1)
    hi = g.flatten(1).amax(1).view(b, 1, 1)
    g = (g - lo) / (hi - lo).clamp_min(1e-6)
    tiles = g.unfold(1, patch, patch).unfold(2, patch, patch).reshape(b, -1, patch * patch)  # (B, P, p*p)
    idx = (tiles * (bins - 1)).round().long()
    counts = torch.zeros(b, tiles.shape[1], bins).scatter_add_(2, idx, torch.ones_like(tiles))
    prob = counts / counts.sum(-1, keepdim=True)
    ent = -(prob * prob.clamp_min(1e-12).log2()).sum(-1)  # (B, P)
    return ent.mean(1)


@dataclass(frozen=True, kw_only=True)
class AdaptiveConfig:
    """Keep rate per image in [``min_keep``, ``max_keep``] from patch entropy in [``low``, ``high``] bits,
    rounded to ``buckets`` levels; pruning uses ``scorer`` at the ``stages`` blocks."""

    min_keep: float = 0.5
    max_keep: float = 1.0
    low: float = 1.0
    high: float = 3.5
    buckets: int = 3
    scorer: str = "attn"

    def __post_init__(self) -> None:
        if not 0.0 < self.min_keep <= self.max_keep <= 1.0:
            raise ValueError(
                f"adaptive needs 0 < min_keep <= max_keep <= 1, got {self.min_keep} and {self.max_keep}"
            )
        if not 0.0 <= self.low < self.high:
            raise ValueError(f"adaptive needs 0 <= low < high (bits), got {self.low} and {self.high}")
        if self.buckets < 1:
            raise ValueError(f"adaptive:buckets must be >= 1, got {self.buckets}")
        if self.scorer not in SCORERS:
            raise ValueError(f"adaptive:scorer must be one of {', '.join(SCORERS)}, got {self.scorer!r}")

    def levels(self) -> list[float]:
        if self.buckets == 1:
            return [self.max_keep]
        step = (self.max_keep - self.min_keep) / (self.buckets - 1)
        return [self.min_keep + i * step for i in range(self.buckets)]


def keep_rates(config: AdaptiveConfig, x: torch.Tensor, patch: int) -> torch.Tensor:
    """The bucketed keep rate of each image (B,)."""
    ent = patch_entropy(x, patch)
    t = ((ent - config.low) / (config.high - config.low)).clamp(0, 1)
    raw = config.min_keep + t * (config.max_keep - config.min_keep)
    levels = torch.tensor(config.levels())
    return levels[(raw[:, None] - levels[None]).abs().argmin(1)]


def level_plan(encoder: SequenceEncoder, plan: ExecutionPlan, prune: ExecutionPlan | None) -> ExecutionPlan:
    """``plan`` (the encoder's, router dropped) with the reducers of ``prune`` (one keep level) added."""
    if prune is None:
        return replace(plan, router=None)
    blocks = tuple(
        b if p.reducer is None else replace(b, reducer=p.reducer)
        for b, p in zip(plan.blocks, prune.blocks, strict=True)
    )
    return replace(plan, blocks=blocks, tokens=prune.tokens, router=None)


@dataclass(frozen=True, kw_only=True)
class AdaptiveRouter:
    """The router step: group a batch by keep rate and run each group with its level's pruning."""

    config: AdaptiveConfig
    levels: dict[
        float, ExecutionPlan | None
    ]  # keep rate -> the pruning plan of that level (None: no pruning)
    label: str

    def __call__(self, encoder: Encoder, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        """Logits (B, K) with each group of images pruned at its own keep rate, in input order."""
        assert isinstance(encoder, SequenceEncoder) and encoder.plan is not None
        patch = encoder.img_size[0] // encoder.layout.grid[0]
        keeps = keep_rates(self.config, x, patch)
        out: torch.Tensor | None = None
        for keep in keeps.unique().tolist():
            idx = (keeps == keep).nonzero().flatten()
            xs = x[idx]
            encoder.check_size(xs)
            plan = level_plan(encoder, encoder.plan, self.levels[keep])
            y = encoder.forward_head(encoder.final_norm(plan.run_blocks(encoder, encoder.embed(xs), trace)))
            if out is None:
                out = y.new_empty(x.shape[0], *y.shape[1:])
            out[idx] = y
        assert out is not None
        if trace is not None:
            trace.keep = keeps
        return out


def adaptive_steps(model: Encoder, config: AdaptiveConfig, plan: PlanBuilder) -> None:
    if config.min_keep >= 1.0:
        return  # neutral
    assert isinstance(model, SequenceEncoder)
    levels: dict[float, ExecutionPlan | None] = {}
    for keep in torch.tensor(config.levels()).tolist():  # the float32 values keep_rates hands out
        sub = PlanBuilder(plan.depth)
        sub.current = plan.current
        if keep < 1.0:
            prune_steps(model, PruneConfig(keep=keep, scorer=config.scorer), sub)
        levels[keep] = sub.build()
    plan.set_model("router", AdaptiveRouter(config=config, levels=levels, label=plan.current))


@register("adaptive", steps=adaptive_steps, compose=Composition(fills=frozenset({"router", "reducer"})))
def _apply_adaptive(model: Encoder, config: AdaptiveConfig) -> None:
    check_supported(model, "adaptive")
