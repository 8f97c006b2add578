"""The training loop: exact resume, refusals, time budget, and the command-line entry with --install."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vitedge.models import load
from vitedge.models.cifar import build_project_model
from vitedge.models.project import portable_state_dict
from vitedge.train import DistillConfig, TrainConfig, train
from vitedge.train.checkpoint import load_checkpoint


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A weights folder holding a random (untrained) cifar-resnet to serve as teacher."""
    folder = tmp_path_factory.mktemp("weights")
    torch.manual_seed(5)
    save_file(
        portable_state_dict(build_project_model("cifar-resnet").model),
        str(folder / "cifar-resnet.safetensors"),
    )
    return folder


def _config(out: Path, **kwargs) -> TrainConfig:
    base = {
        "model": "cifar-vit",
        "limit": 64,
        "eval_limit": 16,
        "batch_size": 16,
        "epochs": 2,
        "warmup_epochs": 0.5,
        "augment": "trivial",
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "distill": DistillConfig(teacher="cifar-resnet", ce_weight=0.5, hard_weight=0.5, kd_weight=0.5),
        "device": "cpu",
        "bf16": False,  # CPU bf16 kernels are compiled per shape on first use: slow for a test
        "out": str(out),
    }
    return TrainConfig(**{**base, **kwargs})


