"""Counted FLOPs against hand-computed attention counts and the reference figures in FACTS.md."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from vitedge.measure.cost import analyze
from vitedge.measure.counted import count_flops, register_cpu_attention_formulas


class Attention(nn.Module):
    """Bare attention over given q, k, v shapes: fused SDPA or explicit matmuls."""

    def __init__(self, *, fused: bool) -> None:
        super().__init__()
        self.fused = fused

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:  # qkv: (3, B, H, N, D)
        q, k, v = qkv.unbind(0)
        if self.fused:
            return F.scaled_dot_product_attention(q, k, v)
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


@pytest.mark.parametrize("fused", [True, False])
def test_attention_counted_by_hand(fused):
    b, h, n, d = 2, 3, 17, 8
    counted = count_flops(Attention(fused=fused), torch.randn(3, b, h, n, d))
    # QK^T and AV: 2 FLOPs per MAC, B*H*N*N*D MACs each
    assert counted.total == 2 * 2 * b * h * n * n * d


def test_sdpa_cpu_kernel_is_registered_once():
    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    assert op in flop_counter.flop_registry
    register_cpu_attention_formulas()  # a second call must not raise "duplicate registrations"
    counted = count_flops(Attention(fused=True), torch.randn(3, 1, 2, 5, 4))
    assert counted.by_op == {"_scaled_dot_product_flash_attention_for_cpu": 2 * 2 * 2 * 5 * 5 * 4}


def test_value_width_differs_math_fallback():
    # a value head size unlike the query's takes the math path (bmm), which is counted too
    q, k, v = torch.randn(1, 2, 6, 4), torch.randn(1, 2, 9, 4), torch.randn(1, 2, 9, 16)

    class M(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.scaled_dot_product_attention(q, k, v) + 0 * x.sum()

    assert count_flops(M(), torch.zeros(1)).total == 2 * (2 * 6 * 9 * 4 + 2 * 6 * 9 * 16)


def test_modes_restored_and_no_grad():
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Linear(8, 2))
    model.train()
    model[1].eval()
    seen = {}
    model.register_forward_hook(
        lambda m, i, o: seen.update(training=m.training, grad=torch.is_grad_enabled())
    )
    counted = count_flops(model, torch.randn(3, 4))
    assert seen == {"training": False, "grad": False}
    assert [m.training for m in model.modules()] == [True, True, False, True]
    assert counted.total == 2 * 3 * (4 * 8 + 8 * 2)
    assert counted.by_module == {"0": 2 * 3 * 32, "2": 2 * 3 * 16}


def test_bad_arguments():
    with pytest.raises(TypeError, match="Module"):
        count_flops(lambda x: x, torch.zeros(1))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Tensor"):
        count_flops(nn.Identity(), [1, 2])  # type: ignore[arg-type]


# FACTS.md: matmul-type FLOPs including attention at batch 1.
@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "gflops"),
    [
        ("deit_tiny_patch16_224", 2.507),
        ("swin_tiny_patch4_window7_224", 8.981),
        ("vit_base_patch16_224", 35.13),
    ],
)
def test_reference_counts(name, gflops):
    model = timm.create_model(name, pretrained=False)
    counted = count_flops(model, torch.randn(1, 3, 224, 224))
    assert counted.total / 1e9 == pytest.approx(gflops, rel=0.005)
    assert sum(counted.by_module.values()) == counted.total
    assert model.training  # create_model returns a training-mode model; it must stay so


@pytest.mark.parametrize("model_id", ["timm:deit_tiny_patch16_224", "timm:swin_tiny_patch4_window7_224"])
def test_counted_matches_analytic(model_id):
    from vitedge.models import load

    enc = load(model_id)
    counted = count_flops(enc, enc.example_input(2))
    assert counted.total == analyze(enc.arch(), batch=2).flops
    assert counted.batch == 2
