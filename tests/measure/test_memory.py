"""The batch planner by hand, and the activation model against the memory of real forwards."""

from __future__ import annotations

import pytest

from vitedge.measure.cost import analyze
from vitedge.measure.memory import live_tensor_peak, measure_peak_rss, parse_bytes, plan_batch
from vitedge.models.spec import ArchSpec, LayerSpec, LinearOp


def mlp_spec() -> ArchSpec:
    """One MLP sub-block on 10 tokens of width 4 (hidden 16) for a 1x2x2 image: easy to do by hand."""
    layer = LayerSpec(
        name="mlp",
        kind="mlp",
        ops=(
            LinearOp(name="fc1", tokens=10, in_features=4, out_features=16),
            LinearOp(name="fc2", tokens=10, in_features=16, out_features=4),
        ),
        in_elements=40,
        out_elements=40,
        hidden_elements=160,
    )
    return ArchSpec(family="vit", img_size=(2, 2), in_chans=1, layers=(layer,))


# weights: 4*16+16 + 16*4+4 = 148 params = 592 bytes; activations per image: image 4 + 2*40 + 2*160 = 404
# elements = 1616 bytes (float32)
WEIGHTS, PER_IMAGE = 592, 1616


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4GiB", 4 * 2**30),
        ("512MB", 512 * 10**6),
        ("1.5GB", 1_500_000_000),
        ("1024", 1024),
        (" 2 kib ", 2048),
        ("10B", 10),
        (0, 0),
        (123, 123),
    ],
)
def test_parse_bytes(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize(
    "bad", ["", "GB", "4 GiBs", "-1GB", "1e999GB", "four", "1.2.3MB", -5, True, 1.5, None]
)
def test_parse_bytes_rejects(bad):
    with pytest.raises(ValueError):
        parse_bytes(bad)


def test_plan_batch_by_hand():
    spec = mlp_spec()
    assert analyze(spec).weight_bytes == WEIGHTS and analyze(spec).activation_bytes == PER_IMAGE
    budget = WEIGHTS + 1000 + 5 * PER_IMAGE
    plan = plan_batch(spec, budget_bytes=budget, runtime_overhead_bytes=1000)
    assert plan.max_batch == 5
    assert plan.total_bytes == budget and plan.reason == ""
    assert plan_batch(spec, budget_bytes=budget - 1, runtime_overhead_bytes=1000).max_batch == 4
    assert plan_batch(spec, budget_bytes=f"{budget}B", runtime_overhead_bytes="1000").max_batch == 5
    # bf16 halves weights and activations, but the caller's float32 images stay beside their bf16 cast:
    # per image 4 image elements * (4 + 2) + 400 elements * 2 = 824 bytes
    assert plan_batch(spec, budget_bytes=296 + 5 * 824, dtype="bf16", runtime_overhead_bytes=0).max_batch == 5
    assert (
        plan_batch(spec, budget_bytes=296 + 5 * 824 - 1, dtype="bf16", runtime_overhead_bytes=0).max_batch
        == 4
    )


def test_plan_batch_nothing_fits():
    spec = mlp_spec()
    plan = plan_batch(spec, budget_bytes=WEIGHTS + 999, runtime_overhead_bytes=1000)
    assert plan.max_batch == 0 and "weights" in plan.reason
    plan = plan_batch(spec, budget_bytes=WEIGHTS + 1000 + PER_IMAGE - 1, runtime_overhead_bytes=1000)
    assert plan.max_batch == 0 and "one image" in plan.reason
    assert plan.to_json()["max_batch"] == 0


@pytest.mark.parametrize("budget", [64 * 2**20, 3 * 2**30])
def test_plan_batch_agrees_with_analyze(budget):
    from vitedge.models import load

    spec = load("timm:deit_tiny_patch16_224").arch()
    plan = plan_batch(spec, budget_bytes=budget, runtime_overhead_bytes=0)
    assert plan.max_batch > 0

    def total(batch: int) -> int:
        r = analyze(spec, batch=batch)
        return r.weight_bytes + r.activation_bytes

    assert total(plan.max_batch) <= budget < total(plan.max_batch + 1)


def test_plan_batch_rejects_bad_input():
    with pytest.raises(ValueError, match="byte count"):
        plan_batch(mlp_spec(), budget_bytes="lots")
    with pytest.raises(ValueError, match="dtype"):
        plan_batch(mlp_spec(), budget_bytes="1GB", dtype="fp8")


# The activation model counts the tensors PyTorch keeps alive; so do the profiler's allocation events.
@pytest.mark.parametrize(
    ("model_id", "batch", "fused"),
    [
        ("timm:deit_tiny_patch16_224", 4, True),
        ("timm:deit_tiny_patch16_224", 2, False),
        ("timm:swin_tiny_patch4_window7_224", 1, True),
    ],
)
def test_activation_model_matches_live_tensors(model_id, batch, fused):
    from vitedge.models import load

    enc = load(model_id)
    if not fused:
        for block in enc.blocks:
            block.attn.module.fused_attn = False
    x = enc.example_input(batch)
    measured = live_tensor_peak(enc, x) + x.nbytes
    predicted = analyze(enc.arch(), batch=batch, fused_attention=fused).activation_bytes
    assert predicted == pytest.approx(measured, rel=0.01)  # exact to the byte with torch 2.14.1


def test_measure_peak_rss_rejects_bad_input():
    with pytest.raises(ValueError, match="batch"):
        measure_peak_rss("timm:deit_tiny_patch16_224", batch=0)
    with pytest.raises(ValueError, match="int8"):
        measure_peak_rss("timm:deit_tiny_patch16_224", batch=1, dtype="int8")
    with pytest.raises(ValueError, match="threads"):
        measure_peak_rss("timm:deit_tiny_patch16_224", batch=1, threads=0)


def test_measure_peak_rss_reports_child_failure():
    with pytest.raises(RuntimeError, match="unknown timm model"):
        measure_peak_rss("timm:no_such_model_xyz", batch=1)


# Predicted model memory (weights + peak activations) against a fresh process's RSS; batches where the
# activations are a large share, so the activation model is what is tested.
@pytest.mark.slow
@pytest.mark.parametrize(("model_id", "batch"), [("timm:deit_tiny_patch16_224", 32)])
def test_predicted_memory_matches_rss(model_id, batch):
    from vitedge.models import load

    measured = measure_peak_rss(model_id, batch=batch)
    predicted = analyze(load(model_id).arch(), batch=batch)
    assert measured.hwm_reset
    assert measured.param_bytes == pytest.approx(predicted.weight_bytes, rel=0.02)
    assert predicted.weight_bytes + predicted.activation_bytes == pytest.approx(
        measured.model_bytes, rel=0.25
    )
    assert predicted.activation_bytes == pytest.approx(measured.activation_bytes, rel=0.25)
    assert predicted.activation_bytes > predicted.weight_bytes / 2
