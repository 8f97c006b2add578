import pytest
import torch
import torch.nn.functional as F

from vitedge.attention.batched import (
    BMM_MAX_TOKENS,
    SHORT_ROW,
    attention,
    bmm_attention,
    prefers_bmm,
    softmax_rows,
)


def _qkv(b: int, h: int, n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v as the runner gets them: views of one fused projection, permuted, so not contiguous."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, n, 3, h, d, generator=g, dtype=torch.float64)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    return q, k, v


@pytest.mark.parametrize("bias_shape", [None, (2, 1, 1, 7), (2, 3, 7, 7)])
def test_bmm_attention_matches_sdpa(bias_shape: tuple[int, ...] | None) -> None:
    q, k, v = _qkv(2, 3, 7, 8, seed=0)
    g = torch.Generator().manual_seed(1)
    bias = None if bias_shape is None else torch.randn(bias_shape, generator=g, dtype=torch.float64)
    keep = None if bias is None else bias.clone()
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3)
    got = bmm_attention(q, k, v, bias, 0.3)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-12)
    assert bias is None or torch.equal(bias, keep)  # the in-place add touches the scores, not the bias


def test_bmm_attention_takes_boolean_masks_and_other_key_lengths() -> None:
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 2, 5, 4, generator=g)
    k = torch.randn(2, 2, 9, 4, generator=g)
    v = torch.randn(2, 2, 9, 6, generator=g)
    mask = torch.rand(2, 1, 5, 9, generator=g) > 0.3
    mask[..., 0] = True  # every query attends somewhere
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.5)
    assert torch.allclose(bmm_attention(q, k, v, mask, 0.5), want, atol=1e-6)


def test_attention_uses_batched_products_only_for_short_sequences_on_cpu() -> None:
    short = torch.zeros(64, 6, BMM_MAX_TOKENS, 32)
    long = torch.zeros(1, 1, BMM_MAX_TOKENS + 1, 32)
    huge_batch = torch.zeros(1, 1, 128, 1).expand(8192, 16, 128, 1)  # 2**31 scores: memory decides
    assert prefers_bmm(short) and not prefers_bmm(long) and not prefers_bmm(huge_batch)
    q, k, v = _qkv(3, 2, 20, 4, seed=4)
    bias = torch.randn(3, 1, 1, 20, dtype=torch.float64)
    assert torch.equal(attention(q, k, v, bias, 0.5), bmm_attention(q, k, v, bias, 0.5))
    q, k, v = (t.float() for t in _qkv(1, 2, BMM_MAX_TOKENS + 3, 4, seed=5))
    bias = torch.randn(1, 1, 1, BMM_MAX_TOKENS + 3)
    want = F.scaled_dot_product_attention(q, k, v, bias, scale=0.5)
    assert torch.equal(attention(q, k, v, bias, 0.5), want)  # too long: fused SDPA itself


def test_bmm_attention_in_bf16_stays_close_to_fp32() -> None:
    q, k, v = (t.float() for t in _qkv(2, 3, 50, 16, seed=6))
    bias = torch.randn(2, 1, 1, 50)
    want = bmm_attention(q, k, v, bias, 0.25)
    got = bmm_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), bias, 0.25)
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want, atol=3e-2)


def test_attention_exports_with_a_symbolic_batch() -> None:
    """torch.export (the dynamo ONNX exporter's front end) cannot branch on the batch size."""

    class Attend(torch.nn.Module):
        def forward(
            self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
        ) -> torch.Tensor:
            return attention(q, k, v, bias, 0.5)

    q, k, v = (t.float().contiguous() for t in _qkv(2, 8, 64, 4, seed=7))
    bias = torch.zeros(2, 1, 1, 64)
    batch = torch.export.Dim("batch", min=1, max=65536)  # as vitedge.export: the score cap is undecidable
    program = torch.export.export(
        Attend(), (q, k, v, bias), dynamic_shapes=({0: batch}, {0: batch}, {0: batch}, {0: batch})
    )
    q3, k3, v3 = (t.float().contiguous() for t in _qkv(3, 8, 64, 4, seed=8))
    bias3 = torch.randn(3, 1, 1, 64)
    assert torch.allclose(program.module()(q3, k3, v3, bias3), attention(q3, k3, v3, bias3, 0.5), atol=1e-6)


@pytest.mark.parametrize("cols", [1, 3, 10, SHORT_ROW - 1, SHORT_ROW, 21])
def test_softmax_rows_matches_softmax_with_and_without_gradients(cols: int) -> None:
    gen = torch.Generator().manual_seed(cols)
    scores = torch.randn(4, 3, 5, cols, generator=gen) * 8
    scores[0, 0, 0, : cols // 2] = float("-inf")  # masked keys (a row keeps at least one finite entry)
    ref = scores.softmax(-1)
    with torch.inference_mode():
        assert torch.allclose(softmax_rows(scores.clone()), ref, atol=1e-6)
    leaf = scores.clone().requires_grad_()
    weights = torch.randn(ref.shape, generator=gen)
    (softmax_rows(leaf) * weights).sum().backward()
    leaf_ref = scores.clone().requires_grad_()
    (leaf_ref.softmax(-1) * weights).sum().backward()
    assert leaf.grad is not None and leaf_ref.grad is not None
    assert torch.allclose(leaf.grad, leaf_ref.grad, atol=1e-6)
