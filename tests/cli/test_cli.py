"""The CLI through typer's runner: contract JSON keys and one-line errors."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from vitedge.cli import app

runner = CliRunner()


def run_json(*args: str) -> dict:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_profile_json_keys() -> None:
    out = run_json("profile", "vit4mnist", "--budget", "4GiB")
    for key in (
        "macs",
        "flops",
        "counted_flops",
        "params",
        "weight_bytes",
        "activation_bytes",
        "max_batch",
        "layers",
    ):
        assert key in out
    assert out["flops"] == 2 * out["macs"]
    assert out["params"] == 213_642
    assert abs(out["counted_flops"] / out["flops"] - 1) < 0.01
    assert {"name", "macs", "params", "bytes", "intensity"} <= set(out["layers"][0])


def test_eval_vit4mnist_contract() -> None:
    out = run_json("eval", "vit4mnist", "--data", "mnist")
    assert out["n"] == 10_000 and abs(out["top1"] - 0.9791) < 0.0005 and "top5" in out
    # The first 1,000 digits calibrate vit4mnist's optimisations; the other 9,000 are held out.
    assert out["n_holdout"] == 9_000 and 0.95 < out["top1_holdout"] < 1.0
    assert out["top1_holdout"] != out["top1"]


def test_eval_with_variant_and_reference() -> None:
    out = run_json("eval", "vit4mnist", "--data", "mnist", "-O", "bf16", "--limit", "500", "--reference")
    assert out["n"] == 500
    assert {"baseline_top1", "mean_cosine", "top1_agreement"} <= set(out)
    assert out["mean_cosine"] > 0.999


def test_bench_json_keys() -> None:
    out = run_json(
        "bench",
        "vit4mnist",
        "-O",
        "bf16",
        "--batch",
        "8",
        "--min-seconds",
        "0.2",
        "--iters",
        "3",
        "--max-seconds",
        "1",
    )
    assert out["baseline"]["name"] == "baseline"
    (variant,) = out["variants"]
    assert variant["name"] == "bf16"
    keys = ("batch", "threads", "p50_ms", "p95_ms", "images_per_s", "speedup", "speedup_low", "speedup_high")
    assert set(keys) <= set(variant)
    assert variant["speedup"] == variant["images_per_s"] / out["baseline"]["images_per_s"]  # the identity
    assert variant["speedup_low"] <= variant["speedup"] <= variant["speedup_high"]
    assert variant["stop"] in ("precision", "time cap", "iteration cap")


def test_reference_without_options_is_refused() -> None:
    bad = runner.invoke(app, ["eval", "vit4mnist", "--data", "mnist", "--limit", "10", "--reference"])
    assert bad.exit_code == 2 and "give -O options" in bad.stderr


def test_debug_shows_the_traceback() -> None:
    quiet = runner.invoke(app, ["profile", "no-such-model"])
    assert quiet.exit_code == 2 and "unknown model id" in quiet.stderr
    loud = runner.invoke(app, ["--debug", "profile", "no-such-model"])
    assert isinstance(loud.exception, ValueError)


def test_bench_on_real_images_drawn_across_the_set() -> None:
    """adaptive's keep rate depends on the image: --data times it on real digits of every class."""
    from vitedge.commands import timing_input
    from vitedge.data import open_dataset
    from vitedge.models import load

    enc = load("cifar-vit")
    x = timing_input(enc, 20, "cifar10")  # 4 batches of 20: at least 64 images are timed per round
    cifar = open_dataset("cifar10", enc.preprocess)
    picks = [round(i * (len(cifar) - 1) / 79) for i in range(80)]
    assert set(cifar.labels[picks].tolist()) == set(range(10))  # stored by class, drawn evenly: every class
    assert torch.equal(x, torch.stack([cifar[i][0] for i in picks]))  # exactly those images, in order
    out = run_json(
        "bench",
        "vit4mnist",
        "-O",
        "adaptive",
        "--data",
        "mnist",
        "--batch",
        "16",
        "--min-seconds",
        "0.2",
        "--max-seconds",
        "1",
    )
    assert out["data"] == "mnist" and out["variants"][0]["speedup"] > 0


