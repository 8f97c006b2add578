"""vitedge.wrap and optimize_ on modules a user holds (timm, Hugging Face), and save/reload of the result."""

from __future__ import annotations

import pytest
import timm
import torch
import transformers as T

import vitedge
from vitedge.models import load


def _same_weights(module: torch.nn.Module, model_id: str) -> vitedge.Encoder:
    enc = load(model_id)
    enc.model.load_state_dict(module.state_dict())  # type: ignore[union-attr]
    return enc


def test_optimize_a_timm_module_matches_the_same_stack_through_load() -> None:
    """The issue's acceptance case: a timm module in memory, -O strings, same result as through an id."""
    module = timm.create_model("deit_tiny_patch16_224").eval()
    ref = vitedge.optimize_(_same_weights(module, "timm:deit_tiny_patch16_224"), "merge:r=8", "int8")
    enc = vitedge.optimize_(module, "merge:r=8", "int8")
    assert isinstance(enc, vitedge.Encoder) and enc.model is module  # wraps, does not copy
    assert enc.model_id == "timm:deit_tiny_patch16_224" and enc.info.extra["wrapped"]
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(enc(x), ref(x))
    assert type(module.blocks[0].mlp.fc1).__name__ != "Linear"  # int8 changed the user's module in place


def test_wrap_keeps_the_mode_and_returns_encoders_unchanged() -> None:
    module = timm.create_model("deit_tiny_patch16_224")  # train mode, as timm builds it
    enc = vitedge.wrap(module)
    assert enc.training and vitedge.wrap(enc) is enc
    assert vitedge.optimize_(enc) is enc


@pytest.mark.parametrize(
    ("module", "model_id"),
    [
        (lambda: T.CLIPVisionModel(T.CLIPVisionConfig()), "hf:clip-vision"),
        (lambda: T.SiglipVisionModel(T.SiglipVisionConfig()), "hf:siglip-vision"),
    ],
)
def test_wrapped_hugging_face_models_match_their_ids(module, model_id: str) -> None:
    m = module().eval()
    enc = vitedge.wrap(m)
    ref = load(model_id)
    ref.model.load_state_dict(m.state_dict())  # type: ignore[union-attr]
    assert enc.preprocess == ref.preprocess and enc.layout == ref.layout
    x = ref.example_input(1)
    with torch.inference_mode():
        assert torch.equal(vitedge.optimize_(enc, "merge:r=4")(x), vitedge.optimize_(ref, "merge:r=4")(x))


def test_wrap_a_swin_module() -> None:
    m = timm.create_model("swin_tiny_patch4_window7_224").eval()
    enc = vitedge.optimize_(m, "window_merge:r=8")
    assert enc.info.family == "swin" and enc.plan is not None


@pytest.mark.parametrize("thing", [torch.nn.Linear(2, 2), "not a module", timm.create_model("resnet18")])
def test_unsupported_modules_are_refused_by_name(thing) -> None:
    with pytest.raises(TypeError, match="vitedge"):
        vitedge.optimize_(thing, "int8")


def test_a_fine_tuned_wrapped_model_saves_and_reloads(tmp_path) -> None:
    """A user's timm model with its own classifier width and weights, optimised, saved, reloaded."""
    module = timm.create_model("deit_tiny_patch16_224", num_classes=10).eval()
    with torch.no_grad():
        module.head.weight.normal_(generator=torch.Generator().manual_seed(1))
    enc = vitedge.optimize_(module, "structured:heads=0.25", "merge:r=6", "int8")
    vitedge.save(enc, tmp_path / "fast")
    again = vitedge.load(str(tmp_path / "fast"))
    assert [vitedge.describe(c) for c in again.applied] == ["structured:heads=0.25", "merge:r=6", "int8"]
    x = enc.example_input(2)
    with torch.inference_mode():
        torch.testing.assert_close(again(x), enc(x))
    assert again.info.num_classes == 10


def test_a_wrapped_hugging_face_model_saves_and_reloads(tmp_path) -> None:
    module = T.ViTModel(T.ViTConfig()).eval()
    enc = vitedge.optimize_(module, "prune:keep=0.5")
    assert enc.model_id == "hf:vit"  # the built-in id of its class, which save rebuilds the skeleton from
    vitedge.save(enc, tmp_path / "vit")
    again = vitedge.load(str(tmp_path / "vit"))
    x = enc.example_input(1)
    with torch.inference_mode():
        assert torch.equal(again(x), enc(x))


def test_a_loaded_model_saves_after_more_options(tmp_path) -> None:
    vitedge.save(vitedge.optimize_(load("vit4mnist"), "merge:r=1"), tmp_path / "a")
    a = vitedge.optimize_(vitedge.load(str(tmp_path / "a")), "int8attn")
    vitedge.save(a, tmp_path / "b")
    b = vitedge.load(str(tmp_path / "b"))
    assert [vitedge.describe(c) for c in b.applied] == ["merge:r=1", "int8attn"]
    x = a.example_input(3)
    with torch.inference_mode():
        assert torch.equal(a(x), b(x))
