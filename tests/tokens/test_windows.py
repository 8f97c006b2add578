"""Swin window pruning: full keep equals the native block, sizes of work, cost model, bad scorers."""

from __future__ import annotations

import pytest
import torch

from support import load_cached
from vitedge.api import optimize_
from vitedge.measure import analyze, count_flops
from vitedge.models import load
from vitedge.options import parse_options
from vitedge.tokens.windows import kept_windows, pruned_swin_block, window_partition, window_reverse


def test_partition_roundtrip() -> None:
    x = torch.randn(2, 14, 21, 5)
    assert torch.equal(window_reverse(window_partition(x, (7, 7)), (7, 7), (14, 21)), x)


@pytest.mark.parametrize("block_index", [0, 1])  # unshifted and shifted
def test_keeping_every_window_reproduces_the_block(block_index: int) -> None:
    model = load_cached("timm:swin_tiny_patch4_window7_224")
    block = model.model.layers[0].blocks[block_index]
    x = torch.randn(2, 56, 56, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block(x)
        out = pruned_swin_block(model.block_parts(block, (56, 56)), x, 64, "variance")
    assert torch.allclose(out, ref, atol=1e-5)


def test_skipped_windows_pass_unchanged() -> None:
    model = load_cached("timm:swin_tiny_patch4_window7_224")
    block = model.model.layers[0].blocks[0]  # unshifted: windows are aligned 7x7 tiles
    x = torch.randn(1, 56, 56, 96, generator=torch.Generator().manual_seed(1))
    x[:, :7, :7] = 0.5  # a flat window: lowest variance, pruned first
    with torch.no_grad():
        out = pruned_swin_block(model.block_parts(block, (56, 56)), x, 63, "variance")
    assert torch.equal(out[:, :7, :7], x[:, :7, :7])
    assert not torch.equal(out[:, 7:14, :7], x[:, 7:14, :7])


def test_swin_prune_neutral_and_cost() -> None:
    base = load("timm:swin_tiny_patch4_window7_224")
    x = base.example_input(1)
    with torch.no_grad():
        ref = base(x)
        optimize_(base, *parse_options(["window_prune:keep=1.0"]))
        assert torch.equal(base(x), ref)
    pruned = optimize_(load("timm:swin_tiny_patch4_window7_224"), *parse_options(["window_prune:keep=0.5"]))
    analytic = analyze(pruned.arch()).flops
    assert abs(count_flops(pruned, x).total / analytic - 1) < 0.01
    assert analytic < 0.7 * analyze(base.arch()).flops
    assert kept_windows(0.5, 64, 4) == 32 and kept_windows(0.5, 1, 4) == 1


def test_window_prune_refuses_bad_scorers() -> None:
    with pytest.raises(ValueError, match="whole windows"):
        parse_options(["window_prune:keep=0.5,scorer=entropy"])


@pytest.mark.parametrize("option", ["prune:keep=0.5", "merge:r=4", "adaptive"])
def test_sequence_options_on_swin_name_the_window_options(option: str) -> None:
    """One option name, one meaning: token pruning and merging refuse Swin and say what to use there."""
    with pytest.raises(ValueError, match=r"window_merge.*window_prune"):
        optimize_(load_cached("timm:swin_tiny_patch4_window7_224"), *parse_options([option]))


@pytest.mark.parametrize("option", ["window_prune:keep=0.5", "window_merge:r=4"])
def test_window_options_refuse_sequence_models(option: str) -> None:
    with pytest.raises(ValueError, match="windows of Swin"):
        optimize_(load("vit4mnist"), *parse_options([option]))
