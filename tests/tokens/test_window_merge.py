"""Swin token merging within windows: r=0 reproduces the block, the groups, the cost model, accuracy on
real CIFAR-10 images, and the refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from support import assert_stochastic_depth_kept, load_cached
from vitedge.api import optimize_
from vitedge.data import as_tensor_batches, open_dataset
from vitedge.measure import analyze, count_flops
from vitedge.models import load
from vitedge.options import parse_options
from vitedge.tokens.runner import flat_rows
from vitedge.tokens.window_merge import (
    WindowMergeConfig,
    _groups,
    _merge,
    _merged_bias,
    _unmerge,
    cell_split,
    merged_swin_block,
    window_merge_r,
)

SWIN_T = "timm:swin_tiny_patch4_window7_224"


@pytest.mark.parametrize("block_index", [0, 1])  # unshifted and shifted (with the shifted-window mask)
def test_merging_nothing_reproduces_the_block(block_index: int) -> None:
    model = load_cached(SWIN_T)
    block = model.model.layers[0].blocks[block_index]
    x = torch.randn(2, 56, 56, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = block(x)
        out = merged_swin_block(model.block_parts(block, (56, 56)), x, 0)
    assert torch.allclose(out, ref, atol=1e-5)


@pytest.mark.parametrize("r", [6, 12])
@pytest.mark.parametrize("block_index", [0, 1])  # unshifted and shifted (with the shifted-window mask)
def test_merging_duplicates_is_exact(block_index: int, r: int) -> None:
    """Where every 2x2 cell holds four equal tokens, merging them loses nothing: proportional attention
    weighs a merged key as the equal keys it stands for. The relative-position bias is zeroed (merged tokens
    take their destination's position), so the mask and bias gathers are what this checks."""
    model = load("cifar-swin")
    block = copy.deepcopy(model.model.layers[0].blocks[block_index])
    block.attn.relative_position_bias_table.data.zero_()
    coarse = torch.randn(2, 8, 8, 64, generator=torch.Generator().manual_seed(3))
    x = coarse.repeat_interleave(2, dim=1).repeat_interleave(2, dim=2)  # (2, 16, 16, 64)
    with torch.no_grad():
        ref = block(x)
        out = merged_swin_block(model.block_parts(block, (16, 16)), x, r)
    assert torch.allclose(out, ref, atol=1e-4)


def test_swin_merge_keeps_stochastic_depth_in_training() -> None:
    """Token-aware training (``vitedge train -O merge:...``) keeps the blocks' drop-path; eval stays exact."""
    assert_stochastic_depth_kept("cifar-swin", "window_merge:r=4")


def test_too_large_r_on_a_shifted_window_is_refused() -> None:
    _, src = cell_split((4, 4))
    tokens = torch.randn(2, 16, 8)
    allowed = torch.zeros(2, 12, 4, dtype=torch.bool)
    allowed[:, :6] = True  # half the sources have no destination in their region
    with pytest.raises(ValueError, match="shifted-window mask"):
        _groups(tokens, (4, 4), 8, allowed)
    group, _ = _groups(tokens, (4, 4), 6, allowed)
    assert (group[:, src[6:]] >= 4).all()  # the unmatched sources stay on their own


def test_cell_split_and_clamp() -> None:
    dst, src = cell_split((4, 4))
    assert dst.tolist() == [0, 2, 8, 10] and len(src) == 12
    dst, src = cell_split((7, 7))
    assert len(dst) == 16 and len(src) == 33
    assert (
        window_merge_r(100, (4, 4)) == 12
        and window_merge_r(5, (7, 7)) == 5
        and window_merge_r(-1, (4, 4)) == 0
    )


def test_groups_cover_the_window_and_respect_the_mask() -> None:
    gen = torch.Generator().manual_seed(2)
    tokens = torch.randn(6, 16, 8, generator=gen)
    _, src = cell_split((4, 4))
    allowed = torch.ones(6, 12, 4, dtype=torch.bool)
    allowed[:, :, 0] = False  # no source may join the first destination
    group, rep = _groups(tokens, (4, 4), 5, allowed)
    assert group.shape == (6, 16) and rep.shape == (6, 11)
    counts = torch.zeros(6, 11, dtype=torch.long).scatter_add_(1, group, torch.ones(6, 16, dtype=torch.long))
    assert (counts >= 1).all() and (counts.sum(1) == 16).all()  # every position in one group, none empty
    assert (counts[:, 0] == 1).all()  # the forbidden destination stayed alone
    assert (group.gather(1, rep) == torch.arange(11)).all()  # each group sits at its own member's position
    # identical tokens are merged first: make source 0 equal to destination 1
    tokens[:, src[0]] = tokens[:, 2]
    group, _ = _groups(tokens, (4, 4), 1, None)
    assert (group[:, src[0]] == 1).all()


def test_neutral_and_cost_model() -> None:
    base = load(SWIN_T)
    x = base.example_input(1)
    with torch.no_grad():
        ref = base(x)
        optimize_(base, *parse_options(["window_merge:r=0"]))
        assert torch.equal(base(x), ref)
    merged = optimize_(load(SWIN_T), *parse_options(["window_merge:r=16"]))
    analytic = analyze(merged.arch()).flops
    assert abs(count_flops(merged, x).total / analytic - 1) < 0.01
    assert analytic < 0.8 * analyze(base.arch()).flops


def test_cifar_swin_keeps_its_predictions() -> None:
    """On real CIFAR-10 test images, merging a quarter of each window changes few predictions."""
    base = load("cifar-swin")
    merged = optimize_(load("cifar-swin"), *parse_options(["window_merge:r=4"]))
    x, y = next(as_tensor_batches(open_dataset("cifar10", base.preprocess, limit=256), 256))
    with torch.inference_mode():
        p0, p1 = base(x).argmax(-1), merged(x).argmax(-1)
    assert (p0 == p1).float().mean() > 0.9
    assert (p1 == y).float().mean() > (p0 == y).float().mean() - 0.05
    assert analyze(merged.arch()).flops < 0.85 * analyze(base.arch()).flops


def test_swin_merge_refusals() -> None:
    with pytest.raises(ValueError, match="seed schedule"):
        parse_options(["window_merge:schedule=seed"])
    with pytest.raises(ValueError, match="no parameter 'keep_norm'"):  # no field that Swin would ignore
        parse_options(["window_merge:r=4,keep_norm=0"])
    with pytest.raises(ValueError, match="cannot stack"):
        optimize_(load(SWIN_T), *parse_options(["window_merge:r=4", "window_prune:keep=0.5"]))
    with pytest.raises(ValueError, match="cannot stack"):
        optimize_(load(SWIN_T), *parse_options(["window_prune:keep=0.5", "window_merge:r=4"]))


def test_merge_and_unmerge_rows_match_an_averaging_matrix() -> None:
    """The row copies equal multiplying by the (M, N) averaging matrix and its one-hot transpose, values and
    gradients (the in-place scaling must not disturb autograd)."""
    gen = torch.Generator().manual_seed(5)
    tokens = torch.randn(6, 16, 8, generator=gen)
    group, _ = _groups(tokens, (4, 4), 5, None)  # (6, 16) in [0, 11)
    rows = flat_rows(group, 11)
    onehot = torch.nn.functional.one_hot(group, 11).float()  # (BW, N, M)
    counts = onehot.sum(1)[..., None]  # (BW, M, 1)
    t = tokens.clone().requires_grad_()
    merged = _merge(t, rows, counts.reciprocal())
    ref_t = tokens.clone().requires_grad_()
    ref = (onehot.transpose(1, 2) @ ref_t) / counts
    assert torch.allclose(merged, ref, atol=1e-6)
    weights = torch.randn(6, 16, 8, generator=gen)
    (_unmerge(merged, rows) * weights).sum().backward()
    ((onehot @ ref) * weights).sum().backward()
    assert t.grad is not None and ref_t.grad is not None
    assert torch.allclose(t.grad, ref_t.grad, atol=1e-6)


def test_merged_bias_is_the_bias_and_mask_at_the_merged_positions() -> None:
    gen = torch.Generator().manual_seed(6)
    heads, n, n_win, b = 3, 16, 4, 2
    rel = torch.randn(heads, n, n, generator=gen)
    mask = torch.where(torch.rand(n_win, n, n, generator=gen) < 0.3, -100.0, 0.0)
    rep = torch.stack([torch.randperm(n, generator=gen)[:10] for _ in range(b * n_win)])  # (BW, M)
    counts = torch.randint(1, 4, (b * n_win, 10, 1), generator=gen).float()
    for m_ in (None, mask):
        for prop in (True, False):
            out = _merged_bias(rel, m_, rep, counts, prop)  # (BW, H, M, M)
            for i in range(b * n_win):
                ref = rel[:, rep[i][:, None], rep[i][None, :]]  # (H, M, M)
                if m_ is not None:
                    ref = ref + m_[i % n_win][rep[i][:, None], rep[i][None, :]]
                if prop:
                    ref = ref + counts[i, :, 0].log()
                assert torch.allclose(out[i], ref, atol=1e-6)


def test_decreasing_schedule_on_swin_merges_more_early() -> None:
    """``schedule=decreasing`` runs from 2r at the first block to 0 at the last, over all stages; the cost
    model follows it."""
    model = optimize_(load("cifar-swin"), *parse_options(["window_merge:r=4,schedule=decreasing"]))
    assert model.plan is not None
    steps = [b.window for b in model.plan.blocks]
    kept = [16 if s is None else s.window_tokens((4, 4), (16, 16))[0] for s in steps]
    assert kept[0] == 16 - 8 and kept[-1] == 16 and kept == sorted(kept)
    x = model.example_input(1)
    analytic = analyze(model.arch()).flops
    assert abs(count_flops(model, x).total / analytic - 1) < 0.01


@pytest.mark.parametrize("block_index", [0, 1])  # unshifted and shifted (with the shifted-window mask)
def test_merged_block_backward_matches_the_native_block(block_index: int) -> None:
    """Gradients through the merged block's machinery (row copies, in-place scaling, the bias-table gather)
    equal the native block's when nothing is merged: input and relative-position table alike."""
    model = load("cifar-swin")
    block = copy.deepcopy(model.model.layers[0].blocks[block_index]).eval()  # eval: no drop-path draws
    x = torch.randn(2, 16, 16, 64, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, 16, 16, 64, generator=torch.Generator().manual_seed(5))
    grads = []
    for merged in (False, True):
        block.zero_grad()
        inp = x.clone().requires_grad_()
        out = merged_swin_block(model.block_parts(block, (16, 16)), inp, 0) if merged else block(inp)
        (out * weights).sum().backward()
        table = block.attn.relative_position_bias_table.grad
        assert inp.grad is not None and table is not None
        grads.append((inp.grad, table.clone()))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-5)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-4)


