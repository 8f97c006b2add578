"""INT8 attention (seed 22.1.6), ``-O int8attn``: QK^T and AV as INT8 x INT8 -> INT32 matrix products.

In every block, after the q/k/v projections (whatever precision they ran in):

1. q and k are quantised to symmetric INT8, one scale per token (``granularity=token``, the seed's per-token
   dynamic quantisation) or one per head (``head``, the seed's per-tensor scale within each head);
2. QK^T runs as an integer product accumulated in int32 and is dequantised by the outer product of the q
   and k scales times the attention scale; additive biases (the log-size bias of token merging) join here;
3. softmax in fp32 (or bf16, ``softmax=bf16``): the scores minus their row maximum are exponentiated. These
   lie in (0, 1] with a row maximum of exactly 1, so they quantise to INT8 0..127 with the fixed scale
   1/127, which equals quantising the normalised probabilities with the per-row scale max(p)/127; the row
   sum that normalises them is applied after the product, in fp32 (the seed's "subtract the max, exponent
   in high precision, output quantised back to INT8");
4. v is quantised per channel (per head with ``granularity=head``); AV runs as INT8 x INT8 -> INT32 and is
   dequantised with the row normalisation and the v scales.

The integer products use ``torch._int_mm`` (VNNI on AVX-512 CPUs), which is 2-D only on CPU, so
:func:`int8_bmm` loops over batch x heads; ``benchmarks/bench_int8attn.py`` compares it with the other
integer paths torch offers. Fused fp32 SDPA keeps the whole attention in cache in one kernel, while this
path makes several passes over the (B, H, N, N) scores and one small GEMM call per head, so at ViT token
counts it is not expected to be faster; the benchmark reports what it measures.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from vitedge.api import Composition, register
from vitedge.models.base import Encoder
from vitedge.plan import PlanBuilder

GRANULARITIES = ("token", "head")
SOFTMAX_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
QMAX = 127

IntMatmul = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True, kw_only=True)
class Int8AttnConfig:
    """INT8 QK^T and AV with int32 accumulation: ``granularity`` of the q/k/v scales (``token``: per query
    and key token, per v channel; ``head``: one per head) and the ``softmax`` precision (fp32 or bf16)."""

    granularity: str = "token"
    softmax: str = "fp32"

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"int8attn granularity must be one of {', '.join(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.softmax not in SOFTMAX_DTYPES:
            raise ValueError(
                f"int8attn softmax must be one of {', '.join(SOFTMAX_DTYPES)}, got {self.softmax!r}"
            )


# --- pure math -------------------------------------------------------------------------------------
def quantize_symmetric(x: torch.Tensor, dims: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric INT8 with one scale per slice reduced over ``dims``.

    x: (..., N, d) -> (q int8 like x, scale fp32 with size 1 along ``dims``), ``x ~= q * scale``.
    """
    xf = x.float()
    scale = xf.abs().amax(dim=dims, keepdim=True).div_(QMAX).clamp_min_(1e-12)
    return (xf / scale).round_().to(torch.int8), scale


def int8_bmm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched INT8 x INT8 -> INT32. a: (..., M, K) int8, b: (..., K, N) int8 -> (..., M, N) int32.

    ``torch._int_mm`` takes 2-D operands on CPU, so the batch is a loop writing into one output.
    """
    *batch, m, k = a.shape
    n = b.shape[-1]
    a3 = a.reshape(-1, m, k)
    b3 = b.reshape(-1, k, n)
    out = torch.empty(a3.shape[0], m, n, dtype=torch.int32, device=a.device)
    for ai, bi, oi in zip(a3.unbind(0), b3.unbind(0), out.unbind(0), strict=True):
        torch._int_mm(ai, bi, out=oi)
    return out.view(*batch, m, n)


def exact_int_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The same product in int64 (slow, exact): the reference :func:`int8_bmm` is tested against."""
    return (a.long() @ b.long()).int()


def int8_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    granularity: str,
    matmul: IntMatmul = int8_bmm,
) -> torch.Tensor:
    """Dequantised attention scores from INT8 q and k. q, k: (B, H, N, d) -> (B, H, Nq, Nk) fp32."""
    dims = (-1,) if granularity == "token" else (-2, -1)
    qi, sq = quantize_symmetric(q, dims)  # sq: (B, H, Nq, 1) or (B, H, 1, 1)
    ki, sk = quantize_symmetric(k, dims)
    s = matmul(qi, ki.transpose(-2, -1).contiguous())  # (B, H, Nq, Nk) int32
    # Convert first, then scale in place: int32 * float promotes element by element, 10x+ slower on CPU.
    return s.float().mul_(sq.mul_(scale)).mul_(sk.transpose(-2, -1))


def int8_softmax_av(
    scores: torch.Tensor,
    v: torch.Tensor,
    granularity: str,
    softmax_dtype: torch.dtype = torch.float32,
    matmul: IntMatmul = int8_bmm,
) -> torch.Tensor:
    """softmax(scores) @ v with INT8 probabilities and v. scores: (B, H, Nq, Nk) fp32, overwritten;
    v: (B, H, Nk, d) -> (B, H, Nq, d) fp32."""
    e = scores.sub_(scores.amax(-1, keepdim=True)).to(softmax_dtype).exp_()  # (0, 1], row max exactly 1
    row_sum = e.sum(-1, keepdim=True, dtype=torch.float32)  # (B, H, Nq, 1)
    p = e.mul_(QMAX).round_().to(torch.int8)  # = probabilities over a per-row scale max(p) / 127
    vi, sv = quantize_symmetric(v, (-2,) if granularity == "token" else (-2, -1))  # sv: (B, H, 1, d|1)
    out = matmul(p, vi.contiguous())  # (B, H, Nq, d) int32
    return out.float().mul_(row_sum.mul_(QMAX).reciprocal_()).mul_(sv)


def int8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    scale: float | None = None,
    *,
    config: Int8AttnConfig,
    matmul: IntMatmul = int8_bmm,
) -> torch.Tensor:
    """Attention with INT8 QK^T and AV, called like ``F.scaled_dot_product_attention``.

    q, k, v: (B, H, N, d); ``attn_mask`` an additive bias broadcastable to (B, H, N, N) -> (B, H, N, d) in
    q's dtype. ``matmul`` is the INT8 x INT8 -> INT32 product (:func:`exact_int_matmul` for a reference).
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = int8_scores(q, k, scale, config.granularity, matmul)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            raise ValueError("int8attn takes an additive float attention bias, not a boolean mask")
        scores = scores.add_(attn_mask.float())
    out = int8_softmax_av(scores, v, config.granularity, SOFTMAX_DTYPES[config.softmax], matmul)
    return out.to(q.dtype)


# --- technique -------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class Int8AttentionStep:
    """The attention step of a block: :func:`int8_attention` with ``config``."""

    config: Int8AttnConfig
    label: str

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        return int8_attention(q, k, v, attn_mask, scale, config=self.config)


def int8attn_steps(model: Encoder, config: Int8AttnConfig, plan: PlanBuilder) -> None:
    step = Int8AttentionStep(config=config, label=plan.current)
    for i in range(plan.depth):
        plan.set_block(i, "attention", step)


@register("int8attn", steps=int8attn_steps, compose=Composition(fills=frozenset({"attention"})))
def _apply_int8attn(model: Encoder, config: Int8AttnConfig) -> None:
    from vitedge.attention.linear import check_sequence

    check_sequence(model, "int8attn")
