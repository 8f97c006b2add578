"""The execution plan: how an optimised encoder runs, as one explicit, inspectable object.

Every technique that changes *how* an encoder runs (rather than only its weights) contributes steps to one
:class:`ExecutionPlan`, held as ``encoder.plan`` (``None``: the wrapped library's own blocks run untouched,
bit-identical to the unmodified model). The plan has

- one :class:`BlockPlan` per block, with the steps of that block in run order:

  ``gate`` (before the block; may decide to skip or shorten it) -> attention, computed by ``attention`` (an
  SDPA-like kernel, e.g. ``int8attn``) or by vitedge's default (two batched products for short sequences on
  CPU, fused SDPA otherwise) -> ``reducer`` (between attention and MLP: token merging or pruning) -> MLP ->
  ``exit`` (after the block; may finish images early).

  On Swin, where attention runs per window, a ``window`` step runs the whole block on fewer windows or
  tokens (window pruning, window merging) and hands back the full grid.
- whole-model steps: ``autocast`` (the precision the forward runs under), ``router`` (splits a batch and
  runs each part with its own plan, as complexity-adaptive pruning does), ``compiled`` (a
  ``torch.compile``'d logits path, always last).

How it is built. ``vitedge.optimize_`` keeps the list of applied configs (``encoder.applied``). After each
technique is applied, the plan is rebuilt from that list: each registered technique's *steps* function adds
its steps to a fresh :class:`PlanBuilder`, in the order the user gave. A plan is therefore a pure function of
the model's structure and its configs: removing blocks (``structured:blocks``) after ``merge`` rebuilds the
merge schedule for the new depth, and a deep copy of the encoder carries a plan that holds no model state.

Who may fill a step is declared once per technique (``Composition`` in :mod:`vitedge.api`): a step is
exclusive, so ``merge`` and ``prune`` (both reducers) never stack, and :func:`vitedge.optimize_` refuses such
a stack before applying anything, naming both techniques.

Side outputs (token maps, sources, per-image keep rates) are never kept on the model: pass a
:class:`~vitedge.models.base.Trace` to :meth:`vitedge.models.base.Encoder.forward_traced` and the steps fill
it during that one call.

``vitedge optimize MODEL -O ... --explain`` prints the plan with the cost model's MACs per block
(:mod:`vitedge.plan.explain`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch

if TYPE_CHECKING:
    from vitedge.models.base import Encoder, SequenceEncoder, Trace
    from vitedge.models.spec import BlockTokens
    from vitedge.plan.sequence import AttentionInfo, Needs, TokenState

# Called like F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale): q, k, v (B, H, N, d),
# an additive score bias broadcastable to (B, H, N, N) or None -> (B, H, N, d).
AttentionKernel = Callable[..., torch.Tensor]

BLOCK_SLOTS = ("gate", "attention", "reducer", "exit", "window")
MODEL_SLOTS = ("autocast", "router", "compiled")
STEP_SLOTS = BLOCK_SLOTS + MODEL_SLOTS  # what a technique's Composition may say it fills

# Every block step has a ``label``, the -O string that put it there, and may have a ``detail`` property
# saying what it does in its block (``merge r=16``); ``--explain`` shows the detail, else the label.


class AttentionStep(Protocol):
    """Replaces the attention product of one block (q, k, v -> output), called like SDPA. A step whose
    kernel uses model parameters (linformer's projections) also has ``bind(encoder)``, which returns the
    kernel bound to them for one forward, so the plan itself holds no model state."""

    label: str

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor: ...


class Reducer(Protocol):
    """Shrinks the tokens of one block between its attention and its MLP (merging, pruning)."""

    label: str
    needs: Needs  # what the attention must hand over (keys, class-token attention, ...)

    def reduce(self, encoder: SequenceEncoder, state: TokenState, info: AttentionInfo) -> TokenState: ...

    def tokens(self, encoder: SequenceEncoder, n: int) -> BlockTokens:
        """Tokens into attention (``n``) and into the MLP, with the reducer's own matmul work."""
        ...


class Gate(Protocol):
    """Before a block: runs it (``run_block(state)``), or not, or on part of the batch."""

    label: str

    def __call__(
        self, encoder: SequenceEncoder, state: TokenState, run_block: Callable[[TokenState], TokenState]
    ) -> TokenState: ...


class Exit(Protocol):
    """After a block: sees the state leaving it and returns the state that goes on (it may record what it
    decided in the call's trace). The token loop keeps the batch whole; an exit that finishes images early
    returns their rows unchanged or hands the batch to a router that splits it."""

    label: str

    def __call__(self, encoder: SequenceEncoder, state: TokenState, trace: Trace | None) -> TokenState: ...


class WindowStep(Protocol):
    """Runs one Swin block on fewer windows or tokens; (B, H, W, C) in and out."""

    label: str

    def run(self, encoder: Any, block: Any, x: torch.Tensor, trace: Trace | None) -> torch.Tensor: ...

    def windows(self, windows: int) -> int:
        """Windows per image the block computes, out of ``windows``."""
        ...

    def window_tokens(self, window: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int]:
        """(tokens computed per window, destinations each source is compared with; 0: no matching)."""
        ...


class Router(Protocol):
    """Computes the logits of a batch itself, e.g. by splitting it and running each part with its own plan."""

    label: str

    def __call__(self, encoder: Encoder, x: torch.Tensor, trace: Trace | None) -> torch.Tensor: ...


@dataclass(frozen=True, kw_only=True)
class BlockPlan:
    """The steps of one block (``None``: the default for that step)."""

    index: int
    gate: Gate | None = None
    attention: AttentionStep | None = None
    reducer: Reducer | None = None
    exit: Exit | None = None
    window: WindowStep | None = None

    @property
    def native(self) -> bool:
        return all(getattr(self, s) is None for s in BLOCK_SLOTS)


@dataclass(frozen=True, kw_only=True)
class TokenOptions:
    """How the token loop of a sequence encoder keeps its state: the log-size bias of proportional attention
    (``prop_attn``), original token indices (``track_index``, for pruning's border protection), and whether
    the final tokens go back to the full grid (``restore``, via the source map)."""

    prop_attn: bool = True
    track_index: bool = False
    restore: bool = False


@dataclass(frozen=True, kw_only=True)
class ExecutionPlan:
    """How an encoder runs: one :class:`BlockPlan` per block, plus whole-model steps."""

    blocks: tuple[BlockPlan, ...]
    tokens: TokenOptions = TokenOptions()
    autocast: torch.dtype | None = None
    router: Router | None = None
    compiled: Callable[[Any, torch.Tensor], torch.Tensor] | None = None
    by: dict[str, str] = field(default_factory=dict)  # step slot -> the -O string that filled it

    @property
    def native_blocks(self) -> bool:
        """True when every block runs the wrapped library's own module."""
        return all(b.native for b in self.blocks)

    @property
    def reduces_tokens(self) -> bool:
        return any(b.reducer is not None for b in self.blocks)

    def run_blocks(self, encoder: SequenceEncoder, x: torch.Tensor, trace: Trace | None) -> torch.Tensor:
        """The blocks of a sequence encoder: x (B, N, D) from ``embed`` -> (B, N', D) for ``final_norm``."""
        if self.native_blocks:
            return encoder.native_blocks(x)
        from vitedge.plan.sequence import run_sequence

        return run_sequence(encoder, self, x, trace)

    def run_window_block(
        self, encoder: Any, i: int, block: Any, x: torch.Tensor, trace: Trace | None
    ) -> torch.Tensor:
        """Block ``i`` of a Swin encoder: x (B, H, W, C) -> (B, H, W, C)."""
        step = self.blocks[i].window
        return block(x) if step is None else step.run(encoder, block, x, trace)

    def block_tokens(self, encoder: SequenceEncoder) -> list[BlockTokens] | None:
        """Tokens each block sees under the plan's reducers (None: every block sees all tokens), for the cost
        model; ``restore`` adds the product that spreads the final tokens back over the grid."""
        if not self.reduces_tokens:
            return None
        from vitedge.models.spec import BlockTokens, LinearOp

        n = encoder.layout.num_tokens
        out: list[BlockTokens] = []
        for b in self.blocks:
            step = (
                BlockTokens(attn_tokens=n, mlp_tokens=n)
                if b.reducer is None
                else b.reducer.tokens(encoder, n)
            )
            out.append(step)
            n = step.tokens_out
        if self.tokens.restore:
            last = out[-1]
            n0 = encoder.layout.num_tokens
            dim = encoder.blocks[-1].attn.proj.out_features
            restore = LinearOp(name="restore", tokens=n0, in_features=n, out_features=dim, weight=False)
            out[-1] = replace(last, extra=(*last.extra, restore), out_tokens=n0)
        return out


class PlanBuilder:
    """What a technique's steps function fills: per-block steps and whole-model steps. Each slot takes one
    technique; :func:`vitedge.optimize_` has refused conflicting stacks before any builder runs, so a second
    claim here is a bug in a technique's declaration and raises RuntimeError."""

    def __init__(self, depth: int) -> None:
        self.blocks: list[dict[str, Any]] = [{} for _ in range(depth)]
        self.tokens = TokenOptions()
        self.model: dict[str, Any] = {}
        self.by: dict[str, str] = {}
        self.current = ""  # the -O string of the technique adding steps now

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def _claim(self, slot: str) -> None:
        owner = self.by.get(slot)
        if owner is not None and owner != self.current:
            raise RuntimeError(f"{self.current} and {owner} both fill the plan's {slot} step")
        self.by[slot] = self.current

    def set_block(self, i: int, slot: str, step: Any) -> None:
        """Put ``step`` in ``slot`` (gate, attention, reducer, exit, window) of block ``i``."""
        if slot not in BLOCK_SLOTS:
            raise ValueError(f"unknown block step {slot!r}; one of {', '.join(BLOCK_SLOTS)}")
        if not 0 <= i < self.depth:
            raise ValueError(f"block {i} is outside the encoder's {self.depth} blocks")
        self._claim(slot)
        self.blocks[i][slot] = step

    def set_model(self, slot: str, step: Any) -> None:
        """Put a whole-model step (autocast, router, compiled)."""
        if slot not in MODEL_SLOTS:
            raise ValueError(f"unknown whole-model step {slot!r}; one of {', '.join(MODEL_SLOTS)}")
        self._claim(slot)
        self.model[slot] = step

    def set_tokens(self, **options: Any) -> None:
        self.tokens = replace(self.tokens, **options)

    def build(self) -> ExecutionPlan | None:
        """The plan, or None when nothing departs from the native run."""
        blocks = tuple(BlockPlan(index=i, **steps) for i, steps in enumerate(self.blocks))
        plan = ExecutionPlan(blocks=blocks, tokens=self.tokens, by=dict(self.by), **self.model)
        if plan.native_blocks and not self.model:
            return None
        return plan


__all__ = [
    "BLOCK_SLOTS",
    "MODEL_SLOTS",
    "STEP_SLOTS",
    "AttentionKernel",
    "AttentionStep",
    "BlockPlan",
    "ExecutionPlan",
    "Exit",
    "Gate",
    "PlanBuilder",
    "Reducer",
    "Router",
    "TokenOptions",
    "WindowStep",
]