def test_schedule_gives_one_r_per_block() -> None:
    assert WindowMergeConfig(r=4).per_block(10) == [4] * 10
    dec = WindowMergeConfig(r=4, schedule="decreasing").per_block(10)
    assert len(dec) == 10 and dec[0] == 8 and dec[-1] == 0


def test_recorded_groups_match_the_windows() -> None:
    """The recorded (H, W) map of the first merging block holds N - r groups per window, each inside one
    window, for image 0 only; it is recorded afresh on every traced forward, into that call's trace."""
    model = optimize_(load("cifar-swin"), *parse_options(["window_merge:r=5"])).eval()
    x = model.example_input(3)
    other = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.inference_mode():
        _, trace = model.forward_traced(x)
        first = trace.window_groups
        _, again = model.forward_traced(x)
        _, fresh = model.forward_traced(other)
    assert first is not None and again.window_groups is not None and torch.equal(first, again.window_groups)
    assert fresh.window_groups is not None and not torch.equal(first, fresh.window_groups)  # this call's
    assert first.shape == (16, 16)
    windows = first.view(4, 4, 4, 4).permute(0, 2, 1, 3).reshape(16, 16)  # (window, position)
    for w in range(16):
        ids = windows[w].unique()
        assert len(ids) == 16 - 5 and (ids // 11 == w).all()  # ids w * M + group
