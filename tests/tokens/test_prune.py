"""Token pruning: neutral identity, every scorer on every model, sizes, protected and border tokens."""

from __future__ import annotations

import pytest
import torch

from support import SUPPORTED_IDS, load_cached, planned
from vitedge.api import optimize_
from vitedge.models import load
from vitedge.options import parse_options
from vitedge.plan.sequence import TokenState
from vitedge.tokens.prune import (
    FUSES,
    SCORERS,
    PruneConfig,
    border_mask,
    prune_blocks,
    prune_state,
)


def test_neutral_is_bit_identical() -> None:
    model = load("vit4mnist")
    x = model.example_input(4)
    with torch.no_grad():
        ref = model(x)
        optimize_(model, *parse_options(["prune:keep=1.0"]))
        assert torch.equal(model(x), ref)


@pytest.mark.parametrize(("scorer", "fuse"), [(s, "one") for s in SCORERS] + [("attn-value", "nearest")])
@pytest.mark.parametrize("model_id", [m for m in SUPPORTED_IDS if "swin" not in m and "eva" not in m])
def test_prune_every_scorer_every_model(model_id: str, scorer: str, fuse: str) -> None:
    model = load_cached(model_id)
    x = model.example_input(2)
    config = PruneConfig(keep=0.5, scorer=scorer, fuse=fuse)
    with torch.no_grad(), planned(model, config):
        out, trace = model.forward_traced(x)
    state = trace.tokens
    n0 = model.layout.num_tokens
    assert torch.isfinite(out).all()
    assert state.x.shape[1] < n0
    assert torch.allclose(state.size.sum(1), torch.full((2, 1), float(n0)))
    assert torch.equal(state.source.sum(1), torch.ones(2, n0))
    p = model.layout.num_prefix
    assert torch.equal(state.index[:, :p], torch.arange(p).expand(2, p))


def test_border_tokens_survive() -> None:
    model = load("timm:deit_tiny_patch16_224")
    optimize_(model, PruneConfig(keep=0.3, scorer="norm", protect_border=True))
    with torch.no_grad():
        _, trace = model.forward_traced(model.example_input(2))
    idx = trace.tokens.index[:, 1:]
    kept = set(idx[0].tolist())
    border = {1 + r * 14 + c for r in range(14) for c in range(14) if r in (0, 13) or c in (0, 13)}
    assert border <= kept


def test_prune_state_math() -> None:
    x = torch.arange(12, dtype=torch.float64).view(1, 6, 2)
    state = TokenState(x=x, size=None, source=None, num_prefix=1, index=torch.arange(6)[None])
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0]])
    out = prune_state(state, scores, 0.4, fuse="one")
    assert out.index[0].tolist() == [0, 1, 3, -1]  # class, two best patches in order, fused
    assert out.size[0, :, 0].tolist() == [1, 1, 1, 3]
    w = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64).softmax(0)
    fused = (x[0, [2, 4, 5]] * w[:, None]).sum(0)
    assert torch.allclose(out.x[0, -1], fused)
    assert prune_state(state, scores, 0.4, fuse="none").x.shape[1] == 3


def test_fold_nearest_math() -> None:
    # one prefix token, five patches; keys put patches 0-2 on one axis and 3-4 on the other
    x = torch.tensor([[[9.0, 9.0], [1.0, 0.0], [3.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 5.0]]])
    keys = torch.tensor([[[1.0, 1.0], [1.0, 0.1], [1.0, 0.0], [0.1, 1.0], [0.0, 1.0], [0.2, 1.0]]])
    size = torch.tensor([[[1.0], [2.0], [1.0], [1.0], [3.0], [1.0]]])
    state = TokenState(x=x, size=size, source=None, num_prefix=1, index=torch.arange(6)[None])
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.3]])  # keep patches 1 and 3 (tokens 2 and 4)
    out = prune_state(state, scores, 0.4, fuse="nearest", keys=keys)
    assert out.index[0].tolist() == [0, 2, 4]
    assert out.size[0, :, 0].tolist() == [1.0, 3.0, 5.0]  # 1 + 2 (patch 0) and 3 + 1 + 1 (patches 2, 4)
    assert torch.equal(out.x[0, 0], x[0, 0])  # the class token is untouched
    # patch 0 (size 2) joins patch 1: direction of 2*[1,0] + [3,0], largest norm 3
    assert torch.allclose(out.x[0, 1], torch.tensor([3.0, 0.0]))
    # patches 2 and 4 join patch 3: direction of [0,1] + 3*[0,2] + [0,5], largest norm 5
    assert torch.allclose(out.x[0, 2], torch.tensor([0.0, 5.0]))
    assert torch.allclose(out.size.sum(1), size.sum(1))


