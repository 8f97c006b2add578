"""The project's CIFAR-10 architectures and the loader of their committed weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from vitedge.models import PROJECT_MODELS, build_untrained, load
from vitedge.models.cifar import CIFAR10_MEAN, build_project_model
from vitedge.models.project import portable_state_dict

# Committed weights must stay under 20 MB.
MAX_WEIGHT_BYTES = 20_000_000


@pytest.mark.parametrize("name", PROJECT_MODELS)
def test_architectures(name: str) -> None:
    enc = build_project_model(name).eval()
    assert enc.model_id == name and not enc.info.trained
    assert enc.preprocess.img_size == (32, 32) and enc.preprocess.mean == CIFAR10_MEAN
    assert enc.preprocess.resize is None
    assert sum(p.numel() for p in enc.parameters()) * 4 < MAX_WEIGHT_BYTES
    assert enc(enc.example_input(2)).shape == (2, 10)
    spec = enc.arch()
    assert spec.params == sum(p.numel() for p in enc.parameters())
    assert spec.macs > 0


def test_resnet_macs_match_flop_counter() -> None:
    enc = build_project_model("cifar-resnet").eval()
    assert enc.blocks == []
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        enc(enc.example_input(1))
    counted_macs = counter.get_total_flops() / 2
    assert abs(counted_macs - enc.arch().macs) <= 0.01 * counted_macs
    assert [layer.kind for layer in enc.arch().layers].count("conv") == 8


def test_vit_and_swin_layouts() -> None:
    vit, swin = build_project_model("cifar-vit"), build_project_model("cifar-swin")
    assert vit.layout.num_prefix == 2 and vit.layout.grid == (8, 8)
    assert vit.info.extra["timm_class"] == "VisionTransformerDistilled"
    assert len(vit.blocks) == 9 and all(b.window is None for b in vit.blocks)
    assert swin.layout.grid == (16, 16) and {b.window for b in swin.blocks} == {(4, 4)}


def test_missing_weights_name_the_train_command(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VITEDGE_WEIGHTS", str(tmp_path))
    for name in PROJECT_MODELS:
        with pytest.raises(ValueError, match=f"no trained weights.*'vitedge train {name}"):
            load(name)


@pytest.mark.parametrize("name", PROJECT_MODELS)
def test_load_trained_weights(name: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VITEDGE_WEIGHTS", str(tmp_path))
    torch.manual_seed(3)
    trained = build_project_model(name).eval()
    state = portable_state_dict(trained.model)
    if name == "cifar-swin":  # a timm version that saves derived buffers must still load
        state["layers.0.blocks.0.attn.relative_position_index"] = torch.zeros(16, 16, dtype=torch.int64)
    save_file(state, str(tmp_path / f"{name}.safetensors"))
    (tmp_path / f"{name}.json").write_text(json.dumps({"accuracy": {"top1": 0.9}}))
    enc = load(name)
    assert enc.info.trained and enc.model_id == name and not enc.training
    assert enc.info.extra["card_accuracy"] == {"top1": 0.9}
    x = enc.example_input(2)
    torch.testing.assert_close(enc(x), trained(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="32x32"):
        load(name, img_size=64)


def test_build_untrained() -> None:
    enc = build_untrained("timm:deit_tiny_distilled_patch16_224", num_classes=10, img_size=32)
    assert enc.training and enc.info.num_classes == 10 and enc.img_size == (32, 32)
    assert build_untrained("cifar-resnet", num_classes=3).info.num_classes == 3
    with pytest.raises(ValueError, match="training takes"):
        build_untrained("vit4mnist", num_classes=10)
    with pytest.raises(ValueError, match="32x32"):
        build_untrained("cifar-vit", num_classes=10, img_size=64)


def _committed(name: str):
    """A committed model directory under artifacts/, and its top-1 on every 20th CIFAR-10 test image (500
    images, all ten classes)."""
    from vitedge.data import as_tensor_batches, open_dataset

    model = load(str(Path(__file__).resolve().parents[2] / "artifacts" / name)).eval()
    ds = open_dataset("cifar10", model.preprocess)
    x, y = next(as_tensor_batches(torch.utils.data.Subset(ds, range(0, len(ds), 20)), 500))
    with torch.inference_mode():
        return model, (model(x).argmax(-1) == y).float().mean().item()


def test_committed_recovered_structured_model() -> None:
    """The committed structured-pruned, distilled cifar-vit loads as a model directory, is smaller, and still
    classifies real CIFAR-10 test images."""
    from vitedge.measure import analyze

    model, top1 = _committed("cifar-vit-h50m50-recovered")
    assert analyze(model.arch()).flops < 0.6 * analyze(load("cifar-vit").arch()).flops
    assert top1 > 0.75


def test_committed_merge_tuned_model() -> None:
    """The committed cifar-vit fine-tuned under merge:r=6 reloads with its merging, carries fewer tokens than
    cifar-vit, and classifies real CIFAR-10 test images."""
    from vitedge.measure import analyze

    model, top1 = _committed("cifar-vit-merge6-tuned")
    assert [c.r for c in model.applied] == [6]
    assert analyze(model.arch()).flops < 0.75 * analyze(load("cifar-vit").arch()).flops
    assert top1 > 0.78
