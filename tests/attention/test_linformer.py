"""Linformer: identity projections reproduce attention, oracle agreement with the linformer package,
slicing for smaller grids, parameters in the state dict, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitedge
from support import load_cached
from vitedge.attention.linformer import LinformerConfig, linformer_attention, linformer_projection, sliced
from vitedge.models import load
from vitedge.options import parse_options


def qkv(n: int, prefix: int = 1, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(2, 3, prefix + n, 8, generator=g) for _ in range(3))


def test_identity_projections_reproduce_attention() -> None:
    q, k, v = qkv(16)
    eye = torch.eye(16)
    got = linformer_attention(q, k, v, eye, eye, prefix=1)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_matches_the_linformer_package() -> None:
    """linformer's LinformerSelfAttention with its projections set to ours (no prefix tokens there)."""
    linformer = pytest.importorskip("linformer")
    torch.manual_seed(0)
    n, dim, heads, k = 20, 24, 3, 6
    ref = linformer.LinformerSelfAttention(dim=dim, seq_len=n, heads=heads, k=k, one_kv_head=False).eval()
    x = torch.randn(2, n, dim)
    with torch.no_grad():
        want = ref(x)
        d = dim // heads
        q = ref.to_q(x).view(2, n, heads, d).transpose(1, 2)
        kk = ref.to_k(x).view(2, n, heads, d).transpose(1, 2)
        vv = ref.to_v(x).view(2, n, heads, d).transpose(1, 2)
        e, f = ref.proj_k.T, ref.proj_v.T  # the package keeps (n, k) and contracts over n
        out = linformer_attention(q, kk, vv, e, f, prefix=0)
        got = ref.to_out(out.transpose(1, 2).reshape(2, n, dim))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_pool_init_averages_groups_and_slicing_keeps_row_sums() -> None:
    e = linformer_projection(4, 16, init="pool")
    torch.testing.assert_close(e.sum(1), torch.ones(4))
    assert (e > 0).sum().item() == 16  # every token in exactly one group
    s = sliced(e, 12)
    assert s.shape == (4, 12)
    torch.testing.assert_close(s.sum(), e.sum())
    with pytest.raises(ValueError, match="at most 16"):
        sliced(e, 17)


def test_on_a_model_the_projections_are_parameters() -> None:
    enc = vitedge.optimize_(load("vit4mnist"), LinformerConfig(k=8))
    names = [n for n, _ in enc.named_parameters() if n.startswith("linformer.")]
    assert len(names) == 2 * len(enc.blocks)
    x = enc.example_input(2)
    out = enc(x)
    out.sum().backward()  # the projections train
    assert enc.linformer.e[0].grad is not None and enc.linformer.e[0].grad.abs().sum() > 0


def test_pool_init_keeps_a_trained_model_close() -> None:
    """Before any fine-tune, average-pooled keys and values still give a working model (a spatial
    reduction); random projections do not."""
    base = load_cached("timm:deit_tiny_patch16_224")
    x = base.example_input(2)
    with torch.inference_mode():
        ref = base.forward_features(x)
        full = vitedge.optimize_(copy.deepcopy(base), LinformerConfig(k=196, init="pool")).forward_features(x)
    torch.testing.assert_close(full, ref, atol=1e-4, rtol=1e-4)  # k = L pooling is the identity


@pytest.mark.parametrize("stack", [["linformer", "merge:r=4"], ["prune:keep=0.7", "linformer"]])
def test_refuses_token_reduction(stack: list[str]) -> None:
    with pytest.raises(ValueError, match="full patch grid"):
        vitedge.optimize_(load("vit4mnist"), *parse_options(stack))


def test_refuses_bad_k() -> None:
    with pytest.raises(ValueError, match="exceeds"):
        vitedge.optimize_(load("vit4mnist"), LinformerConfig(k=10_000))
    with pytest.raises(ValueError, match="linformer:k"):
        parse_options(["linformer:k=0"])
