"""The learned token scorer (``prune:scorer=learned``): neutral identity, its start at the attention scorer,
gradients in train mode, eval independence of train-mode devices, every model, saving through training."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch

from support import SUPPORTED_IDS, load_cached, planned
from vitedge.api import optimize_
from vitedge.models import load
from vitedge.options import parse_options
from vitedge.plan.sequence import TokenState
from vitedge.tokens.prune import PruneConfig, attach_scorers, prune_blocks, prune_state
from vitedge.tokens.scorer import TokenScorers, learned_scores

LEARNED = "prune:keep=0.7,scorer=learned"


def test_neutral_is_bit_identical() -> None:
    model = load("vit4mnist")
    x = model.example_input(4)
    with torch.no_grad():
        ref = model(x)
        optimize_(model, *parse_options(["prune:keep=1.0,scorer=learned"]))
        assert torch.equal(model(x), ref)
    assert not hasattr(model, "token_scorers")


def test_untrained_ranks_like_attention_and_fuses_by_it() -> None:
    """A zero residual: the ranking is the attention's, and the fused weights are attention / its sum."""
    prior = torch.rand(2, 10).softmax(1)
    scores = learned_scores(prior, torch.zeros(2, 10))
    assert torch.equal(scores.argsort(1), prior.argsort(1))
    x = torch.randn(2, 11, 4, dtype=torch.float64)
    state = TokenState(x=x, size=None, source=None, num_prefix=1)
    out = prune_state(state, scores, 0.5)
    drop = prior.argsort(1, descending=True)[:, 5:]
    w = prior.gather(1, drop) / prior.gather(1, drop).sum(1, keepdim=True)
    fused = (x[:, 1:].gather(1, drop[..., None].expand(-1, -1, 4)) * w[..., None].double()).sum(1)
    torch.testing.assert_close(out.x[:, -1], fused)


def test_gradients_reach_every_scorer_and_train_mode_computes_the_same_output(caplog) -> None:
    model = optimize_(load("cifar-vit"), *parse_options([LEARNED]))
    x = model.example_input(8)
    with torch.no_grad(), caplog.at_level(logging.WARNING):
        ref = model(x)
    assert "never trained" in caplog.text
    scorers = model.token_scorers
    assert isinstance(scorers, TokenScorers) and not bool(scorers.trained)
    model.train()
    model.model.eval()  # no stochastic depth: the encoder is in train mode, its blocks deterministic
    out = model(x)
    assert torch.equal(out, ref)  # train mode selects and fuses exactly as inference does
    out.logsumexp(1).mean().backward()
    for mlp in scorers.mlps:
        # the last layer starts at zero, so only it has a gradient on the first step
        assert mlp.fc2.weight.grad is not None and mlp.fc2.weight.grad.abs().sum() > 0
    assert bool(scorers.trained)
    assert "token_scorers.trained" in model.state_dict()


def test_gradient_reaches_dropped_scores_through_the_fused_token_and_sums_to_zero() -> None:
    x = torch.randn(1, 7, 3, dtype=torch.float64)
    scores = torch.randn(1, 6, dtype=torch.float64, requires_grad=True)
    state = TokenState(x=x, size=None, source=None, num_prefix=1)
    out = prune_state(state, scores, 0.5)
    (out.x * torch.randn_like(out.x)).sum().backward()
    assert scores.grad is not None
    dropped = scores.detach().argsort(1, descending=True)[0, 3:]
    assert (scores.grad[0, dropped] != 0).all()
    torch.testing.assert_close(scores.grad.sum(), torch.zeros((), dtype=torch.float64))  # no common drift


@pytest.mark.parametrize("model_id", [m for m in SUPPORTED_IDS if "swin" not in m and "eva" not in m])
def test_learned_scorer_every_model(model_id: str) -> None:
    model = load_cached(model_id)
    x = model.example_input(2)
    config = PruneConfig(keep=0.5, scorer="learned")
    try:
        attach_scorers(model, len(prune_blocks("stages", len(model.blocks))))
        with torch.no_grad(), planned(model, config):
            out, trace = model.forward_traced(x)
        state = trace.tokens
    finally:
        del model.token_scorers
    assert torch.isfinite(out).all()
    assert state.x.shape[1] < model.layout.num_tokens
    n0 = model.layout.num_tokens
    assert torch.allclose(state.size.sum(1), torch.full((2, 1), float(n0)))


@pytest.mark.parametrize(
    ("model_id", "message"),
    [
        ("timm:swin_tiny_patch4_window7_224", "window_prune"),
        ("timm:eva02_tiny_patch14_224", "rotary"),
    ],
)
def test_refused_where_tokens_cannot_be_pruned_one_by_one(model_id: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        optimize_(load(model_id), *parse_options([LEARNED]))


def test_learned_needs_fusion() -> None:
    with pytest.raises(ValueError, match="needs fuse=one"):
        parse_options(["prune:keep=0.5,scorer=learned,fuse=false"])


def test_plan_without_scorers_is_refused() -> None:
    model = load("vit4mnist")
    with (
        planned(model, PruneConfig(keep=0.5, scorer="learned")),
        pytest.raises(ValueError, match="token_scorers"),
    ):
        model(model.example_input(1))


def test_cost_model_counts_the_scorer() -> None:
    from vitedge.measure import analyze, count_flops

    model = optimize_(load("timm:deit_tiny_patch16_224"), *parse_options(["prune:keep=0.5,scorer=learned"]))
    counted = count_flops(model, model.example_input(1)).total
    assert abs(counted / analyze(model.arch()).flops - 1) < 0.01
    assert analyze(model.arch()).params == sum(p.numel() for p in model.parameters())


def test_training_saves_the_scorer_and_the_model_dir_reloads_it(tmp_path: Path, caplog) -> None:
    """``--train-only token_scorers``: the backbone stays as it was, the scorer learns, and ``out/model``
    reloads it (trained, so no warning) with the same outputs."""
    from vitedge.models.project import weights_path
    from vitedge.train import TrainConfig, train

    init = weights_path("cifar-vit")
    config = TrainConfig(
        model="cifar-vit",
        limit=32,
        eval_limit=16,
        batch_size=16,
        epochs=1,
        warmup_epochs=0.0,
        augment="basic",
        device="cpu",
        bf16=False,
        init=str(init),
        optimize=(LEARNED,),
        train_only="token_scorers",
        out=str(tmp_path / "run"),
    )
    result = train(config)
    trained = result.model
    base = load("cifar-vit")
    start = base.state_dict()
    for name, value in trained.state_dict().items():
        if name.startswith("token_scorers."):
            continue
        assert torch.equal(value, start[name]), name  # frozen
    assert bool(trained.token_scorers.trained)
    assert any(mlp.fc2.weight.abs().sum() > 0 for mlp in trained.token_scorers.mlps)
    with caplog.at_level(logging.WARNING):
        reloaded = load(str(tmp_path / "run" / "model"))
        x = torch.randn(4, 3, 32, 32)
        with torch.inference_mode():
            torch.testing.assert_close(reloaded(x), trained(x))
    assert "never trained" not in caplog.text
