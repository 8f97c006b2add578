"""mixed: pinned plans, the budget search on real calibration digits, and a budget that cannot be met."""

from __future__ import annotations

import pytest
import torch

from support import load_cached
from vitedge.api import optimize_
from vitedge.compress.mixed import MixedConfig, choose_plan
from vitedge.compress.qlinear import Int8DynamicLinear
from vitedge.models import load
from vitedge.options import parse_options

N_LAYERS = 24  # vit4mnist: 6 blocks x (qkv, proj, fc1, fc2)


def test_all_fallback_fp32_plan_reproduces_model() -> None:
    base = load_cached("vit4mnist")
    enc = optimize_(load("vit4mnist"), MixedConfig(plan="f" * N_LAYERS, fallback="fp32"))
    x = base.example_input(2)
    with torch.inference_mode():
        assert torch.equal(enc(x), base(x))


def test_pinned_plan_is_applied_in_layer_order() -> None:
    enc = optimize_(load("vit4mnist"), MixedConfig(plan="8f" * (N_LAYERS // 2)))
    qkv, proj = enc.blocks[0].attn.qkv, enc.blocks[0].attn.proj
    assert isinstance(qkv, Int8DynamicLinear) and not isinstance(proj, Int8DynamicLinear)


def test_budget_that_cannot_be_met_fails_clearly() -> None:
    # Blends of two real digits on the fp32 model's decision boundary: bf16's rounding flips about half of
    # them on any CPU, so a zero budget is impossible (on AVX2, bf16 flips none of the first 1,000 digits).
    enc = load("vit4mnist")
    with pytest.raises(ValueError, match="cannot be met"):
        choose_plan(enc, MixedConfig(budget=0.0), [_boundary_blends(enc)])


def _boundary_blends(enc, pairs: int = 32) -> torch.Tensor:
    """(n, C, H, W) blends (1-a) x + a y of digits of two classes, a bisected to where fp32's class flips."""
    digits = _calibration(enc, images=250)[0]
    with torch.inference_mode():
        label = enc(digits).argmax(1)
        x, y = digits[label == label[0]][:pairs], digits[label != label[0]][:pairs]
        n = min(len(x), len(y))
        x, y = x[:n], y[:n]
        lo, hi = torch.zeros(n, 1, 1, 1), torch.ones(n, 1, 1, 1)
        for _ in range(40):
            mid = (lo + hi) / 2
            same = (enc((1 - mid) * x + mid * y).argmax(1) == label[0]).view(-1, 1, 1, 1)
            lo, hi = torch.where(same, mid, lo), torch.where(same, hi, mid)
        return (1 - lo) * x + lo * y  # still label[0] in fp32, by a margin of rounding error


def test_search_returns_a_plan_within_budget() -> None:
    enc = load("vit4mnist")
    batches = [_calibration(enc)[0][:64]]
    plan = choose_plan(enc, MixedConfig(budget=0.02, fallback="fp32"), batches)
    assert len(plan) == N_LAYERS and set(plan) <= {"8", "f"}
    assert plan.count("8") > N_LAYERS // 2  # INT8 where the digits tolerate it: most layers here
    chosen = optimize_(load("vit4mnist"), MixedConfig(plan=plan, fallback="fp32"))
    int8 = [m for m in chosen.modules() if isinstance(m, Int8DynamicLinear)]
    assert len(int8) == plan.count("8")
    with torch.inference_mode():  # the plan keeps top-1 within the budget on the calibration digits
        flips = (chosen(batches[0]).argmax(1) != enc(batches[0]).argmax(1)).float().mean().item()
    assert flips <= 0.02


@pytest.mark.parametrize("bad", ["mixed:budget=1.5", "mixed:fallback=int2", "mixed:plan=8x"])
def test_bad_values_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match="mixed"):
        parse_options([bad])


def test_wrong_plan_length_is_refused() -> None:
    with pytest.raises(ValueError, match="24 layers"):
        optimize_(load("vit4mnist"), MixedConfig(plan="88"))


def _calibration(enc, images: int = 256):
    from vitedge.compress.calibration import calibration_batches

    return calibration_batches(enc, images=images, batch=250)