@pytest.fixture(scope="module")
def straight(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITEDGE_WEIGHTS", str(teacher_dir))
        out = tmp_path_factory.mktemp("straight")
        return train(_config(out)), load_checkpoint(out)


@pytest.mark.parametrize("stop", [4, 6], ids=["epoch-boundary", "mid-epoch"])
def test_resume_is_bit_exact(stop: int, straight, teacher_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("VITEDGE_WEIGHTS", str(teacher_dir))
    full, full_ckpt = straight
    paused = train(_config(tmp_path, stop_after_steps=stop))
    assert paused.status == "paused" and paused.weights is None
    resumed = train(_config(tmp_path, stop_after_steps=None), resume=True)
    assert resumed.status == "done"
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    opt_a, opt_b = full_ckpt.optimizer["state"], load_checkpoint(tmp_path).optimizer["state"]
    assert all(torch.equal(opt_a[p][k], opt_b[p][k]) for p in opt_a for k in opt_a[p])
    strip = [
        {k: v for k, v in h.items() if k not in ("seconds", "elapsed_s", "images_per_s")}
        for h in full.history
    ]
    assert strip == [
        {k: v for k, v in h.items() if k not in ("seconds", "elapsed_s", "images_per_s")}
        for h in resumed.history
    ]
    assert resumed.top1 == full.top1
    assert load_file(str(full.weights)).keys() == load_file(str(resumed.weights)).keys()


def test_run_writes_weights_card_and_checkpoint(straight) -> None:
    full, ckpt = straight
    assert full.status == "done" and full.epochs_run == 2 and len(full.history) == 2
    assert full.weights is not None and full.weights.name == "cifar-vit.safetensors"
    card = json.loads(full.weights.with_suffix(".json").read_text())
    assert card["model"] == "cifar-vit" and card["accuracy"]["n"] == 16
    assert card["recipe"]["distill"]["teacher"] == "cifar-resnet"
    assert card["architecture"]["params"] == sum(p.numel() for p in full.model.parameters())
    assert ckpt.state["status"] == "done" and ckpt.state["global_step"] == 8
    assert not list(full.out.glob(".checkpoint-*"))  # no temporary folders left behind


def test_refusals(straight, tmp_path: Path, teacher_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("VITEDGE_WEIGHTS", str(teacher_dir))
    full, _ = straight
    with pytest.raises(ValueError, match="already holds"):
        train(_config(full.out))
    with pytest.raises(ValueError, match="already finished"):
        train(_config(full.out), resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(_config(tmp_path), resume=True)
    train(_config(tmp_path, stop_after_steps=1, distill=None))
    with pytest.raises(ValueError, match="lr changed"):
        train(_config(tmp_path, distill=None, lr=0.5), resume=True)


def test_time_budget_ends_the_run_early(tmp_path: Path) -> None:
    cfg = _config(tmp_path, model="cifar-resnet", distill=None, epochs=50, max_minutes=0.001, limit=32)
    result = train(cfg)
    assert result.status == "done" and result.epochs_run < 50 and result.weights is not None
    budget = load_checkpoint(tmp_path).state["budget"]
    assert budget and budget[-1]["epochs_to"] == result.epochs_run


def test_module_entry_trains_and_installs(tmp_path: Path, monkeypatch, capsys) -> None:
    from vitedge.train.__main__ import main

    weights = tmp_path / "weights"
    monkeypatch.setenv("VITEDGE_WEIGHTS", str(weights))
    with pytest.raises(ValueError, match=r"no trained weights.*vitedge train cifar-resnet"):
        load("cifar-resnet")
    argv = ["cifar-resnet", "--limit", "64", "--eval-limit", "32", "--batch", "32", "--epochs", "1"]
    argv += ["--optimizer", "sgd", "--lr", "0.1", "--augment", "cutout", "--device", "cpu", "--no-bf16"]
    argv += ["--out", str(tmp_path / "run"), "--install", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["status"] == "done" and out["installed"] == [
        str(weights / f"cifar-resnet{s}") for s in (".safetensors", ".json")
    ]
    enc = load("cifar-resnet")
    assert enc.info.trained and enc.model_id == "cifar-resnet" and not enc.training
    card = json.loads((weights / "cifar-resnet.json").read_text())
    assert card["command"].startswith("vitedge train cifar-resnet --limit 64")
    assert card["accuracy"]["top1"] == out["top1"]
    assert main(["cifar-resnet", "--out", str(tmp_path / "run"), "--resume", "--lr", "0.2"]) == 2
    assert "--lr" in capsys.readouterr().err


def test_options_match_the_typer_command() -> None:
    import inspect

    from vitedge.cli import train_
    from vitedge.train.run import build_parser, config_from_options

    dests = {a.dest for a in build_parser()._actions} - {"help"}
    params = set(inspect.signature(train_).parameters)
    assert dests - {"as_json"} <= params and params - {"as_json"} <= dests
    cfg = config_from_options(
        "cifar-vit", {"batch": 64, "teacher": "cifar-resnet", "hard_distill": True, "mixup": None}
    )
    assert cfg.batch_size == 64 and cfg.distill is not None and cfg.distill.hard_weight == 0.5
    assert dataclasses.replace(cfg, batch_size=512).out == "runs/cifar-vit"


def test_time_budget_refits_the_schedule(tmp_path: Path, monkeypatch) -> None:
    """With a clock that ticks a fixed amount per reading, epochs cost a fixed time: the run is refitted to
    the budget after its first epoch and ends within it, with the cosine schedule decayed to its end."""
    import itertools

    import vitedge.train.loop as loop

    ticks = itertools.count()
    monkeypatch.setattr(loop.time, "monotonic", lambda: next(ticks) * 0.25)
    cfg = _config(
        tmp_path, model="cifar-swin", distill=None, limit=32, eval_limit=16, epochs=40, max_minutes=0.5
    )
    result = train(cfg)
    budget = load_checkpoint(tmp_path).state["budget"]
    assert (
        2 < result.epochs_run < 40
        and budget[0]["after_epoch"] == 1
        and budget[-1]["epochs_to"] == result.epochs_run
    )
    assert result.history[-1]["elapsed_s"] <= 30.0
    assert result.history[-1]["lr"] < 0.1 * cfg.lr  # the schedule was refitted, not cut off


@pytest.mark.parametrize("drop_path", [None, 0.1])
def test_init_starts_from_given_weights(
    drop_path: float | None, straight, teacher_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """--init fine-tunes: the run starts from the given weights, not from a fresh initialisation (also when
    --drop-path rebuilds the model)."""
    monkeypatch.setenv("VITEDGE_WEIGHTS", str(teacher_dir))
    full, _ = straight
    start = portable_state_dict(full.model.model)
    result = train(
        _config(
            tmp_path,
            init=str(full.weights),
            epochs=1,
            lr=1e-12,
            mixup_alpha=0.0,
            cutmix_alpha=0.0,
            drop_path=drop_path,
        )
    )
    end = portable_state_dict(result.model.model)
    moved = max((end[k].float() - start[k].float()).abs().max().item() for k in start if k in end)
    assert moved < 1e-3  # a vanishing learning rate leaves the initial weights in place
    fresh = portable_state_dict(build_project_model("cifar-vit").model)
    assert any(not torch.allclose(fresh[k], start[k]) for k in start if k in fresh)


def test_optimize_trains_the_optimised_model_and_writes_a_model_dir(
    straight, teacher_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    """-O structured + merge: the pruned model is what trains (fewer parameters), and ``out/model`` reloads as
    a model id giving the trained model's outputs."""
    import shutil

    from vitedge.models.saved import MANIFEST

    full, _ = straight
    weights = tmp_path / "weights"
    shutil.copytree(teacher_dir, weights)  # no cifar-vit weights installed: the directory must not need them
    monkeypatch.setenv("VITEDGE_WEIGHTS", str(weights))
    opts = ("structured:heads=0.5,mlp=0.5", "merge:r=2")
    result = train(
        _config(tmp_path / "run", init=str(full.weights), epochs=1, distill=None, optimize=opts, limit=32)
    )
    assert result.status == "done"
    trained = result.model
    assert sum(p.numel() for p in trained.parameters()) < sum(p.numel() for p in full.model.parameters())
    manifest = json.loads((tmp_path / "run" / "model" / MANIFEST).read_text())
    assert manifest["weights_after"] == 2 and manifest["name"] == " ".join(opts)
    reloaded = load(str(tmp_path / "run" / "model"))
    x = torch.randn(4, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(reloaded(x), trained(x))
        assert not torch.allclose(reloaded(x), full.model.eval()(x), atol=1e-3)
    # A second run continues from the directory and may stack more; its directory carries the whole stack.
    again = train(
        _config(
            tmp_path / "again",
            init=str(tmp_path / "run" / "model"),
            epochs=1,
            distill=None,
            limit=32,
            lr=1e-12,
        )
    )
    manifest = json.loads((tmp_path / "again" / "model" / MANIFEST).read_text())
    assert [c["name"] for c in manifest["configs"]] == ["structured", "merge"] and manifest[
        "weights_after"
    ] == 2
    with torch.inference_mode():
        torch.testing.assert_close(load(str(tmp_path / "again" / "model"))(x), again.model(x))
        torch.testing.assert_close(again.model(x), trained(x), atol=1e-3, rtol=1e-3)  # lr ~ 0: unchanged


def test_install_refuses_an_optimised_model(tmp_path: Path) -> None:
    from vitedge.train.run import run_train

    cfg = _config(tmp_path, optimize=("structured:mlp=0.5",), distill=None)
    with pytest.raises(ValueError, match="--install would replace the project weights"):
        run_train(cfg, resume=False, install_weights=True, console=None, command=None)


def test_optimize_refuses_techniques_that_do_not_train(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"-O int8: training accepts only structured, merge, prune"):
        _config(tmp_path, optimize=("merge:r=2", "int8"))
    with pytest.raises(ValueError, match="unknown"):
        _config(tmp_path, optimize=("nosuch",))


def test_train_only_refuses_a_prefix_that_matches_nothing(tmp_path: Path) -> None:
    from vitedge.train.run import config_from_options

    assert config_from_options("cifar-vit", {"train_only": "token_scorers"}).train_only == "token_scorers"
    with pytest.raises(ValueError, match="train_only must be"):
        _config(tmp_path, train_only="")
    with pytest.raises(ValueError, match="'nosuch' matches no parameter"):
        train(_config(tmp_path, distill=None, train_only="nosuch", limit=32, epochs=1))
