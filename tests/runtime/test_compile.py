"""-O compile: the compiled forward matches eager (with a token runner inside), copies run their own weights,
and bad settings, a missing C++ compiler, export and training get clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from vitedge.api import optimize_
from vitedge.export.plan import plan_export, refuse_applied
from vitedge.models import load
from vitedge.models.base import Encoder
from vitedge.options import parse_options
from vitedge.runtime.compile import CompileConfig, cxx_compiler, private_copy
from vitedge.train.config import trainable_options


def test_bad_mode_names_the_modes() -> None:
    with pytest.raises(ValueError, match="compile:mode must be one of default"):
        parse_options(["compile:mode=fastest"])


needs_cxx = pytest.mark.skipif(cxx_compiler() is None, reason="Inductor needs a C++ compiler")


@needs_cxx
@pytest.mark.parametrize("after", ["merge:r=1", "int8"])
def test_compile_must_come_last(after: str) -> None:
    with pytest.raises(ValueError, match=f"-O {after} comes after -O compile; compile must be the last"):
        optimize_(load("vit4mnist"), *parse_options(["compile", after]))
    with pytest.raises(ValueError, match="-O compile is given twice"):
        optimize_(load("vit4mnist"), *parse_options(["compile", "compile"]))
    compiled = optimize_(load("vit4mnist"), *parse_options(["compile"]))
    with pytest.raises(ValueError, match="already applied to this model"):
        optimize_(compiled, *parse_options([after]))


@pytest.mark.parametrize("before", ["adaptive", "int8attn"])
def test_refuses_to_follow_data_dependent_options(before: str) -> None:
    with pytest.raises(ValueError, match=f"-O compile cannot follow -O {before}"):
        optimize_(load("vit4mnist"), *parse_options([before, "compile"]))


def test_cache_namespace_leaves_compile_out() -> None:
    from vitedge.cache.keys import Namespace

    plain = optimize_(load("vit4mnist"), *parse_options(["merge:r=1"]))
    stacked = optimize_(load("vit4mnist"), *parse_options(["merge:r=1"]))
    stacked.applied.append(CompileConfig())  # as if compiled: the namespace must not see it
    assert Namespace.of(stacked) == Namespace.of(plain)


def test_missing_cxx_compiler_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    assert cxx_compiler() is None
    with pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        optimize_(load("vit4mnist"), CompileConfig())


def test_private_copy_has_its_own_code_object() -> None:
    """Each compiled encoder gets its own code object, so its recompiles do not use up the others' budget."""
    twin = private_copy(Encoder.logits)
    assert twin.__code__ is not Encoder.logits.__code__
    assert twin.__code__ == Encoder.logits.__code__
    model = load("vit4mnist")
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(twin(model, x), model.logits(x))


@needs_cxx
def test_saved_directory_reloads_compiled(tmp_path) -> None:
    """optimize --out keeps compile in the stack; the reloaded model compiles lazily (nothing runs here)."""
    from vitedge.api import config_to_dict, describe
    from vitedge.models.saved import write_optimized

    enc = optimize_(load("vit4mnist"), *parse_options(["merge:r=1", "compile"]))
    configs = [config_to_dict(c) for c in enc.applied]
    write_optimized(
        tmp_path / "m", enc, manifest={"base": "vit4mnist", "configs": configs, "weights_after": 2}
    )
    again = load(str(tmp_path / "m"))
    assert again.plan is not None and again.plan.compiled is not None
    assert [describe(c) for c in again.applied] == ["merge:r=1", "compile"]


def test_export_and_training_refuse_compile() -> None:
    with pytest.raises(ValueError, match="drop -O compile for export"):
        plan_export(parse_options(["merge:r=1", "compile"]))
    refuse_applied("a-saved-dir", parse_options(["merge:r=1", "compile"]))  # exported eagerly, no refusal
    with pytest.raises(ValueError, match="training accepts only"):
        trainable_options(("compile",))


@needs_cxx
def test_compiled_forward_matches_eager_and_copies_run_their_own_weights() -> None:
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randn(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    eager = optimize_(load("vit4mnist"), *parse_options(["merge:r=2"]))
    compiled = optimize_(load("vit4mnist"), *parse_options(["merge:r=2", "compile"]))
    assert compiled.plan is not None and compiled.plan.compiled is not None
    with torch.no_grad():
        want = eager(x)
        got = compiled(x)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # compiled, not an eager fallback
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        twin = copy.deepcopy(compiled)  # shares the compiled function, not the modules
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.allclose(twin(x), got, atol=1e-3)
        torch.testing.assert_close(twin(x), twin.logits(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(compiled(x), want, atol=1e-4, rtol=1e-4)  # the original is untouched
