"""Token merging: neutral identity, size bookkeeping, protected tokens, math properties, every model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from support import SUPPORTED_IDS, assert_stochastic_depth_kept, load_cached, planned
from vitedge.api import optimize_
from vitedge.models import load
from vitedge.models.base import SequenceEncoder
from vitedge.options import parse_options
from vitedge.plan.sequence import TokenState
from vitedge.tokens.merge import MergeConfig, bipartite_soft_matching, merge_state, schedule_r


def test_neutral_is_bit_identical() -> None:
    model = load("timm:deit_tiny_patch16_224")
    x = model.example_input(2)
    with torch.no_grad():
        ref = model(x)
        optimize_(model, MergeConfig(r=0))
        assert model.plan is None  # nothing to change: the native blocks run
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize("model_id", ["vit4mnist", "timm:deit_tiny_distilled_patch16_224", "hf:clip-vision"])
def test_vitedge_attention_path_reproduces_native_blocks(model_id: str) -> None:
    """The plan's own block loop (needed for the size bias) equals the native blocks when nothing merges."""
    model = load_cached(model_id)
    x = model.example_input(2)
    with torch.no_grad(), planned(model, gates=True):
        out = model(x)
    with torch.no_grad():
        ref = model(x)
    assert torch.allclose(out, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_id", [m for m in SUPPORTED_IDS if "swin" not in m and "eva" not in m])
def test_merge_shapes_and_sizes(model_id: str) -> None:
    model = load_cached(model_id)
    x = model.example_input(2)
    with torch.no_grad(), planned(model, MergeConfig(r=8)):
        out, trace = model.forward_traced(x)
    state = trace.tokens
    n0 = model.layout.num_tokens
    assert out.shape[0] == 2 and torch.isfinite(out).all()
    assert torch.allclose(state.size.sum(1), torch.full((2, 1), float(n0)))  # sizes sum to the original count
    assert torch.equal(state.source.sum(-1), state.size[..., 0])  # every source row matches its size
    assert torch.equal(state.source.sum(1), torch.ones(2, n0))  # each original token is in exactly one
    p = model.layout.num_prefix
    assert torch.equal(state.size[:, :p], torch.ones(2, p, 1))  # protected tokens never merged
    assert torch.equal(state.source[:, :p, :p], torch.eye(p).expand(2, p, p))


def test_large_r_is_clamped_not_an_error() -> None:
    model = load("vit4mnist")
    optimize_(model, *parse_options(["merge:r=100"]))
    with torch.no_grad():
        out, trace = model.forward_traced(model.example_input(3))
    assert out.shape == (3, 10)
    assert trace.tokens.x.shape[1] == 2  # the class token plus everything merged into one


def test_unsupported_models_refuse_clearly() -> None:
    with pytest.raises(ValueError, match="rotary"):
        optimize_(load_cached("timm:eva02_tiny_patch14_224"), MergeConfig(r=4))


def test_restore_returns_full_grid() -> None:
    model = load("timm:deit_tiny_patch16_224")
    optimize_(model, MergeConfig(r=8, restore=True))
    with torch.no_grad():
        feats = model.forward_features(model.example_input(2))
    assert feats.shape == (2, 197, 192)


def test_schedules() -> None:
    assert schedule_r(MergeConfig(r=8), 12, 196) == [8] * 12
    dec = schedule_r(MergeConfig(r=8, schedule="decreasing"), 12, 196)
    assert dec[0] == 16 and dec[-1] == 0 and abs(sum(dec) - 96) <= 6
    seed = schedule_r(MergeConfig(schedule="seed"), 12, 196)
    assert sum(seed) == 196 - 49 and seed[2] == 49 and seed[5] == 49 and seed[8] == 49


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=40),
    r=st.integers(min_value=0, max_value=30),
    prefix=st.integers(min_value=0, max_value=3),
    seed=st.integers(min_value=0, max_value=10_000),
)
def test_merge_preserves_size_weighted_sums(n: int, r: int, prefix: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, n + prefix, 5, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (2, n + prefix, 1), generator=g).double()
    state = TokenState(x=x, size=size, source=None, num_prefix=prefix)
    metric = torch.randn(2, n + prefix, 4, generator=g, dtype=torch.float64)
    out = merge_state(state, metric, r)
    assert out.x.shape[1] == n + prefix - min(r, n // 2)
    assert torch.allclose((out.x * out.size).sum(1), (x * size).sum(1))  # size-weighted sums preserved
    assert torch.equal(out.size.sum(1), size.sum(1))
    assert torch.equal(out.x[:, :prefix], x[:, :prefix])


def test_keep_norm_gives_merged_tokens_their_largest_member_norm() -> None:
    # Positions 0 (class, protected) and 2 form set A, 1 and 3 set B. Token 2 = (0, 2) matches token 1 =
    # (1, 0) and merges into it: the plain average (0.5, 1) has norm 1.12; MLERP keeps its direction at the
    # larger member norm, 2. Token 3 stays.
    x = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]])
    metric = torch.tensor([[[0.0, 1.0], [1.0, 0.1], [0.9, 0.2], [-1.0, 0.0]]])
    state = TokenState(x=x, size=None, source=None, num_prefix=1)
    plain = merge_state(state, metric, 1)
    kept = merge_state(TokenState(x=x, size=None, source=None, num_prefix=1), metric, 1, keep_norm=True)
    assert plain.x.shape == kept.x.shape == (1, 3, 2)
    assert torch.allclose(plain.x[0, 1], torch.tensor([0.5, 1.0]))  # (token 1 + token 2) / 2
    assert torch.allclose(kept.x[0, 1], torch.tensor([0.5, 1.0]) * 2 / 1.25**0.5)
    assert torch.equal(kept.x[0, 2], x[0, 3]) and torch.equal(kept.x[0, 0], x[0, 0])
    assert kept.size[0, :, 0].tolist() == [1.0, 2.0, 1.0] and torch.equal(kept.size, plain.size)


