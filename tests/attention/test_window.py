"""ViTDet-style windowed attention in plain ViTs: exact against a masked global reference, neutral when the
window covers the grid, refusals."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import vitedge
from support import load_cached
from vitedge.attention.window import WindowAttnConfig, global_block_indices, window_attention
from vitedge.models import load
from vitedge.options import parse_options


def masked_reference(q, k, v, prefix: int, grid: tuple[int, int], size: int) -> torch.Tensor:
    """Global attention under an explicit (N, N) mask: a patch sees its window and the prefix tokens, a
    prefix token sees everything."""
    gh, gw = grid
    rows = torch.arange(gh).repeat_interleave(gw) // size
    cols = torch.arange(gw).repeat(gh) // size
    win = rows * 1000 + cols  # window id of every patch
    n = prefix + gh * gw
    allowed = torch.ones(n, n, dtype=torch.bool)
    allowed[prefix:, prefix:] = win[:, None] == win[None, :]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)


@pytest.mark.parametrize(
    ("prefix", "grid", "size"),
    [(1, (6, 6), 3), (1, (7, 5), 3), (0, (8, 8), 4), (5, (9, 9), 4), (1, (4, 4), 8)],
)
def test_matches_the_masked_reference(prefix: int, grid: tuple[int, int], size: int) -> None:
    g = torch.Generator().manual_seed(0)
    n = prefix + grid[0] * grid[1]
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for _ in range(3))
    got = window_attention(q, k, v, prefix=prefix, grid=grid, size=size)
    torch.testing.assert_close(got, masked_reference(q, k, v, prefix, grid, size), atol=1e-5, rtol=1e-5)


def test_a_window_covering_the_grid_is_global_attention() -> None:
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 1 + 49, 8, generator=g) for _ in range(3))
    got = window_attention(q, k, v, prefix=1, grid=(7, 7), size=14)
    torch.testing.assert_close(got, F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_global_blocks_spread_evenly() -> None:
    assert global_block_indices(12, 4) == [2, 5, 8, 11]
    assert global_block_indices(12, 0) == []
    assert global_block_indices(6, 2) == [2, 5]
    assert global_block_indices(3, 9) == [0, 1, 2]


def test_model_with_a_grid_sized_window_reproduces_the_model() -> None:
    base = load_cached("timm:deit_tiny_patch16_224")
    enc = vitedge.optimize_(copy.deepcopy(base), WindowAttnConfig(size=14, global_blocks=0))
    x = base.example_input(2)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), base(x), atol=1e-4, rtol=1e-4)


def test_windows_change_the_model_and_the_plan_keeps_global_blocks() -> None:
    base = load_cached("timm:deit_tiny_patch16_224")
    enc = vitedge.optimize_(copy.deepcopy(base), WindowAttnConfig(size=7, global_blocks=4))
    assert enc.plan is not None
    windowed = [b.index for b in enc.plan.blocks if b.attention is not None]
    assert windowed == [0, 1, 3, 4, 6, 7, 9, 10]
    x = base.example_input(1)
    with torch.inference_mode():
        y, ref = enc(x), base(x)
    assert not torch.allclose(y, ref)
    assert F.cosine_similarity(y, ref).item() > 0.5


@pytest.mark.parametrize("other", ["merge:r=4", "prune:keep=0.7"])
def test_refuses_token_reduction_in_either_order(other: str) -> None:
    for stack in (["window", other], [other, "window"]):
        with pytest.raises(ValueError, match="full patch grid"):
            vitedge.optimize_(load("vit4mnist"), *parse_options(stack))


def test_refuses_swin_and_bad_sizes() -> None:
    with pytest.raises(ValueError, match="winkernel"):
        vitedge.optimize_(load("cifar-swin"), WindowAttnConfig())
    with pytest.raises(ValueError, match="window:size"):
        parse_options(["window:size=0"])
