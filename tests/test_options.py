"""The -O grammar and the technique registry."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from vitedge.api import config_from_dict, config_to_dict, describe, optimize_, register, technique_names
from vitedge.compress.bf16 import Bf16Config
from vitedge.models import load
from vitedge.options import _convert, parse_option, parse_options, parse_sweep


def test_registry_lists_bf16() -> None:
    assert "bf16" in technique_names()


def test_parse_plain_and_keyed() -> None:
    assert parse_options(["bf16"]) == [Bf16Config()]
    assert parse_options(["bf16:mode=autocast"]) == [Bf16Config(mode="autocast")]


def test_sweep_ranges_expand() -> None:
    stacks = parse_sweep(["bf16:mode=cast,autocast"])
    assert [s[0].mode for s in stacks] == ["cast", "autocast"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("nope", "unknown optimisation 'nope'"),
        ("bf16:", "empty item"),
        ("bf16:mode", "not key=value"),
        ("bf16:mode=", "not key=value"),
        ("bf16:colour=red", "no parameter 'colour'"),
        ("bf16:mode=cast,mode=autocast", "twice"),
        ("bf16:mode=purple", "must be one of"),
        ("Bf16", "not an optimisation name"),
        ("bf16:mode=cast,autocast", "only in 'vitedge sweep'"),
    ],
)
def test_malformed_options(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_options([text])


def test_value_conversion() -> None:
    assert _convert("0.5", float, "x") == 0.5
    assert _convert("1/4", float, "x") == 0.25
    assert _convert("8", int, "x") == 8
    assert _convert("none", int | None, "x") is None
    with pytest.raises(ValueError, match="integer"):
        _convert("8.5", int, "-O merge:r")
    with pytest.raises(ValueError, match="number"):
        _convert("1/0", float, "-O x:y")


@dataclasses.dataclass(frozen=True, kw_only=True)
class _RangeProbe:
    r: int = 0


def _apply_probe(model, config) -> None:  # pragma: no cover - never applied
    raise AssertionError("the probe technique is only parsed")


@pytest.fixture(scope="module", autouse=True)
def _probe_registered():
    """Register the probe for this module's tests only, so it never leaks into the global registry."""
    from vitedge import api

    api.technique_names()  # load the real techniques first
    register("probe", _RangeProbe)(_apply_probe)
    try:
        yield
    finally:
        del api._BY_TYPE[_RangeProbe], api._BY_NAME["probe"]


# -O names and fields that ../shared/CONTRACT.md fixes (users script against them)
CONTRACT_FIELDS = {
    "merge": {"r", "schedule"},
    "prune": {"keep", "scorer", "schedule"},
    "adaptive": set(),
    "bf16": set(),
    "int8": set(),
    "int8wo": set(),
    "int4": {"group"},
    "mixed": {"budget"},
    "structured": {"heads", "mlp", "blocks"},
    "sparse": {"n", "m", "block"},
    "int8attn": set(),
    "compile": set(),
}


@pytest.mark.parametrize(("name", "fields"), sorted(CONTRACT_FIELDS.items()))
def test_every_contract_name_and_field_parses(name: str, fields: set[str]) -> None:
    from vitedge.api import config_class

    cls = config_class(name)
    assert fields <= {f.name for f in dataclasses.fields(cls)}
    (config,) = parse_option(name)  # the bare name is a valid option
    assert isinstance(config, cls)


def test_neutral_settings_the_contract_names() -> None:
    assert parse_option("merge:r=0")[0].r == 0
    assert parse_option("prune:keep=1.0")[0].keep == 1.0
    structured = parse_option("structured:heads=0,mlp=0")[0]
    assert (structured.heads, structured.mlp) == (0.0, 0.0)


@given(st.integers(min_value=0, max_value=40), st.integers(min_value=0, max_value=40))
def test_integer_ranges(lo: int, hi: int) -> None:
    if hi < lo:
        with pytest.raises(ValueError, match="empty range"):
            parse_option(f"probe:r={lo}..{hi}", allow_range=True)
    else:
        got = [c.r for c in parse_option(f"probe:r={lo}..{hi}", allow_range=True)]
        assert got == list(range(lo, hi + 1))


def test_config_roundtrip_and_describe() -> None:
    c = Bf16Config(mode="autocast")
    assert config_from_dict(config_to_dict(c)) == c
    assert describe(c) == "bf16:mode=autocast"
    assert describe(Bf16Config()) == "bf16"


def test_optimize_rejects_foreign_objects() -> None:
    with pytest.raises(TypeError, match="cannot wrap a Linear; it takes timm VisionTransformer"):
        optimize_(torch.nn.Linear(2, 2), Bf16Config())
    with pytest.raises(TypeError, match="registered"):
        optimize_(load("vit4mnist"), object())


def test_bf16_applies_and_records() -> None:
    model = load("vit4mnist")
    x = model.example_input(8)
    with torch.no_grad():
        ref = model(x)
        optimize_(model, Bf16Config())
        out = model(x)
    assert model.compute_dtype == torch.bfloat16 and model.applied == [Bf16Config()]
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, ref).min() > 0.999
