"""int8 / int8wo / int4: math, closeness, shapes over every supported model, save/reload, refusals."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from support import coverage, load_cached
from vitedge.api import optimize_
from vitedge.compress.qlinear import (
    Int8DynamicLinear,
    WeightOnlyLinear,
    dequantize_groups,
    pack_int4,
    quantize_groups,
    unpack_int4,
)
from vitedge.compress.quant import Int4Config, Int8Config, Int8WeightOnlyConfig
from vitedge.models import load
from vitedge.options import parse_options

QUANT_OPTS = ["int8", "int8wo", "int4:group=32"]


def test_int4_pack_roundtrip() -> None:
    q = torch.randint(0, 16, (5, 12), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_group_quant_error_is_within_half_a_step() -> None:
    w = torch.randn(8, 64)
    q, scale, low = quantize_groups(w, 4, 16)
    err = (dequantize_groups(q, scale, low, torch.float32) - w).abs().reshape(8, 4, 16)
    assert (err <= scale[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("make", [Int8DynamicLinear, lambda lin: WeightOnlyLinear(lin, bits=4, group=16)])
def test_quantised_linear_close_to_float(make) -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(3, 7, 64)
    q = make(lin)
    assert isinstance(q, nn.Linear) and q.in_features == 64 and q.out_features == 32
    cos = torch.nn.functional.cosine_similarity(q(x).flatten(), lin(x).flatten(), dim=0)
    assert cos > 0.99


def test_outlier_columns_stay_exact() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 8)
    with torch.no_grad():
        lin.weight[:, 5] *= 100.0
    q = WeightOnlyLinear(lin, bits=4, group=32, outliers=1)
    assert q.outlier_index.tolist() == [5]
    assert torch.equal(q.dequantized_weight()[:, 5], lin.weight[:, 5].detach())


@pytest.mark.parametrize(("model_id", "opt"), coverage(QUANT_OPTS, "int8"))
def test_shapes_over_supported_models(model_id: str, opt: str) -> None:
    base = load_cached(model_id)
    enc = copy.deepcopy(base)
    optimize_(enc, *parse_options([opt]))
    assert enc.compute_dtype == torch.float32
    x = base.example_input(2)
    with torch.inference_mode():
        y, ref = enc(x), base(x)
    assert y.shape == ref.shape and y.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(y, ref, dim=1).min() > 0.9
    assert enc.arch().macs == base.arch().macs


def test_int8_refuses_a_model_without_linears() -> None:
    base = load("vit4mnist")
    optimize_(base, Int8Config(keep_ends=False))
    with pytest.raises(ValueError, match="none left to quantise"):
        optimize_(base, Int4Config())


def test_int4_refuses_a_group_that_divides_nothing() -> None:
    with pytest.raises(ValueError, match="divides none"):
        optimize_(load("vit4mnist"), Int4Config(group=46))


@pytest.mark.parametrize("bad", ["int4:group=3", "int8wo:outliers=-1", "int4:group=0"])
def test_bad_values_are_named(bad: str) -> None:
    with pytest.raises(ValueError, match=r"int4|int8wo"):
        parse_options([bad])


def test_int8_then_bf16_and_bf16_then_int8_compose() -> None:
    x = load_cached("vit4mnist").example_input(4)
    ref = load_cached("vit4mnist")(x)
    for order in (["int8", "bf16"], ["bf16", "int8"], ["int8wo", "bf16"], ["bf16", "int4:group=32"]):
        enc = optimize_(load("vit4mnist"), *parse_options(order))
        with torch.inference_mode():
            y = enc(x)
        assert y.dtype == torch.float32
        assert torch.nn.functional.cosine_similarity(y, ref, dim=1).min() > 0.95, order


def test_saved_int8_model_reloads_with_same_outputs(tmp_path) -> None:
    from vitedge.commands import run_optimize

    out = tmp_path / "opt"
    run_optimize("vit4mnist", opts=["int8", "int4:group=32,keep_ends=false"], out=out)
    assert json.loads((out / "vitedge.json").read_text())["configs"][0]["name"] == "int8"
    a, b = load(str(out)), optimize_(load("vit4mnist"), Int8Config(), Int4Config(group=32, keep_ends=False))
    x = a.example_input(3)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))


def test_int8wo_neutral_outliers_everywhere_reproduces_model() -> None:
    # With every input channel kept as an outlier, weight-only quantisation is exact.
    base = load_cached("vit4mnist")
    enc = optimize_(load("vit4mnist"), Int8WeightOnlyConfig(outliers=10_000))
    x = base.example_input(2)
    with torch.inference_mode():
        torch.testing.assert_close(enc(x), base(x), rtol=1e-5, atol=1e-5)