def test_fold_nearest_trains() -> None:
    # the fold runs inside training (vitedge train -O prune:...,fuse=nearest): gradients must flow through it
    model = load("vit4mnist").train()
    optimize_(model, *parse_options(["prune:keep=0.6,fuse=nearest,schedule=every,scorer=attn-value"]))
    model(model.example_input(4)).sum().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_fuse_spellings() -> None:
    assert PruneConfig(keep=0.5, fuse=True).fuse == "one"  # saved directories spell it true/false
    assert PruneConfig(keep=0.5, fuse=False).fuse == "none"
    assert parse_options(["prune:keep=0.5,fuse=nearest"])[0].fuse == "nearest"
    for fuse in FUSES:  # every spelling the option table lists is accepted as itself
        assert parse_options([f"prune:keep=0.5,fuse={fuse}"])[0].fuse == fuse


def test_start_skips_early_blocks() -> None:
    assert prune_blocks("every", 9, 2) == list(range(2, 9))
    assert prune_blocks("stages", 12, 4) == [6, 9]


def test_nearest_neutral_and_cost_model() -> None:
    from vitedge.measure import analyze, count_flops

    model = load("timm:deit_tiny_patch16_224")
    x = model.example_input(1)
    with torch.no_grad():
        ref = model(x)
        same = optimize_(load("timm:deit_tiny_patch16_224"), *parse_options(["prune:keep=1.0,fuse=nearest"]))
        assert torch.equal(same(x), ref)
    opt = "prune:keep=0.8,fuse=nearest,schedule=every,start=2,scorer=attn-value"
    pruned = optimize_(model, *parse_options([opt]))
    counted = count_flops(pruned, x).total
    assert abs(counted / analyze(pruned.arch()).flops - 1) < 0.01


def test_border_mask() -> None:
    idx = torch.arange(1, 10)[None]  # a 3x3 grid behind one prefix token
    assert border_mask(idx, (3, 3), 1)[0].tolist() == [True] * 4 + [False] + [True] * 4


def test_schedule_blocks() -> None:
    assert prune_blocks("stages", 12) == [3, 6, 9]
    assert prune_blocks("every", 4) == [0, 1, 2, 3]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("prune:keep=0", "keep must be"),
        ("prune:keep=1.5", "keep must be"),
        ("prune:scorer=magic", "scorer"),
        ("prune:fuse=blend", "fuse must be one of"),
        ("prune:start=-1", "start must be"),
        ("prune:scorer=learned,fuse=nearest", "needs fuse=one"),
    ],
)
def test_bad_prune_options(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_options([text])


def test_cannot_stack_two_reducers() -> None:
    with pytest.raises(ValueError, match="cannot stack"):
        optimize_(load("vit4mnist"), *parse_options(["merge:r=2", "prune:keep=0.5"]))


@pytest.mark.parametrize(
    "opt",
    ["prune:keep=0.5", "prune:keep=0.5,scorer=entropy", "prune:keep=0.3,protect_border=true,scorer=norm"],
)
@pytest.mark.parametrize("model_id", ["timm:deit_tiny_patch16_224", "hf:siglip-vision"])
def test_cost_model_follows_pruning(model_id: str, opt: str) -> None:
    from vitedge.measure import analyze, count_flops

    model = optimize_(load(model_id), *parse_options([opt]))
    counted = count_flops(model, model.example_input(1)).total
    assert abs(counted / analyze(model.arch()).flops - 1) < 0.01
