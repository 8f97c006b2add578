"""The execution plan: one builder, one runner, stacks checked once, side outputs scoped to a call, no
technique code under the models package."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import vitedge
from support import load_cached
from vitedge.api import build_plan
from vitedge.models import load
from vitedge.options import parse_options
from vitedge.plan import BlockPlan, ExecutionPlan, PlanBuilder

SRC = Path(vitedge.__file__).parent


def test_models_package_imports_no_technique_code() -> None:
    techniques = "('vitedge.tokens', 'vitedge.plan', 'vitedge.api', 'vitedge.compress', 'vitedge.runtime')"
    code = (
        "import sys, vitedge.models; "
        f"bad = sorted(m for m in sys.modules if m.startswith({techniques})); print(bad); assert not bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    for path in (SRC / "models").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            assert not any(n.startswith("vitedge.tokens") for n in names), f"{path.name} imports {names}"


def test_package_exports_lazily_and_completely() -> None:
    out = subprocess.run(
        [sys.executable, "-c", "import sys, vitedge; print([m for m in sys.modules if 'vitedge.' in m])"],
        check=True,
        capture_output=True,
        text=True,
    )
    assert out.stdout.strip() == "[]"  # import vitedge loads nothing else
    assert sorted(vitedge.__all__) == sorted(["__version__", *vitedge._EXPORTS])
    for name in vitedge._EXPORTS:
        value = getattr(vitedge, name)
        assert value.__doc__, f"vitedge.{name} has no docstring"
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        vitedge.nothing  # noqa: B018
    # every -O name has its config class exported under vitedge
    exported = {getattr(vitedge, n) for n in vitedge._EXPORTS if n.endswith("Config")}
    from vitedge.api import config_class

    ours = [config_class(n) for n in vitedge.technique_names()]
    assert {c for c in ours if c.__module__.startswith("vitedge.")} <= exported  # (tests register probes)


@pytest.mark.parametrize(
    ("stack", "message"),
    [
        (["merge:r=2", "prune:keep=0.5"], "-O merge:r=2 and -O prune:keep=0.5 cannot stack: both fill"),
        (["prune:keep=0.5", "adaptive"], "cannot stack: both fill the execution plan's reducer step"),
        (["int8attn", "int8attn"], "given twice"),
        (["int8", "structured:mlp=0.5"], "put -O structured:mlp=0.5 before -O int8"),
        (["compile", "merge:r=1"], "-O merge:r=1 comes after -O compile; compile must be the last"),
        (["adaptive", "compile"], "-O compile cannot follow -O adaptive"),
    ],
)
def test_orders_that_cannot_work_are_refused_before_anything_applies(stack: list[str], message: str) -> None:
    model = load("vit4mnist")
    before = model.weights_digest()
    with pytest.raises(ValueError, match=message):
        vitedge.optimize_(model, *stack)
    assert model.applied == [] and model.plan is None and model.weights_digest() == before


def test_a_stack_over_two_calls_is_checked_against_what_is_applied() -> None:
    model = vitedge.optimize_(load("vit4mnist"), "merge:r=1")
    with pytest.raises(ValueError, match="cannot stack"):
        vitedge.optimize_(model, "prune:keep=0.5")
    assert [vitedge.describe(c) for c in model.applied] == ["merge:r=1"]


def test_strings_and_configs_mix_in_the_order_given() -> None:
    model = vitedge.optimize_(load("vit4mnist"), "merge:r=1", vitedge.Int8Config(), "int8attn")
    assert [vitedge.describe(c) for c in model.applied] == ["merge:r=1", "int8", "int8attn"]
    assert model.plan is not None and model.plan.by == {"reducer": "merge:r=1", "attention": "int8attn"}
    with pytest.raises(TypeError, match="registered vitedge technique"):
        vitedge.optimize_(load("vit4mnist"), object())


def test_plan_is_rebuilt_when_blocks_are_removed() -> None:
    """merge's decreasing schedule follows the depth that structured:blocks leaves."""
    model = vitedge.optimize_(load("vit4mnist"), "merge:r=1,schedule=decreasing", "structured:blocks=2")
    assert len(model.blocks) == 4 and model.plan is not None and len(model.plan.blocks) == 4
    assert [b.reducer.r if b.reducer else 0 for b in model.plan.blocks] == [2, 1, 1, 0]  # type: ignore[attr-defined]
    with torch.no_grad():
        assert model(model.example_input(2)).shape == (2, 10)


def test_traces_are_per_call_and_nothing_stays_on_the_model() -> None:
    model = vitedge.optimize_(load("vit4mnist"), "merge:r=2")
    x = model.example_input(3)
    with torch.no_grad():
        y, trace = model.forward_traced(x)
        assert torch.equal(y, model(x))  # tracing changes no output
    assert trace.tokens.x.shape[1] == 17 - 6 * 2 and trace.tokens.source is not None
    held = [k for k, v in vars(model).items() if isinstance(v, torch.Tensor) or "State" in type(v).__name__]
    assert held == []
    _, quiet = model.forward_traced(x, sources=False)
    assert quiet.tokens.source is None


