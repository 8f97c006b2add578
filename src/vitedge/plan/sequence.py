"""The one runner of a sequence encoder's plan: vitedge's own pre-norm block loop.

A :class:`TokenState` carries the tokens, their sizes (how many original patches each token stands for) and,
when asked, their sources (which original tokens each one holds). :func:`run_sequence` walks the Encoder
view's blocks like the native pre-norm loop, but computes attention itself, so it can add the log-size bias
of proportional attention, call the block's attention step instead of the default product, and hand the
keys (for merging) or the class-token attention (for pruning) to the block's *reducer*, which shrinks the
state between the attention and the MLP, where ToMe and EViT act.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from vitedge.attention.batched import attention
from vitedge.models.base import AttentionView, BlockView, SequenceEncoder, Trace

if TYPE_CHECKING:
    from vitedge.plan import AttentionKernel, BlockPlan, ExecutionPlan, Reducer


@dataclass
class TokenState:
    """Tokens between blocks; the first ``num_prefix`` (class, distillation, register) are protected."""

    x: torch.Tensor  # (B, N, D)
    size: torch.Tensor | None  # (B, N, 1) patches per token; None while every size is 1
    source: torch.Tensor | None  # (B, N, N0) 0/1 membership of original tokens; None unless tracked
    num_prefix: int
    prop_attn: bool = True  # add log(size) to the attention scores of the keys
    index: torch.Tensor | None = None  # (B, N) original position of each token (-1: fused), pruning only


@dataclass
class AttentionInfo:
    """What a reducer may look at: keys averaged over heads, the class token's attention and, when asked,
    the attention per head with the norms of the values it weighs."""

    keys: torch.Tensor | None  # (B, N, head_dim)
    cls_attn: torch.Tensor | None  # (B, N) class-token attention averaged over heads
    attn_rows: torch.Tensor | None  # (B, N, N) full attention averaged over heads, only when asked
    head_attn: torch.Tensor | None = None  # (B, H, R, N) per head; R = 1 (class row) or N (attn_rows)
    value_norm: torch.Tensor | None = None  # (B, H, N) L2 norm of each value vector


@dataclass(frozen=True, kw_only=True)
class Needs:
    """What a reducer needs from the attention of its block."""

    keys: bool = False
    cls_attn: bool = False
    attn_rows: bool = False
    values: bool = False  # head_attn and value_norm too (with cls_attn or attn_rows)


NOTHING = Needs()


def split_heads(view: AttentionView, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as (B, H, N, head_dim) from fused or separate projections."""
    b, n, _ = x.shape
    h, d = view.num_heads, view.head_dim
    if view.qkv is not None:
        q, k, v = view.qkv(x).reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
    else:
        assert view.q is not None and view.k is not None and view.v is not None
        q, k, v = (lin(x).view(b, n, h, d).transpose(1, 2) for lin in (view.q, view.k, view.v))
    if view.q_norm is not None:
        q = view.q_norm(q)
    if view.k_norm is not None:
        k = view.k_norm(k)
    return q, k, v


def attend(
    view: AttentionView,
    x: torch.Tensor,
    size: torch.Tensor | None,
    needs: Needs,
    kernel: AttentionKernel | None = None,
) -> tuple[torch.Tensor, AttentionInfo]:
    """Multi-head attention of ``x`` (B, N, D) with the proportional-attention bias log(size) on the keys.

    The bias is an additive mask for :func:`vitedge.attention.batched.attention` (two batched products on CPU
    for short sequences, fused SDPA otherwise) or for ``kernel``, called as SDPA is.
    """
    b, n, _ = x.shape
    q, k, v = split_heads(view, x)
    bias = None if size is None else size.log().to(q.dtype).view(b, 1, 1, n)  # (B, 1, 1, N)
    if kernel is not None:
        out = kernel(q, k, v, attn_mask=bias, scale=view.scale)  # (B, H, N, d)
    else:  # two batched products for short (merged or pruned) sequences on CPU, else fused SDPA
        out = attention(q, k, v, bias, view.scale)
    out = out.transpose(1, 2).reshape(b, n, -1)
    if view.out_norm is not None:
        out = view.out_norm(out)
    out = view.proj(out)
    info = AttentionInfo(keys=None, cls_attn=None, attn_rows=None)
    if needs.keys:
        info.keys = k.mean(1)
    if needs.cls_attn or needs.attn_rows:
        rows = q if needs.attn_rows else q[:, :, :1]
        scores = (rows @ k.transpose(-2, -1)) * view.scale  # (B, H, R, N)
        if bias is not None:
            scores = scores + bias
        heads = scores.float().softmax(-1)  # (B, H, R, N)
        probs = heads.mean(1)  # (B, R, N)
        info.cls_attn = probs[:, 0]
        info.attn_rows = probs if needs.attn_rows else None
        if needs.values:
            info.head_attn = heads
            info.value_norm = v.float().norm(dim=-1)
    return out, info


