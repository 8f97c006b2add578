"""Early exit: calibration math, the neutral threshold, images really leaving the batch (batched = one by
one), every supported model or a clear refusal, the shipped cifar-vit heads on real CIFAR-10 images, files and
saved directories, and the heads' training command."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import vitedge
from support import SUPPORTED_IDS, load_cached
from vitedge.dynamic.exit import ExitConfig, calibrate, exit_at, exit_info
from vitedge.dynamic.heads import ExitHeads, HeadsSpec, load_heads, pool_tokens, save_heads
from vitedge.models import bundled_part, load


def cifar_images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    from vitedge.data import as_tensor_batches, open_dataset

    enc = load_cached_cifar()
    ds = open_dataset("cifar10", enc.preprocess, limit=n)
    xs, ys = zip(*as_tensor_batches(ds, n), strict=True)
    return torch.cat(xs), torch.cat(ys)


_cifar: dict[str, object] = {}


def load_cached_cifar():
    if "enc" not in _cifar:
        _cifar["enc"] = load("cifar-vit").eval()
    return _cifar["enc"]


# --- calibration -----------------------------------------------------------------------------------
def test_exit_at_picks_the_first_head_over_the_threshold() -> None:
    scores = torch.tensor([[0.2, 0.9, 0.95], [0.1, 0.2, 0.3], [0.99, 0.1, 0.1]])
    assert exit_at(scores, 0.5).tolist() == [1, 3, 0]
    assert exit_at(scores, 1.0).tolist() == [3, 3, 3]


def synthetic_records(n: int = 4000) -> dict[str, torch.Tensor]:
    """One head whose answer is right when its confidence is > 0.7 and wrong below; the final is always
    right."""
    g = torch.Generator().manual_seed(0)
    conf = torch.rand(n, 1, generator=g)
    label = torch.randint(0, 10, (n,), generator=g)
    pred = torch.where(conf[:, 0] > 0.7, label, (label + 1) % 10)[:, None]
    return {"confidence": conf, "entropy": conf, "pred": pred, "final": label.clone(), "label": label}


def test_calibration_stops_where_the_loss_would_exceed_the_budget() -> None:
    rec = synthetic_records()
    cal = calibrate(rec, budget=0.01, criterion="confidence", blocks=(1,), depth=4)
    # every threshold above 0.7 costs nothing; below it each exited image is a loss
    assert 0.69 <= cal.threshold <= 0.72
    assert cal.bound <= 0.01
    assert cal.exits[0] == pytest.approx(0.3, abs=0.03)
    assert cal.depth == pytest.approx((0.3 * 2 + 0.7 * 4) / 4, abs=0.03)
    never = calibrate(rec, budget=0.0, criterion="confidence", blocks=(1,), depth=4)
    assert never.threshold == 1.0 and never.exits == (0.0,) and never.depth == 1.0


def test_calibration_does_not_take_a_lucky_dip() -> None:
    """Losses between 0.5 and 0.7, none below: the bound is broken at 0.7 and lower thresholds are not
    taken even though their mean loss falls again."""
    rec = synthetic_records()
    conf = rec["confidence"][:, 0]
    rec["pred"][:, 0] = torch.where(conf < 0.5, rec["label"], rec["pred"][:, 0])
    cal = calibrate(rec, budget=0.01, criterion="confidence", blocks=(1,), depth=4)
    assert cal.threshold >= 0.69


def test_config_refuses_bad_values() -> None:
    for bad in ({"budget": 1.0}, {"budget": -0.1}, {"criterion": "margin"}, {"threshold": 1.5}):
        with pytest.raises(ValueError, match="exit:"):
            ExitConfig(**bad)


def test_pool_tokens_weights_patches_by_size() -> None:
    x = torch.arange(2 * 5 * 3, dtype=torch.float32).view(2, 5, 3)
    size = torch.tensor([1.0, 1.0, 3.0, 1.0, 0.0]).view(1, 5, 1).expand(2, 5, 1)
    got = pool_tokens(x, 1, 2, size)  # class token, then the patch mean of tokens 2..4 weighted 3:1:0
    want = torch.cat([x[:, 0], (3 * x[:, 2] + x[:, 3]) / 4], -1)
    torch.testing.assert_close(got, want)


# --- the plan step -----------------------------------------------------------------------------------
def test_neutral_threshold_reproduces_the_model() -> None:
    base = load_cached_cifar()
    x, _ = cifar_images(16)
    enc = vitedge.optimize_(load("cifar-vit").eval(), "exit:threshold=1.0")
    with torch.inference_mode():
        want = base(x)
        got, trace = enc.forward_traced(x)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert trace.depth is not None and trace.depth.tolist() == [9] * 16


def test_batched_exits_equal_one_image_at_a_time() -> None:
    """Images that exit leave the batch; the rest run on as a smaller batch with the same answers."""
    x, _ = cifar_images(32)
    enc = vitedge.optimize_(load("cifar-vit").eval(), "exit:budget=0.01")
    with torch.inference_mode():
        got, trace = enc.forward_traced(x)
        one = torch.cat([enc(x[i : i + 1]) for i in range(len(x))])
    assert trace.depth is not None
    assert 0 < int((trace.depth < 9).sum()) < len(x)  # some leave, some do not
    torch.testing.assert_close(got, one, atol=1e-4, rtol=1e-4)


def test_exits_stack_with_merging() -> None:
    x, _ = cifar_images(16)
    enc = vitedge.optimize_(load("cifar-vit").eval(), "merge:r=4", "exit:threshold=0.9")
    with torch.inference_mode():
        got = enc(x)
        one = torch.cat([enc(x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(got, one, atol=1e-4, rtol=1e-4)
    assert enc.plan is not None and enc.plan.blocks[0].reducer is not None


@pytest.mark.parametrize("model_id", SUPPORTED_IDS)
def test_runs_on_every_classifier_or_refuses(model_id: str) -> None:
    base = load_cached(model_id)
    if base.info.family == "swin" or base.info.num_classes <= 0:
        message = "single-sequence" if base.info.family == "swin" else "needs a classifier"
        with pytest.raises(ValueError, match=message):
            vitedge.optimize_(base, "exit:threshold=0.5")  # refused before anything changes
        assert base.plan is None and not base.applied
        return
    enc = load(model_id, img_size=base.img_size[0] if model_id.startswith("timm:") else None).eval()
    if bundled_part(model_id, "exits") is None:  # vit4mnist ships heads; timm/HF ids have none
        with pytest.raises(ValueError, match="no trained exit heads"):
            vitedge.optimize_(load(model_id), "exit")
    vitedge.optimize_(enc, "exit:threshold=0.0")  # untrained heads: every image leaves at the first head
    x = enc.example_input(3)
    with torch.inference_mode():
        out, trace = enc.forward_traced(x)
    first = enc.exits.spec.blocks[0] + 1
    assert out.shape == (3, enc.info.num_classes)
    assert trace.depth is not None and trace.depth.tolist() == [first] * 3


def test_refuses_stacks_that_cannot_work() -> None:
    with pytest.raises(ValueError, match="router"):
        vitedge.optimize_(load("cifar-vit"), "adaptive", "exit")
    with pytest.raises(ValueError, match="compile"):
        vitedge.optimize_(load("cifar-vit"), "exit", "compile")


def test_heads_for_another_model_are_refused(tmp_path: Path) -> None:
    spec = HeadsSpec(blocks=(1, 2), dim=64, num_cls=1, hidden=32, classes=10)  # vit4mnist's width
    path = save_heads(tmp_path / "h.safetensors", ExitHeads(spec), _records(50, 2), {"model": "vit4mnist"})
    with pytest.raises(ValueError, match="do not fit cifar-vit"):
        vitedge.optimize_(load("cifar-vit"), f"exit:heads={path}")
    enc = vitedge.optimize_(load("vit4mnist"), f"exit:heads={path},budget=0.05")
    assert enc.plan is not None and enc.plan.blocks[1].exit is not None


def _records(n: int, e: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    label = torch.randint(0, 10, (n,), generator=g)
    return {
        "confidence": torch.rand(n, e, generator=g),
        "entropy": torch.rand(n, e, generator=g),
        "pred": torch.randint(0, 10, (n, e), generator=g),
        "final": label.clone(),
        "label": label,
    }


def test_heads_file_round_trip_and_damage(tmp_path: Path) -> None:
    spec = HeadsSpec(blocks=(0, 3), dim=16, num_cls=2, hidden=8, classes=5)
    heads = ExitHeads(spec)
    rec = _records(20, 2)
    path = save_heads(tmp_path / "h.safetensors", heads, rec, {"model": "x"})
    got = load_heads(path)
    assert got.heads.spec == spec and got.meta["model"] == "x"
    for k, v in rec.items():
        torch.testing.assert_close(got.calibration[k], v)
    pooled = torch.randn(3, spec.in_features)
    torch.testing.assert_close(got.heads(1, pooled), heads(1, pooled))
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_heads(tmp_path / "bad.safetensors")
    with pytest.raises(FileNotFoundError):
        load_heads(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="lack"):
        save_heads(tmp_path / "x.safetensors", heads, {"confidence": rec["confidence"]}, {})


# --- the shipped cifar-vit heads on real images ----------------------------------------------------
def test_shipped_cifar_heads_keep_the_budget_on_real_images() -> None:
    """On 1,000 CIFAR-10 test images spread over every class (never used to calibrate), budget 0.01 saves
    blocks and loses at most the budget plus the sampling error of 1,000 images; eval reports it."""
    assert bundled_part("cifar-vit", "exits") is not None
    from torch.utils.data import Subset

    from vitedge.commands import dynamic_report, run_eval
    from vitedge.data import as_tensor_batches, open_dataset
    from vitedge.measure.evaluate import evaluate

    base = load_cached_cifar()
    enc = vitedge.optimize_(load("cifar-vit").eval(), "exit:budget=0.01")
    ds = Subset(open_dataset("cifar10", base.preprocess), range(0, 10000, 10))
    b, r = evaluate({"baseline": base, "exit": enc}, as_tensor_batches(ds, 250))
    assert b.top1 - r.top1 <= 0.01 + 0.01
    rep = dynamic_report(enc, r.depth)
    assert rep["mean_depth"] < 0.8
    assert sum(rep["depth_blocks"].values()) == 1000
    assert rep["exit"]["calibration_bound"] <= 0.01
    assert rep["exit"]["blocks"] == [3, 4, 5, 6, 7, 8]
    out = run_eval("cifar-vit", data="cifar10", opts=["exit:budget=0.01"], limit=64)  # the CLI's JSON
    assert {"baseline_top1", "mean_depth", "depth_blocks", "exit"} <= set(out)


def test_saved_directory_carries_the_heads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The directory holds the heads file and the threshold: it loads after the original file is gone,
    with no warning about the skeleton's weights."""
    import shutil

    heads = tmp_path / "mine.safetensors"
    shutil.copyfile(bundled_part("cifar-vit", "exits"), heads)  # type: ignore[arg-type]
    enc = vitedge.optimize_(load("cifar-vit").eval(), f"exit:budget=0.01,heads={heads}")
    with torch.no_grad():
        for p in enc.exits.parameters():  # a change the heads file does not have
            p.mul_(1.01)
    vitedge.save(enc, tmp_path / "m")
    threshold = exit_info(enc)["threshold"]
    heads.unlink()
    manifest = json.loads((tmp_path / "m" / "vitedge.json").read_text())
    assert manifest["configs"][0]["params"]["heads"] == "exits.safetensors"
    with caplog.at_level("WARNING"):
        back = vitedge.load(str(tmp_path / "m"))
    assert not [r for r in caplog.records if "other weights" in r.getMessage()]
    x, _ = cifar_images(8)
    with torch.inference_mode():
        torch.testing.assert_close(back(x), enc(x))
    assert exit_info(back)["threshold"] == threshold


