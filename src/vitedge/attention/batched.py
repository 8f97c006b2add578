"""Attention as two batched matrix products, and the choice between it and fused SDPA by shape.

On CPU, PyTorch's fused SDPA kernel (``_scaled_dot_product_flash_attention_for_cpu``) tiles the scores for
long sequences; on short ones its per-tile overhead dominates. Measured on 2 threads (fp32 with an additive
key bias, median of 15-40 calls; ``benchmarks/bench_tokens.py --attention`` repeats it):

================================  ==========  =======  ==========
shape (B, H, N, d)                fused SDPA  two bmm  SDPA / bmm
================================  ==========  =======  ==========
cifar-vit (64, 6, 66, 32)         6.5 ms      4.7 ms   1.38
merged cifar-vit (64, 6, 21, 32)  1.3 ms      0.4 ms   3.1
Swin-T windows (1024, 3, 49, 32)  30.2 ms     21.7 ms  1.39
(64, 6, 100, 32)                  12.0 ms     8.7 ms   1.37
(64, 6, 130, 32)                  21.1 ms     18.4 ms  1.14
ViT-B (4, 12, 197, 64)            5.6 ms      6.4 ms   0.88
ViT-B (8, 12, 197, 64)            11.3 ms     14.2 ms  0.79
ViT-L (8, 16, 257, 64)            23.5 ms     61.9 ms  0.38
================================  ==========  =======  ==========

The sequence length decides it, not the batch: two products win up to about 130 tokens and lose from
about 200. :func:`attention` therefore uses them on CPU for at most :data:`BMM_MAX_TOKENS` tokens (and a
scores tensor of at most :data:`BMM_MAX_SCORES` elements, so a huge batch does not allocate gigabytes), and
fused SDPA otherwise and on accelerators, where the fused kernels are the fast path. timm's
``fused_attn=False`` is the same two-product form, applied to every shape.

PyTorch's CPU softmax also takes a slow path for rows shorter than 16 (a (2048, 12, 12) softmax took
2.7 ms against 0.35 ms at 16 columns), which merged windows hit: a 4x4 window merged by 6 has 10 keys.
:func:`softmax_rows` writes such short rows out as max, exp and a division (0.5 ms there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

BMM_MAX_TOKENS = 128  # longest sequence for which two batched products beat fused SDPA on CPU
BMM_MAX_SCORES = 64 * 2**20  # at most 256 MB of fp32 scores (eager calls)
SHORT_ROW = 16  # below this many columns, PyTorch's CPU softmax is several times slower than written out


def softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dimension; short CPU rows are written out, in place when no gradient is kept."""
    if not scores.is_cpu or scores.shape[-1] >= SHORT_ROW:
        return scores.softmax(-1)
    if torch.is_grad_enabled() and scores.requires_grad:  # exp's backward needs its output untouched
        e = (scores - scores.amax(-1, keepdim=True)).exp()
        return e / e.sum(-1, keepdim=True)
    e = scores.sub_(scores.amax(-1, keepdim=True)).exp_()
    return e.div_(e.sum(-1, keepdim=True))


def bmm_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:  # (B, H, N, d), (B, H, M, d), (B, H, M, e), bias to (B, H, N, M) -> (B, H, N, e)
    """softmax(q k^T * scale + bias) v as two batched matrix products. A boolean ``bias`` is a mask (True
    attends), as in SDPA; a floating one is added to the scores in place, broadcast without a copy."""
    b, h, n, d = q.shape
    m, e = k.shape[-2], v.shape[-1]
    scores = torch.bmm(q.reshape(b * h, n, d), k.reshape(b * h, m, d).transpose(1, 2))  # (BH, N, M)
    scores = scores.view(b, h, n, m).mul_(scale)
    if bias is not None:
        if bias.dtype == torch.bool:
            scores = scores.masked_fill_(~bias, float("-inf"))
        else:
            scores = scores.add_(bias.to(scores.dtype))
    # Softmax in fp32 for bf16/fp16 inputs, as the fused kernels accumulate it.
    low = scores.dtype in (torch.bfloat16, torch.float16)
    probs = softmax_rows(scores.float()).to(q.dtype) if low else softmax_rows(scores)
    return torch.bmm(probs.view(b * h, n, m), v.reshape(b * h, m, e)).view(b, h, n, e)


def short_enough(n: int) -> bool:
    """Whether a sequence of ``n`` tokens is short enough for two batched products to win on CPU."""
    return n <= BMM_MAX_TOKENS


def prefers_bmm(q: torch.Tensor) -> bool:
    """True where two batched products are expected to beat fused SDPA for queries ``q`` (B, H, N, d).

    While tracing or exporting (a symbolic batch), only the length decides, so the graph holds for any batch.
    """
    b, h, n, _ = q.shape
    if q.device.type != "cpu" or not short_enough(n):
        return False
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    return b * h * n * n <= BMM_MAX_SCORES


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float
) -> torch.Tensor:  # (B, H, N, d) x3 -> (B, H, N, d)
    """Scaled dot-product attention with an additive ``bias``, by the faster path for this shape."""
    if prefers_bmm(q):
        return bmm_attention(q, k, v, bias, scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
