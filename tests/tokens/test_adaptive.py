"""Complexity-adaptive pruning: entropy measure, bucketed keep rates, grouping keeps input order."""

from __future__ import annotations

import pytest
import torch

from vitedge.api import optimize_
from vitedge.models import load
from vitedge.options import parse_options
from vitedge.tokens.adaptive import AdaptiveConfig, keep_rates, patch_entropy


def test_entropy_orders_flat_below_textured() -> None:
    flat = torch.zeros(1, 3, 32, 32)
    flat[..., :16, :] = 1.0  # two flat halves: every 8x8 tile is a single grey level
    noise = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ent = patch_entropy(torch.cat([flat, noise]), 8)
    assert ent[0] == pytest.approx(0.0, abs=1e-6)
    assert ent[1] > 3.0


def test_keep_rates_are_bucketed() -> None:
    cfg = AdaptiveConfig(min_keep=0.5, max_keep=1.0, buckets=3)
    x = torch.cat(
        [torch.zeros(1, 3, 32, 32), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    )
    rates = keep_rates(cfg, x, 8)
    assert set(rates.tolist()) <= {0.5, 0.75, 1.0}
    assert rates[0] == 0.5 and rates[1] == 1.0


def test_grouping_matches_per_image_runs() -> None:
    """A mixed batch gives the same logits as running each image alone at its own keep rate."""
    model = load("timm:deit_tiny_patch16_224")
    optimize_(model, AdaptiveConfig(min_keep=0.5, max_keep=1.0, buckets=2, low=0.0, high=8.0))
    x = torch.cat(
        [torch.zeros(1, 3, 224, 224), torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))]
    )
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    assert torch.allclose(together, alone, atol=1e-4)


def test_neutral_and_bad_options() -> None:
    model = load("vit4mnist")
    x = model.example_input(3)
    with torch.no_grad():
        ref = model(x)
        optimize_(model, *parse_options(["adaptive:min_keep=1.0"]))
        assert torch.equal(model(x), ref)
    with pytest.raises(ValueError, match="min_keep"):
        parse_options(["adaptive:min_keep=0.9,max_keep=0.5"])
    with pytest.raises(ValueError, match="cannot stack"):
        optimize_(load("vit4mnist"), *parse_options(["merge:r=2", "adaptive"]))


def test_each_image_runs_at_its_own_keep_rate() -> None:
    """A flat digit runs pruned at min_keep and a textured one unpruned, in one batch, in input order."""
    from vitedge.tokens.prune import PruneConfig

    model = optimize_(
        load("vit4mnist"), AdaptiveConfig(min_keep=0.5, max_keep=1.0, buckets=2, low=0.0, high=3.0)
    )
    flat = torch.zeros(1, 1, 28, 28)
    textured = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    x = torch.cat([textured, flat])
    with torch.no_grad():
        logits, trace = model.forward_traced(x)
        pruned = optimize_(load("vit4mnist"), PruneConfig(keep=0.5))(flat)
        plain = load("vit4mnist")(textured)
    assert trace.keep is not None and trace.keep.tolist() == [1.0, 0.5]
    torch.testing.assert_close(logits[1:], pruned)
    torch.testing.assert_close(logits[:1], plain)


def test_sweep_reports_adaptive_macs_on_the_images_it_timed() -> None:
    """adaptive's cost depends on the images: the sweep's MACs are the mean of each image's own plan."""
    from vitedge.commands import run_sweep, timing_input
    from vitedge.plan.explain import expected_macs

    opts = ["adaptive:min_keep=0.5,low=0.0,high=2.0"]
    out = run_sweep(
        "vit4mnist", opts=opts, data="mnist", batch=16, limit=50, min_seconds=0.1, max_seconds=0.5
    )
    row, base = out["rows"][0], out["baseline"]
    model = optimize_(load("vit4mnist"), *parse_options(opts))
    x = timing_input(model, 16, "mnist")
    assert row["macs"] == expected_macs(model, x) < base["macs"]  # digits are flat enough to prune
    flat = torch.zeros(4, 1, 28, 28)
    pruned = optimize_(load("vit4mnist"), *parse_options(["prune:keep=0.5"]))
    assert expected_macs(model, flat) == pruned.arch().macs  # every flat image at min_keep