def test_matching_merges_most_similar_and_keeps_original_order() -> None:
    # A = positions 0, 2, 4; B = 1, 3, 5. Tokens 0 and 2 duplicate 1 and 3, so r=2 merges exactly those; the
    # A token left (4) comes first, then B in its order.
    t = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0], [0, 1.0, 0], [0, 0, 1.0], [0.5, 0.5, 0.7]])[None]
    out = bipartite_soft_matching(t, 2)(t * torch.arange(1.0, 7.0)[None, :, None], "sum")
    want = torch.stack([t[0, 4] * 5, t[0, 1] * (1 + 2), t[0, 3] * (3 + 4), t[0, 5] * 6])
    assert torch.equal(out[0], want)
    # with protected tokens (class, distillation) the unmerged A tokens stay in their original order
    x = torch.randn(1, 12, 4, generator=torch.Generator().manual_seed(0))
    pos = torch.arange(12.0)[None, :, None]
    order = bipartite_soft_matching(x, 3, num_prefix=2)(pos, "amax")[0, :, 0]
    assert order[:2].tolist() == [0.0, 1.0]  # class then distillation token
    a_left = order[2 : 2 + (6 - 1 - 3)]
    assert torch.equal(a_left, a_left.sort().values) and all(int(v) % 2 == 0 for v in a_left)
    # register tokens too (class + 4 registers = 5 protected, on both sides of the split): they lead in order,
    # are never merged away and never receive a merge
    x = torch.randn(2, 21, 4, generator=torch.Generator().manual_seed(1))
    pos = torch.arange(21.0)[None, :, None].expand(2, -1, -1)
    merge = bipartite_soft_matching(x, 8, num_prefix=5)
    out = merge(pos, "amax")[:, :, 0]
    assert out.shape == (2, 13) and (out[:, :5] == torch.arange(5.0)).all()
    size = merge(torch.ones(2, 21, 1), "sum")[:, :, 0]
    assert (size[:, :5] == 1).all() and size.sum(1).tolist() == [21.0, 21.0]


def test_merge_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="r must be"):
        MergeConfig(r=-1)
    with pytest.raises(ValueError, match="schedule"):
        parse_options(["merge:schedule=sideways"])


def test_merge_composes_with_bf16() -> None:
    """merge + bf16 is merging in bf16: close to fp32 merging, and neither plain bf16 nor plain merging."""
    import torch.nn.functional as F

    model = optimize_(load("vit4mnist"), *parse_options(["merge:r=1", "bf16"]))
    assert isinstance(model, SequenceEncoder) and model.compute_dtype == torch.bfloat16
    merged = optimize_(load("vit4mnist"), *parse_options(["merge:r=1"]))
    bf16 = optimize_(load("vit4mnist"), *parse_options(["bf16"]))
    from vitedge.data import as_tensor_batches, open_dataset

    x, _ = next(as_tensor_batches(open_dataset("mnist", model.preprocess, limit=64), 64))
    with torch.no_grad():
        out, want, other = model(x), merged(x), bf16(x)
        _, trace = model.forward_traced(x)
    assert out.dtype == torch.float32 and trace.tokens.x.shape[1] == 17 - 6  # it merged, in bf16
    # rounding can flip a near-tied match, so a few digits move more; on the whole it is fp32 merging
    assert F.cosine_similarity(out, want).mean() > 0.99
    assert (out.argmax(1) == want.argmax(1)).float().mean() > 0.95
    assert not torch.allclose(out, other, atol=1e-3)


@pytest.mark.parametrize(
    "opt", ["merge:r=8", "merge:r=8,restore=true", "merge:schedule=seed", "merge:r=40,schedule=decreasing"]
)
@pytest.mark.parametrize("model_id", ["timm:deit_tiny_distilled_patch16_224", "hf:siglip-vision"])
def test_cost_model_follows_merging(model_id: str, opt: str) -> None:
    """arch() counts the tokens each block really sees, and the matching products: counted within 1 %."""
    from vitedge.measure import analyze, count_flops

    model = optimize_(load(model_id), *parse_options([opt]))
    counted = count_flops(model, model.example_input(1)).total
    analytic = analyze(model.arch()).flops
    assert abs(counted / analytic - 1) < 0.01
    assert analytic < analyze(load_cached(model_id).arch()).flops


def test_merge_keeps_stochastic_depth_in_training() -> None:
    """Token-aware training (``vitedge train -O merge:...``) keeps the blocks' drop-path; eval stays exact."""
    assert_stochastic_depth_kept("cifar-vit", "merge:r=2")