def test_optimize_out_bundles_the_heads(tmp_path: Path) -> None:
    from vitedge.commands import run_optimize

    r = run_optimize("cifar-vit", opts=["exit:budget=0.02"], out=tmp_path / "o")
    assert (tmp_path / "o" / "exits.safetensors").is_file()
    assert r["configs"][0]["params"]["threshold"] == pytest.approx(0.9225, abs=1e-3)
    back = vitedge.load(str(tmp_path / "o"))
    assert back.plan is not None and back.plan.router is not None


# --- training ---------------------------------------------------------------------------------------
def test_train_exit_heads_writes_calibrated_heads(tmp_path: Path) -> None:
    from vitedge.train.exits import ExitTrainConfig, train_exit_heads

    cfg = ExitTrainConfig(
        model="vit4mnist", blocks=(2, 4), data="mnist", epochs=1, limit=600, eval_limit=300, out=str(tmp_path)
    )
    stages: set[str] = set()
    r = train_exit_heads(cfg, progress=lambda stage, done, total: stages.add(stage))
    assert {"features", "heads", "calibration", "test (report only)"} <= stages
    got = load_heads(r["heads"])
    assert got.heads.spec.blocks == (1, 3)
    assert r["calibration_images"] == 60 and r["train_images"] == 540
    assert got.calibration["pred"].shape == (60, 2)
    assert got.meta["weights_digest"] == load("vit4mnist").weights_digest()
    assert len(r["test"]["head_top1"]) == 2
    enc = vitedge.optimize_(load("vit4mnist"), f"exit:heads={r['heads']}")
    assert enc.plan is not None and enc.plan.router is not None
    with pytest.raises(ValueError, match=r"after blocks 1\.\.5"):
        train_exit_heads(ExitTrainConfig(model="vit4mnist", blocks=(6,), data="mnist"))


