"""Linformer (Wang et al. 2020, seed 22.1.4), ``-O linformer:k=K``: keys and values projected along the
sequence to K rows, so attention is N x (P + K) instead of N x N.

In every block the patch tokens' keys and values are mixed by learned (K, L) matrices E and F (L: the
model's patch count at its native grid): K' = [K_prefix; E K_patch], V' = [V_prefix; F V_patch]. The prefix
tokens (class, distillation, registers) keep their own keys and values, so the class token is never
averaged away. Each projected key stands for L / K patches; a log(L / K) bias on them keeps the weight of the
prefix tokens against the patches what it was in full attention.

Initialisation is average pooling over K contiguous groups of the row-major grid (``init=pool``), a model
that still works before the fine-tune (a spatial-reduction attention, as PVT's), or Gaussian
N(0, 1/K) (``init=random``, the paper's). For an input with fewer patches n < L (a smaller resolution
bucket), E and F are sliced to their first n columns and rescaled by L / n, so each row still sums to what
it summed to over the full grid. With K = L and identity projections the block is exactly full attention
(tested).

The projections are model parameters (``encoder.linformer``, in its state dict and trained by ``vitedge
train -O linformer``); the plan's step only binds them to the block at run time.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from vitedge.api import Composition, register
from vitedge.attention.linear import TOKEN_REDUCERS, check_sequence
from vitedge.models.base import Encoder, SequenceEncoder
from vitedge.models.spec import AttnOp, KernelCost, product
from vitedge.plan import PlanBuilder

INITS = ("pool", "random")


@dataclass(frozen=True, kw_only=True)
class LinformerConfig:
    """``k``: projected length (keys and values); ``init`` of the projections (:data:`INITS`); ``seed``."""

    k: int = 64
    init: str = "pool"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"linformer:k must be >= 1, got {self.k}")
        if self.init not in INITS:
            raise ValueError(f"linformer:init must be one of {', '.join(INITS)}, got {self.init!r}")


# --- pure math -------------------------------------------------------------------------------------
def linformer_projection(k: int, length: int, *, seed: int = 0, init: str = "random") -> torch.Tensor:
    """A (k, length) projection: Gaussian N(0, 1/k) (``random``) or averages over k contiguous groups
    (``pool``; rows sum to 1)."""
    if init == "pool":
        group = torch.arange(length) * k // length  # (length,) the row each token goes to
        e = torch.zeros(k, length)
        e[group, torch.arange(length)] = 1.0
        return e / e.sum(1, keepdim=True).clamp_min(1.0)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(k, length, generator=g) / math.sqrt(k)


def sliced(e: torch.Tensor, n: int) -> torch.Tensor:
    """E (k, L) for n <= L patches: its first n columns times L / n."""
    length = e.shape[1]
    if n > length:
        raise ValueError(f"linformer projects at most {length} patches (its native grid), got {n}")
    return e if n == length else e[:, :n] * (length / n)


def linformer_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    e: torch.Tensor,
    f: torch.Tensor,
    *,
    prefix: int,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """q, k, v: (B, H, P + n, d); e, f: (K, L >= n) -> (B, H, P + n, d), attention over P + K keys."""
    if attn_mask is not None:
        raise ValueError("linformer projects the keys of the full patch grid; it takes no attention bias")
    n = q.shape[-2] - prefix
    e_n, f_n = sliced(e, n).to(k.dtype), sliced(f, n).to(v.dtype)
    kp = torch.cat([k[:, :, :prefix], e_n @ k[:, :, prefix:]], dim=2)  # (B, H, P + K, d)
    vp = torch.cat([v[:, :, :prefix], f_n @ v[:, :, prefix:]], dim=2)
    bias = None
    rows = e.shape[0]
    if prefix and n != rows:  # each projected key stands for n / K patches
        bias = torch.zeros(1, 1, 1, prefix + rows, dtype=q.dtype, device=q.device)
        bias[..., prefix:] = math.log(n / rows)
    return F.scaled_dot_product_attention(q, kp, vp, attn_mask=bias, scale=scale)


def linformer_cost(*, name: str, tokens: int, prefix: int, k: int, heads: int, head_dim: int) -> KernelCost:
    """Matmul work and peak elements of :func:`linformer_attention` for one image (N = ``tokens`` of which
    P = ``prefix``, n = N - P patches projected to K = ``k``): E K and F V (2 K n d per head), then SDPA of N
    queries over P + K keys. Peak, per head: the projected keys and values ((P + K) d each) with either the
    next projection (K d) or the output (N d)."""
    n, d = tokens - prefix, head_dim
    ops = (
        product(f"{name}.project", tokens=2 * heads * k, in_features=n, out_features=d),
        AttnOp(
            name=f"{name}.sdpa", windows=1, q_tokens=tokens, kv_tokens=prefix + k, heads=heads, head_dim=d
        ),
    )
    return KernelCost(ops=ops, elements=heads * d * (2 * (prefix + k) + max(k, tokens)))


# --- model parameters and technique ----------------------------------------------------------------
class LinformerProjections(nn.Module):
    """E and F of every block: ``e[i]``, ``f[i]`` of shape (k, L)."""

    def __init__(self, depth: int, k: int, length: int, *, init: str, seed: int) -> None:
        super().__init__()
        self.e = nn.ParameterList(
            [
                nn.Parameter(linformer_projection(k, length, seed=seed + 2 * i, init=init))
                for i in range(depth)
            ]
        )
        self.f = nn.ParameterList(
            [
                nn.Parameter(linformer_projection(k, length, seed=seed + 2 * i + 1, init=init))
                for i in range(depth)
            ]
        )


@dataclass(frozen=True, kw_only=True)
class LinformerStep:
    """The attention step of one block; :meth:`bind` takes the block's projections from the encoder."""

    block: int
    k: int
    prefix: int
    label: str

    @property
    def detail(self) -> str:
        return f"linformer k={self.k}"

    def cost(self, *, name: str, tokens: int, heads: int, head_dim: int) -> KernelCost:
        return linformer_cost(
            name=name, tokens=tokens, prefix=self.prefix, k=self.k, heads=heads, head_dim=head_dim
        )

    def bind(self, encoder: Any) -> Any:
        proj = encoder.linformer
        return functools.partial(
            linformer_attention, e=proj.e[self.block], f=proj.f[self.block], prefix=self.prefix
        )

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise RuntimeError("a linformer step runs bound to its encoder (LinformerStep.bind)")


def linformer_steps(model: Encoder, config: LinformerConfig, plan: PlanBuilder) -> None:
    assert isinstance(model, SequenceEncoder)
    for i in range(plan.depth):
        step = LinformerStep(block=i, k=config.k, prefix=model.layout.num_prefix, label=plan.current)
        plan.set_block(i, "attention", step)


@register(
    "linformer",
    steps=linformer_steps,
    compose=Composition(
        fills=frozenset({"attention"}),
        excludes=dict.fromkeys(
            TOKEN_REDUCERS,
            "linformer's projections are learned over the full patch grid, which token reduction breaks",
        ),
    ),
)
def _apply_linformer(model: Encoder, config: LinformerConfig) -> None:
    check_sequence(model, "linformer")
    assert isinstance(model, SequenceEncoder)
    length = model.layout.num_patches
    if config.k > length:
        raise ValueError(f"linformer:k={config.k} exceeds the {length} patches of {model.model_id}")
    ref = next(model.parameters())
    proj = LinformerProjections(len(model.blocks), config.k, length, init=config.init, seed=config.seed)
    model.add_module("linformer", proj.to(device=ref.device, dtype=ref.dtype))
