"""Per-block token reuse (eventful) and the video command, on small models and a few real frames."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from vitedge.cache.eventful import ReuseEngine, check_supported, run_reused
from vitedge.cache.video import SceneCutDetector, VideoConfig, patch_change, run_video
from vitedge.cli import app
from vitedge.models import load
from vitedge.paths import data_root


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    torch.manual_seed(0)
    return load("timm:deit_tiny_patch16_224")


@pytest.mark.parametrize("model_id", ["vit4mnist", "timm:deit_tiny_patch16_224"])
def test_neutral_threshold_reproduces_the_model(model_id: str) -> None:
    torch.manual_seed(0)
    enc = load(model_id)
    a, b = enc.example_input(2)
    a, b = a[None], b[None]
    check_supported(enc, a)
    engine = ReuseEngine(enc.blocks, num_prefix=enc.layout.num_prefix, threshold=0.0)
    with torch.inference_mode():
        run_reused(enc, engine, a, full=True)
        got, work = run_reused(enc, engine, b, full=False)
        want = enc.forward_features(b)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())
    assert work.qkv[0] == enc.layout.num_tokens


def test_static_frame_recomputes_only_the_class_token(deit: torch.nn.Module) -> None:
    x = deit.example_input(1)
    engine = ReuseEngine(deit.blocks, num_prefix=1, threshold=0.1)
    with torch.inference_mode():
        first, _ = run_reused(deit, engine, x, full=True)
        again, work = run_reused(deit, engine, x, full=False, changed=torch.tensor([], dtype=torch.long))
    assert work.qkv == [1] * len(deit.blocks)
    assert torch.allclose(first, again, atol=1e-5)


@pytest.mark.parametrize("all_queries", [False, True])
def test_attention_rows_follow_the_recomputed_tokens(deit: torch.nn.Module, all_queries: bool) -> None:
    x = deit.example_input(1)
    y = x.clone()
    y[..., :32, :32] += 0.5  # the four patches of the top-left corner change
    changed = torch.tensor([0, 1, 14, 15])
    engine = ReuseEngine(deit.blocks, num_prefix=1, threshold=0.1, all_queries=all_queries)
    with torch.inference_mode():
        run_reused(deit, engine, x, full=True)
        assert engine.state is not None
        before = engine.state[0].attn_ref.clone()
        got, work = run_reused(deit, engine, y, full=False, changed=changed)
        want = deit.forward_features(y)
    assert work.qkv[0] == 5 and work.queries[0] == (197 if all_queries else 5)
    if not all_queries:  # the bottom-right patch did not change: its attention row is not re-evaluated
        assert torch.equal(engine.state[0].attn_ref[196], before[196])
    cos = torch.nn.functional.cosine_similarity(got[0, 1:], want[0, 1:], dim=-1)
    assert cos.mean() > 0.99


def test_all_queries_at_threshold_zero_reproduces_the_model(deit: torch.nn.Module) -> None:
    a, b = deit.example_input(2)
    engine = ReuseEngine(deit.blocks, num_prefix=1, threshold=0.0, all_queries=True)
    with torch.inference_mode():
        run_reused(deit, engine, a[None], full=True)
        got, work = run_reused(deit, engine, b[None], full=False)
        want = deit.forward_features(b[None])
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item())
    assert work.queries == [197] * len(deit.blocks)


def test_recomputed_queries_skip_the_unchanged_rows(deit: torch.nn.Module) -> None:
    """By default an unchanged token's attention output is not recomputed, so its first-block residual is the
    cached one; with all_queries the same frame differs there (the changed tokens' keys moved)."""
    x = deit.example_input(1)
    y = x.clone()
    y[..., :32, :32] += 0.5
    changed = torch.tensor([0, 1, 14, 15])
    outs = {}
    with torch.inference_mode():
        for flag in (False, True):
            engine = ReuseEngine(deit.blocks, num_prefix=1, threshold=0.0, all_queries=flag)
            run_reused(deit, engine, x, full=True)
            assert engine.state is not None
            before = engine.state[0].attn_res.clone()
            run_reused(deit, engine, y, full=False, changed=changed)
            outs[flag] = (before, engine.state[0].attn_res.clone())
    before, after = outs[False]
    assert torch.equal(after[196], before[196])
    before, after = outs[True]
    assert not torch.equal(after[196], before[196])  # threshold 0: every moved attention row re-projected


def test_swin_is_refused_clearly() -> None:
    enc = load("timm:swin_tiny_patch4_window7_224")
    with pytest.raises(ValueError, match="Swin"):
        ReuseEngine(enc.blocks, num_prefix=0, threshold=0.1)


def test_patch_change_and_scene_cuts() -> None:
    a = np.zeros((32, 32, 3), np.float32)
    b = a.copy()
    b[:16, 16:] = 0.5
    change = patch_change(b, a, (2, 2))
    assert change.tolist() == [0.0, 0.5, 0.0, 0.0]
    det = SceneCutDetector(0.3)
    rng = np.random.default_rng(0)
    dark = rng.integers(0, 60, (64, 64, 3), dtype=np.uint8)
    assert not det(dark) and not det(dark)
    assert det(255 - dark)


def test_video_config_errors() -> None:
    with pytest.raises(ValueError, match="keyframe_interval"):
        VideoConfig(keyframe_interval=0)
    with pytest.raises(ValueError, match="pixel_threshold"):
        VideoConfig(pixel_threshold=2.0)


def test_run_video_contract_keys(tmp_path: Path) -> None:
    video = data_root() / "video" / "vtest.avi"
    out = run_video(
        "timm:deit_tiny_patch16_224",
        video,
        config=VideoConfig(keyframe_interval=4),
        max_frames=6,
        plot=tmp_path / "p.png",
    )
    for key in ("frames", "flops_ratio", "time_ratio", "mean_cosine", "min_cosine", "naive_mean_cosine"):
        assert isinstance(out[key], float | int)
    assert out["frames"] == 6 and out["scene_cuts"] == [] and out["keyframes"] == 2
    assert out["flops_ratio"] > 1.5
    assert out["mean_cosine"] > out["naive_mean_cosine"]
    assert (tmp_path / "p.png").stat().st_size > 0


def test_video_cli_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    bad = tmp_path / "x.avi"
    bad.write_bytes(b"not a video")
    res = runner.invoke(app, ["video", "vit4mnist", str(bad), "--json"])
    assert res.exit_code == 2 and "error" in res.output
    res = runner.invoke(app, ["video", "vit4mnist", str(tmp_path / "missing.avi")])
    assert res.exit_code == 2 and "does not exist" in res.output


def test_trained_model_reports_prediction_agreement() -> None:
    """On the trained cifar-vit (32 px frames) reuse keeps the per-frame predictions of full recomputation."""
    out = run_video("cifar-vit", data_root() / "video" / "vtest.avi", config=VideoConfig(), max_frames=24)
    assert 0.0 <= out["naive_top1_agreement"] <= 1.0
    assert out["top1_agreement"] >= 0.9 and out["top1_agreement"] >= out["naive_top1_agreement"]