def test_shipped_vit4mnist_heads_on_digits_they_never_saw() -> None:
    """vit4mnist's heads trained and calibrated on the first 5,000 test digits; 1,000 of the others."""
    from torch.utils.data import Subset

    from vitedge.data import as_tensor_batches, open_dataset
    from vitedge.measure.evaluate import evaluate

    base = load("vit4mnist").eval()
    enc = vitedge.optimize_(load("vit4mnist").eval(), "exit:budget=0.01")
    ds = Subset(open_dataset("mnist", base.preprocess), range(5000, 6000))
    b, r = evaluate({"baseline": base, "exit": enc}, as_tensor_batches(ds, 500))
    assert b.top1 - r.top1 <= 0.01 + 0.01  # the budget plus the sampling error of 1,000 digits
    assert r.depth is not None
    assert sum(d * c for d, c in r.depth.items()) / 1000 / 6 < 0.6


def test_cli_refuses_options_that_do_not_apply() -> None:
    from vitedge.cli_train import exit_config

    with pytest.raises(ValueError, match="--teacher"):
        exit_config("cifar-vit", "3,5", {"teacher": "cifar-resnet", "hard_distill": False})
    with pytest.raises(ValueError, match="block numbers"):
        exit_config("cifar-vit", "3,x", {})
    cfg = exit_config("cifar-vit", "5,3", {"epochs": 2, "batch": 64})
    assert cfg.blocks == (3, 5) and cfg.batch_size == 64
    assert json.dumps(cfg.blocks)