def test_concurrent_calls_and_copies_do_not_interfere() -> None:
    model = vitedge.optimize_(load("vit4mnist"), "prune:keep=0.5,fuse=nearest")
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(0.9)
    inputs = [torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    with torch.no_grad():
        want = [(model(x), twin(x)) for x in inputs]
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def work(i: int) -> None:
        with torch.no_grad():
            for _ in range(5):
                got[i] = (model(inputs[i]), twin(inputs[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (a, b) in enumerate(want):
        assert torch.equal(got[i][0], a) and torch.equal(got[i][1], b)
    assert not torch.equal(want[0][0], want[0][1])  # the copy runs its own weights


class SkipBlock:
    """A gate that skips its block entirely."""

    label = "test:skip"

    def __call__(self, encoder, state, run_block):
        return state


class CountTokens:
    """An exit that records the tokens leaving its block in the trace."""

    label = "test:count"

    def __call__(self, encoder, state, trace):
        if trace is not None:
            trace.keep = torch.tensor(state.x.shape[1])
        return state


def test_gate_and_exit_slots_run_where_the_plan_puts_them() -> None:
    model = load_cached("vit4mnist")
    x = model.example_input(2)
    depth = len(model.blocks)
    blocks = [BlockPlan(index=i) for i in range(depth)]
    blocks[3] = BlockPlan(index=3, gate=SkipBlock())
    saved = model.plan
    try:
        model.plan = ExecutionPlan(blocks=tuple(blocks))
        with torch.no_grad():
            skipped = model(x)
            modules = model.block_modules()
            h = model.embed(x)
            for i, m in enumerate(modules):
                if i != 3:
                    h = model.call_block(m, h)
            want = model.forward_head(model.final_norm(h))
        torch.testing.assert_close(skipped, want, atol=1e-5, rtol=1e-5)
        blocks[3] = BlockPlan(index=3, exit=CountTokens())
        model.plan = replace(model.plan, blocks=tuple(blocks))
        with torch.no_grad():
            _, trace = model.forward_traced(x)
        assert trace.keep is not None and int(trace.keep) == 17
    finally:
        model.plan = saved


def test_builder_refuses_what_a_declaration_should_have_caught() -> None:
    b = PlanBuilder(4)
    b.current = "merge:r=1"
    b.set_block(0, "reducer", object())
    b.current = "prune:keep=0.5"
    with pytest.raises(RuntimeError, match="both fill the plan's reducer"):
        b.set_block(1, "reducer", object())
    with pytest.raises(ValueError, match="unknown block step"):
        b.set_block(0, "teleport", object())
    with pytest.raises(ValueError, match="outside the encoder's 4 blocks"):
        b.set_block(4, "gate", object())
    assert PlanBuilder(3).build() is None  # nothing departs from the native run


def test_weight_only_stacks_keep_the_native_plan() -> None:
    model = vitedge.optimize_(load("vit4mnist"), "structured:heads=0.25", "int8")
    assert model.plan is None  # int8 and structured change weights, not how the forward runs
    assert build_plan(model) is None


@pytest.mark.parametrize(
    ("model_id", "opts"),
    [
        ("cifar-vit", ["merge:r=5", "int8"]),
        ("vit4mnist", ["prune:keep=0.5,schedule=every", "int8attn", "bf16:mode=autocast"]),
        ("cifar-swin", ["window_merge:r=6,schedule=decreasing"]),
        ("cifar-swin", ["window_prune:keep=0.5"]),
        ("cifar-resnet", ["bf16"]),
    ],
)
def test_explain_follows_the_cost_model(model_id: str, opts: list[str]) -> None:
    model = vitedge.optimize_(load(model_id), *parse_options(opts))
    plan = vitedge.explain(model)
    assert plan["macs"] == model.arch().macs
    assert len(plan["blocks"]) == (0 if model_id == "cifar-resnet" else len(model.blocks))
    assert sum(b["macs"] for b in plan["blocks"]) < plan["macs"]
    for b in plan["blocks"]:
        assert b["tokens_out"] <= b["tokens_in"] or model.info.family == "swin"


def test_explain_shows_tokens_kernels_and_reducers() -> None:
    plan = vitedge.explain(vitedge.optimize_(load("cifar-vit"), "merge:r=5", "int8attn", "int8"))
    first, last = plan["blocks"][0], plan["blocks"][-1]
    assert (first["tokens_in"], first["tokens_out"]) == (66, 61)
    assert (last["tokens_in"], last["tokens_out"]) == (26, 21)
    assert first["kernel"] == "int8attn" and first["reducer"] == "merge r=5"
    assert plan["steps"]["weights"] == ["int8"] and plan["steps"]["compute_dtype"] == "float32"
    native = vitedge.explain(load("cifar-vit"))
    assert {b["kernel"] for b in native["blocks"]} == {"native"} and native["name"] == "baseline"
