"""Camera-motion compensation (vitedge.cache.flow): re-indexing, the warp of cached state, the gate, and a
moving-camera clip made from a real frame."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from vitedge.cache.eventful import ReuseEngine, block_input, block_macs, run_reused
from vitedge.cache.flow import PatchGate, patches, reindex
from vitedge.cache.pan import PanSpec, make_pan_video, pan_frames
from vitedge.cache.video import VideoConfig, run_video
from vitedge.cli import app
from vitedge.data import build_transform, iter_frames
from vitedge.models import load
from vitedge.paths import data_root

GRID = (14, 14)


@pytest.fixture(scope="module")
def deit() -> torch.nn.Module:
    torch.manual_seed(0)
    return load("timm:deit_tiny_patch16_224")


@pytest.fixture(scope="module")
def still() -> np.ndarray:
    """Frame 0 of the fixed street camera: real pixels to move around."""
    return next(iter_frames(data_root() / "video" / "vtest.avi"))


def _window(still: np.ndarray, x: int, y: int = 100) -> np.ndarray:
    return np.ascontiguousarray(still[y : y + 224, x : x + 224])


def _gate(flow: bool = True) -> PatchGate:
    cfg = VideoConfig()
    return PatchGate(
        GRID,
        pixel_threshold=cfg.pixel_threshold,
        shift_threshold=cfg.shift_threshold,
        flow=flow,
        min_motion=cfg.min_motion,
    )


def test_reindex_integer_patch_shift_is_a_permutation() -> None:
    grid = (3, 4)
    src, new = reindex(np.zeros((12, 2)), np.tile([-16.0, 0.0], (12, 1)), grid, (16, 16))
    # content moved one patch left: every cell takes its right neighbour's state, exactly aligned; the last
    # column (newly uncovered) keeps its own content, now a patch to its left, for the gate to judge
    cells = np.arange(12).reshape(grid)
    assert src.reshape(grid)[:, :3].tolist() == cells[:, 1:].tolist()
    assert src.reshape(grid)[:, 3].tolist() == cells[:, 3].tolist()
    assert not new.reshape(3, 4, 2)[:, :3].any() and (new.reshape(3, 4, 2)[:, 3] == [-16, 0]).all()


def test_reindex_sub_patch_motion_accumulates_then_moves() -> None:
    grid = (1, 3)
    src, off = reindex(np.zeros((3, 2)), np.tile([5.0, 0.0], (3, 1)), grid, (16, 16))
    assert src.tolist() == [0, 1, 2] and off[:, 0].tolist() == [5.0, 5.0, 5.0]
    src, off = reindex(off, np.tile([5.0, 0.0], (3, 1)), grid, (16, 16))
    # 10 px right is nearer the next cell (6 px short of it); the first cell keeps the nearest content
    assert src.tolist() == [0, 0, 1] and off[:, 0].tolist() == [10.0, -6.0, -6.0]


def test_gate_follows_a_one_patch_pan(still: np.ndarray) -> None:
    gate = _gate()
    a, b = _window(still, 100), _window(still, 116)  # the camera moves one patch right
    gate.keyframe(a.astype(np.float32) / 255, a)
    step = gate(b.astype(np.float32) / 255, b)
    assert step.src is not None and step.shift[0] == pytest.approx(-16, abs=1)
    src = step.src.reshape(GRID)
    assert (src[:, :-1] == np.arange(196).reshape(GRID)[:, 1:]).mean() > 0.95
    assert len(step.changed) < 2 * 14  # about the newly uncovered column
    # the warped pixel reference shows the new frame
    diff = np.abs(gate.ref - patches(b.astype(np.float32) / 255, GRID)).mean(axis=(1, 2, 3))
    assert (diff < 0.01).mean() > 0.9


def test_still_frames_never_warp(still: np.ndarray) -> None:
    gate = _gate()
    a = _window(still, 100)
    gate.keyframe(a.astype(np.float32) / 255, a)
    step = gate(a.astype(np.float32) / 255, a)
    assert step.src is None and step.changed.size == 0 and np.hypot(*step.shift) < 1e-3


def test_warp_matches_full_encode_after_a_patch_shift(deit: torch.nn.Module, still: np.ndarray) -> None:
    tf = build_transform(deit.preprocess)
    a, b = _window(still, 100), _window(still, 116)
    xa, xb = (tf.batch(torch.from_numpy(f).permute(2, 0, 1)).unsqueeze(0) for f in (a, b))
    results = {}
    with torch.inference_mode():
        want = deit.forward_features(xb)
        pos = block_input(deit, torch.zeros_like(xa))[0]
        for flow in (False, True):
            gate = _gate(flow)
            engine = ReuseEngine(deit.blocks, num_prefix=1, threshold=0.1)
            gate.keyframe(a.astype(np.float32) / 255, a)
            run_reused(deit, engine, xa, full=True)
            step = gate(b.astype(np.float32) / 255, b)
            if step.src is not None:
                src = torch.cat([torch.zeros(1, dtype=torch.long), 1 + torch.from_numpy(step.src)])
                engine.warp(src, pos - pos[src])
            got, work = run_reused(deit, engine, xb, full=False, changed=torch.from_numpy(step.changed))
            cos = F.cosine_similarity(got[0, 1:], want[0, 1:], dim=-1).mean().item()
            stages = zip(deit.blocks, work.qkv, work.proj, work.mlp, work.queries, strict=True)
            results[flow] = (cos, sum(block_macs(v, 197, q, p, m, a) for v, q, p, m, a in stages))
    full = sum(block_macs(v, 197, 197, 197, 197) for v in deit.blocks)
    cos, macs = results[True]
    assert cos > 0.995 and macs < 0.3 * full
    assert results[False][1] > 0.6 * full  # without flow most tokens recompute


def test_warp_refuses_a_wrong_index(deit: torch.nn.Module) -> None:
    engine = ReuseEngine(deit.blocks, num_prefix=1, threshold=0.1)
    with torch.inference_mode():
        run_reused(deit, engine, deit.example_input(1), full=True)
        with pytest.raises(ValueError, match="src"):
            engine.warp(torch.arange(10))
        with pytest.raises(ValueError, match="int64"):
            engine.warp(torch.arange(197).float())
        with pytest.raises(ValueError, match=r"\[0, 197\)"):
            engine.warp(torch.arange(197) + 1)
        with pytest.raises(ValueError, match="prefix"):
            engine.warp(torch.arange(197).flip(0))
        with pytest.raises(ValueError, match="pos_delta"):
            engine.warp(torch.arange(197), torch.zeros(197, 3))


@pytest.mark.parametrize("flow", [False, True])
def test_gate_needs_a_keyframe_first(still: np.ndarray, flow: bool) -> None:
    a = _window(still, 100)
    with pytest.raises(ValueError, match="keyframe"):
        _gate(flow)(a.astype(np.float32) / 255, a)


def test_pan_clip(tmp_path: Path, still: np.ndarray) -> None:
    frames = list(pan_frames(still, PanSpec(frames=3, speed=(16.0, 0.0), scale=1.0)))
    assert len(frames) == 3 and frames[0].shape == (224, 224, 3)
    assert np.array_equal(frames[1][:, :-16], frames[0][:, 16:])
    with pytest.raises(ValueError, match="leaves"):
        list(pan_frames(still, PanSpec(frames=200, speed=(8.0, 0.0))))
    with pytest.raises(ValueError, match="scale"):
        PanSpec(scale=0)
    path = make_pan_video(tmp_path / "pan.avi", spec=PanSpec(frames=4))
    assert len(list(iter_frames(path))) == 4


def test_flow_config_errors() -> None:
    with pytest.raises(TypeError, match="flow"):
        VideoConfig(flow="yes")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_motion"):
        VideoConfig(min_motion=-1)
    with pytest.raises(ValueError, match="shift_threshold"):
        VideoConfig(shift_threshold=1.5)


def test_flow_leaves_the_fixed_camera_unchanged() -> None:
    video = data_root() / "video" / "vtest.avi"
    on, off = (
        run_video("timm:deit_tiny_patch16_224", video, config=VideoConfig(flow=f), max_frames=8)
        for f in (True, False)
    )
    assert on["warped_frames"] == 0
    for key in ("flops_ratio", "mean_cosine", "min_cosine", "mean_tokens_recomputed"):
        assert on[key] == pytest.approx(off[key], rel=1e-6), key


def test_moving_camera_clip_keeps_reuse(tmp_path: Path) -> None:
    path = make_pan_video(tmp_path / "pan.avi", spec=PanSpec(frames=30))
    on, off = (
        run_video("timm:deit_tiny_patch16_224", path, config=VideoConfig(flow=f)) for f in (True, False)
    )
    assert on["warped_frames"] > 0
    assert on["flops_ratio"] >= 2.0 and on["mean_cosine"] >= 0.98
    assert on["flops_ratio"] > off["flops_ratio"] + 0.3


def test_video_cli_flow_options(tmp_path: Path) -> None:
    path = make_pan_video(tmp_path / "pan.avi", spec=PanSpec(frames=3))
    args = ["video", "timm:deit_tiny_patch16_224", str(path), "--json", "--plot", str(tmp_path / "p.png")]
    res = CliRunner().invoke(app, [*args, "--no-flow", "--shift-threshold", "0.05"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["config"]["flow"] is False and out["config"]["shift_threshold"] == 0.05
    res = CliRunner().invoke(app, [*args, "--min-motion", "-1"])
    assert res.exit_code == 2 and "min_motion" in res.output