def test_expected_macs_follow_the_depth_each_image_ran() -> None:
    from vitedge.plan.explain import expected_macs

    x, _ = cifar_images(4)
    full = load_cached_cifar().arch().macs
    never = vitedge.optimize_(load("cifar-vit").eval(), "exit:threshold=1.0")
    head = never.exits.spec.macs()
    assert expected_macs(never, x) == pytest.approx(full + 6 * head)  # every head runs, nobody leaves
    first = vitedge.optimize_(load("cifar-vit").eval(), "exit:threshold=0.0")
    spec = first.arch()
    embed = sum(layer.macs for layer in spec.layers if layer.kind == "embed")
    block = (full - embed - sum(layer.macs for layer in spec.layers if layer.kind == "head")) / 9
    assert expected_macs(first, x) == pytest.approx(embed + 3 * block + head)


def test_profile_reports_the_macs_the_calibration_predicts() -> None:
    from vitedge.commands import run_profile

    full = run_profile("cifar-vit", counted=False)
    never = run_profile("cifar-vit", opts=["exit:threshold=1.0"], counted=False)
    head = load_heads(bundled_part("cifar-vit", "exits")).heads.spec.macs()  # type: ignore[arg-type]
    assert never["expected_macs"] == pytest.approx(full["macs"] + 6 * head)
    r = run_profile("cifar-vit", opts=["exit:budget=0.01"], counted=False)
    ratio = r["expected_macs"] / full["macs"]
    assert r["exit"]["calibration_depth"] < ratio < r["exit"]["calibration_depth"] + 0.02  # + the heads
    assert "expected_macs" not in full