def run_block(
    encoder: SequenceEncoder,
    view: BlockView,
    state: TokenState,
    reducer: Reducer | None = None,
    kernel: AttentionKernel | None = None,
) -> TokenState:
    """One pre-norm block: attention (with ``kernel``), then ``reducer``, then the MLP."""
    x = state.x
    size = state.size if state.prop_attn else None
    y, info = attend(view.attn, view.norm1(x), size, NOTHING if reducer is None else reducer.needs, kernel)
    state.x = x + view.drop1(view.ls1(y))  # drop1/drop2: stochastic depth, identity in eval mode
    del y  # not held through the MLP (timm's block frees it too): one residual stream less at the peak
    if reducer is not None:
        state = reducer.reduce(encoder, state, info)
    x = state.x
    state.x = x + view.drop2(view.ls2(view.mlp(view.norm2(x))))
    return state


def initial_state(
    encoder: SequenceEncoder,
    x: torch.Tensor,
    *,
    track_source: bool,
    prop_attn: bool = True,
    track_index: bool = False,
) -> TokenState:
    """The state entering the first block: every token its own, of size 1."""
    b, n, _ = x.shape
    source = None
    if track_source:
        source = torch.eye(n, dtype=x.dtype, device=x.device).expand(b, n, n)
    index = torch.arange(n, device=x.device).expand(b, n) if track_index else None
    return TokenState(
        x=x, size=None, source=source, num_prefix=encoder.layout.num_prefix, prop_attn=prop_attn, index=index
    )


def run_sequence(
    encoder: SequenceEncoder, plan: ExecutionPlan, x: torch.Tensor, trace: Trace | None
) -> torch.Tensor:
    """Every block of ``encoder`` under ``plan``: x (B, N, D) -> (B, N', D) (N' = N with ``restore``).

    With a ``trace``, the final :class:`TokenState` (sources tracked when ``trace.sources``) is left in
    ``trace.tokens``.
    """
    opts = plan.tokens
    state = initial_state(
        encoder,
        x,
        track_source=opts.restore or (trace is not None and trace.sources and plan.reduces_tokens),
        prop_attn=opts.prop_attn,
        track_index=opts.track_index,
    )
    for view, steps in zip(encoder.blocks, plan.blocks, strict=True):
        state = run_steps(encoder, view, steps, state, trace)
    if trace is not None:
        trace.tokens = state
    if opts.restore and state.source is not None:
        # Each original token takes its group's feature: (B, N0, N) @ (B, N, D).
        return state.source.transpose(1, 2) @ state.x
    return state.x


def run_steps(
    encoder: SequenceEncoder, view: BlockView, steps: BlockPlan, state: TokenState, trace: Trace | None
) -> TokenState:
    """One block under its plan steps: gate, attention kernel, reducer, MLP, exit."""
    kernel = steps.attention
    bind = getattr(kernel, "bind", None)
    if bind is not None:  # a step with model parameters (linformer's projections) takes them now
        kernel = bind(encoder)

    def block(st: TokenState) -> TokenState:
        return run_block(encoder, view, st, steps.reducer, kernel)

    state = block(state) if steps.gate is None else steps.gate(encoder, state, block)
    if steps.exit is not None:
        state = steps.exit(encoder, state, trace)
    return state


def ones_size(state: TokenState) -> torch.Tensor:
    b, n, _ = state.x.shape
    return torch.ones(b, n, 1, dtype=state.x.dtype, device=state.x.device)