def test_sweep_writes_plot(tmp_path) -> None:
    png = tmp_path / "sweep.png"
    out = run_json(
        "sweep",
        "vit4mnist",
        "-O",
        "bf16:mode=cast,autocast",
        "--data",
        "mnist",
        "--limit",
        "300",
        "--batch",
        "8",
        "--min-seconds",
        "0.2",
        "--max-seconds",
        "1",
        "--plot",
        str(png),
    )
    assert [r["name"] for r in out["rows"]] == ["bf16", "bf16:mode=autocast"]
    keys = {"top1", "images_per_s", "baseline_images_per_s", "speedup", "speedup_low", "speedup_high", "macs"}
    assert keys <= set(out["rows"][0])
    for row in out["rows"]:  # each row against the baseline of its own interleaved pair
        assert row["speedup"] == row["images_per_s"] / row["baseline_images_per_s"]
        assert row["speedup_low"] <= row["speedup"] <= row["speedup_high"]
    assert "top1" in out["baseline"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_optimize_dir_reloads(tmp_path) -> None:
    out_dir = tmp_path / "opt"
    run_json("optimize", "timm:deit_tiny_patch16_224", "-O", "bf16", "--out", str(out_dir))
    from vitedge.models import load

    enc = load(str(out_dir))
    assert enc.compute_dtype.is_floating_point and str(enc.compute_dtype) == "torch.bfloat16"
    again = run_json("profile", str(out_dir), "--no-counted")
    assert again["dtype"] == "bfloat16"


def test_optimize_explain_prints_the_plan_and_writes_nothing(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(
        app, ["optimize", "cifar-vit", "-O", "merge:r=5", "-O", "int8", "--explain", "--json"]
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)  # exactly one JSON object on stdout
    assert len(plan["blocks"]) == 9 and plan["name"] == "merge:r=5 int8"
    assert {"block", "tokens_in", "tokens_out", "kernel", "reducer", "gate", "exit", "macs"} <= set(
        plan["blocks"][0]
    )
    assert plan["blocks"][0]["tokens_out"] == 61 and plan["steps"]["weights"] == ["int8"]
    assert list(tmp_path.iterdir()) == []
    table = runner.invoke(app, ["optimize", "cifar-vit", "-O", "merge:r=5", "--explain"])
    assert table.exit_code == 0 and "merge r=5" in table.stderr and table.stdout == ""
    missing = runner.invoke(app, ["optimize", "cifar-vit", "-O", "merge:r=5"])
    assert missing.exit_code == 2 and "--out" in missing.stderr
    clash = runner.invoke(
        app, ["optimize", "cifar-vit", "-O", "merge:r=5", "-O", "prune:keep=0.5", "--explain"]
    )
    assert clash.exit_code == 2 and "cannot stack" in clash.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["profile", "nosuchmodel"], "unknown model id"),
        (["profile", "vit4mnist", "--batch", "-2"], "positive"),
        (["bench", "vit4mnist", "-O", "bf16:mode"], "not key=value"),
        (["eval", "vit4mnist", "--data", "nosuchdata"], "unknown dataset"),
        (["profile", "vit4mnist", "--budget", "lots"], "lots"),
        (["sweep", "vit4mnist"], "at least one -O"),
    ],
)
def test_errors_are_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert message in result.stderr
    assert "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_data_root(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VITEDGE_DATA", str(tmp_path / "absent"))
    result = runner.invoke(app, ["eval", "vit4mnist", "--data", "mnist"])
    assert result.exit_code == 2 and "VITEDGE_DATA" in result.stderr


def test_show_tokens_draws_png(tmp_path) -> None:
    png = tmp_path / "tokens.png"
    image = "../shared/data/imagenet-sample/n01443537_goldfish.jpg"
    from vitedge.paths import data_root

    image = str(data_root() / "imagenet-sample" / "n01443537_goldfish.jpg")
    out = run_json("show-tokens", "timm:deit_tiny_patch16_224", image, "-O", "merge:r=12", "--out", str(png))
    assert out["tokens_out"] == 197 - 12 * 12 and png.read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(app, ["show-tokens", "timm:deit_tiny_patch16_224", image, "--out", str(png)])
    assert bad.exit_code == 2 and "needs a token-merging" in bad.stderr


def test_show_tokens_draws_swin_window_merging(tmp_path) -> None:
    """On Swin the groups of the first merging block are drawn: r=8 of every 4x4 window of cifar-swin's
    16x16 grid leaves 8 tokens in each of its 16 windows. Window pruning has no token map and says so."""
    from vitedge.paths import data_root

    image = str(data_root() / "imagenet-sample" / "n01443537_goldfish.jpg")
    png = tmp_path / "swin.png"
    out = run_json("show-tokens", "cifar-swin", image, "-O", "window_merge:r=8", "--out", str(png))
    assert (out["tokens_in"], out["tokens_out"]) == (256, 128) and png.read_bytes()[:4] == b"\x89PNG"
    bad = runner.invoke(
        app, ["show-tokens", "cifar-swin", image, "-O", "window_prune:keep=0.5", "--out", str(png)]
    )
    assert bad.exit_code == 2 and "whole windows" in bad.stderr


def test_train_command_runs(tmp_path) -> None:
    """The typer front end turns its options into a run (it once mistook its own imports for options)."""
    args = ["train", "cifar-resnet", "--limit", "32", "--eval-limit", "16", "--batch", "16", "--epochs", "1"]
    out = run_json(*args, "--device", "cpu", "--no-bf16", "--out", str(tmp_path / "run"))
    assert out["status"] == "done" and out["epochs_run"] == 1 and out["weights"]


def test_profile_reports_the_weight_bytes_quantisation_stores() -> None:
    fp32 = run_json("profile", "vit4mnist", "--no-counted")
    int8 = run_json("profile", "vit4mnist", "-O", "int8", "--no-counted")
    int4 = run_json("profile", "vit4mnist", "-O", "int4:group=16", "--no-counted")
    assert fp32["weight_bytes"] == pytest.approx(fp32["stored_weight_bytes"], rel=0.01)
    assert int8["weight_bytes"] == int8["stored_weight_bytes"] < 0.5 * fp32["weight_bytes"]
    assert int4["weight_bytes"] < int8["weight_bytes"]
