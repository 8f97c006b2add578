"""structured: neutral identity, truthful arch() after pruning, shapes or clear refusals, composition."""

from __future__ import annotations

import copy

import pytest
import torch

from support import coverage, load_cached
from vitedge.api import optimize_
from vitedge.compress.structured import StructuredConfig
from vitedge.measure import analyze, count_flops
from vitedge.models import load
from vitedge.options import parse_options

# Architectures whose attention or block layout cannot be pruned that way refuse with a reason.
HEAD_REFUSALS = {"timm:eva02_tiny_patch14_224", "timm:swin_tiny_patch4_window7_224"}
BLOCK_REFUSALS = {"timm:swin_tiny_patch4_window7_224"}
SMALL = ["vit4mnist", "timm:deit_tiny_patch16_224"]


def _run(enc, x):
    with torch.inference_mode():
        return enc(x)


@pytest.mark.parametrize("model_id", SMALL)
def test_neutral_setting_reproduces_model(model_id: str) -> None:
    base = load_cached(model_id)
    enc = optimize_(copy.deepcopy(base), *parse_options(["structured:heads=0,mlp=0"]))
    x = base.example_input(2)
    assert torch.equal(_run(enc, x), _run(base, x))


@pytest.mark.parametrize(("model_id", "part"), coverage(["heads=0.5", "mlp=0.5", "blocks=1"], "heads=0.5"))
def test_shapes_or_clear_refusal(model_id: str, part: str) -> None:
    base = load_cached(model_id)
    enc = copy.deepcopy(base)
    refuses = (part.startswith("heads") and model_id in HEAD_REFUSALS) or (
        part.startswith("blocks") and model_id in BLOCK_REFUSALS
    )
    if refuses:
        with pytest.raises(ValueError, match=r"does not support head pruning|one flat stack"):
            optimize_(enc, *parse_options([f"structured:{part}"]))
        return
    optimize_(enc, *parse_options([f"structured:{part}"]))
    x = base.example_input(1)
    assert _run(enc, x).shape == _run(base, x).shape
    assert enc.arch().macs < base.arch().macs


@pytest.mark.parametrize("model_id", SMALL)
def test_arch_stays_truthful_after_pruning(model_id: str) -> None:
    enc = optimize_(copy.deepcopy(load_cached(model_id)), StructuredConfig(heads=0.5, mlp=0.5, blocks=1))
    x = enc.example_input(1)
    counted = count_flops(enc, x).total
    assert counted == pytest.approx(analyze(enc.arch(), batch=1).flops, rel=0.01)


def test_heads_keep_at_least_one_and_update_bookkeeping() -> None:
    enc = optimize_(copy.deepcopy(load_cached("timm:deit_tiny_patch16_224")), StructuredConfig(heads=0.9))
    for b in enc.blocks:
        assert b.attn.num_heads == 1
        assert b.attn.module.attn_dim == b.attn.head_dim  # timm's third head counter follows too


def test_block_removal_drops_the_most_similar_block() -> None:
    from vitedge.compress.calibration import calibration_batches
    from vitedge.compress.structured import block_similarity

    base = load_cached("vit4mnist")
    sims = block_similarity(base, calibration_batches(base, images=256))
    drop = set(sims.topk(2).indices.tolist())  # the blocks whose output is most like their input
    survivors = [v.module.state_dict() for i, v in enumerate(base.blocks) if i not in drop]
    enc = optimize_(copy.deepcopy(base), StructuredConfig(blocks=2))
    assert len(enc.blocks) == len(base.blocks) - 2
    for view, want in zip(enc.blocks, survivors, strict=True):  # exactly the others remain, in order
        got = view.module.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in got)


@pytest.mark.parametrize(
    "bad", ["structured:heads=1.0", "structured:mlp=-0.1", "structured:blocks=-1", "structured:importance=x"]
)
def test_bad_values_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="structured"):
        parse_options([bad])


def test_removing_every_block_is_refused() -> None:
    with pytest.raises(ValueError, match="remove all"):
        optimize_(load("vit4mnist"), StructuredConfig(blocks=6))


@pytest.mark.parametrize("order", [["structured:heads=0.5,mlp=0.5", "int8"], ["structured:mlp=0.5", "bf16"]])
def test_composes_with_precision(order: list[str]) -> None:
    base = load_cached("timm:deit_tiny_patch16_224")
    enc = optimize_(copy.deepcopy(base), *parse_options(order))
    pruned = optimize_(copy.deepcopy(base), *parse_options(order[:1]))
    x = base.example_input(2)
    out = _run(enc, x)
    assert out.dtype == torch.float32
    # the stack is the pruned model at lower precision: close to it, and smaller than the base
    assert torch.nn.functional.cosine_similarity(out, _run(pruned, x)).min() > 0.95
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in base.parameters())


@pytest.mark.parametrize("quantiser", ["int8", "int8wo", "int4", "mixed"])
def test_pruning_after_quantisation_is_refused_clearly(quantiser: str) -> None:
    """Refused before anything is applied, naming both options and the order that works."""
    model = load("vit4mnist")
    with pytest.raises(ValueError, match=f"put -O structured:heads=0.5 before -O {quantiser}"):
        optimize_(model, *parse_options([quantiser, "structured:heads=0.5"]))
    assert model.applied == []


def test_saved_pruned_model_reloads_with_same_outputs(tmp_path) -> None:
    from vitedge.commands import run_optimize

    opts = ["structured:heads=0.5,mlp=0.5,blocks=1", "int8"]
    run_optimize("vit4mnist", opts=opts, out=tmp_path / "o")
    a, b = load(str(tmp_path / "o")), optimize_(load("vit4mnist"), *parse_options(opts))
    x = a.example_input(3)
    assert torch.equal(_run(a, x), _run(b, x))


def test_applies_under_inference_mode() -> None:
    """Models loaded under ``torch.inference_mode()``: Torch-Pruning's autograd tracing still runs."""
    with torch.inference_mode():
        enc = optimize_(load("cifar-vit"), StructuredConfig(heads=0.5, mlp=0.5))
        assert enc(enc.example_input(2)).shape == (2, 10)
