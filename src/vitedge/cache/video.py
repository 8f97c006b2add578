"""``vitedge video MODEL FILE``: temporal token reuse on a video against full per-frame encoding.

Keyframes come every ``keyframe_interval`` frames and at scene cuts (Bhattacharyya distance between the HSV
histograms of consecutive frames above ``cut_threshold``). Between keyframes a patch-level gate marks the
16x16 patches whose mean absolute pixel change (pixels in [0, 1]) since their last recomputation exceeds
``pixel_threshold``; those tokens, and the tokens the per-block gates of :mod:`vitedge.cache.eventful` pass,
are recomputed, the rest reused. When the camera moves (``flow``), :mod:`vitedge.cache.flow` first moves the
cached tokens with it and judges the moved ones against ``shift_threshold``; a still camera takes exactly the
path above. Both paths run on every frame in the same process, interleaved, so the time ratio is measured
rather than estimated (motion estimation and the warp are timed with the reuse path); the FLOP ratio counts
the matmul MACs each path performs (the warp is a gather: no MACs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from vitedge.cache.eventful import ReuseEngine, block_input, block_macs, check_supported, run_reused
from vitedge.cache.flow import PatchGate, patch_change

__all__ = ["SceneCutDetector", "VideoConfig", "patch_change", "run_video"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """Settings of temporal reuse (the defaults are the command's; no per-video tuning).

    Attributes:
        keyframe_interval: a full encode every this many frames.
        threshold: relative L2 change of a token's input to a block stage that recomputes it.
        pixel_threshold: mean absolute change of a patch's pixels (0..1) that recomputes its token.
        cut_threshold: HSV-histogram Bhattacharyya distance (0..1) between frames that marks a scene cut.
        flow: follow camera motion with optical flow, warping the cached tokens (:mod:`vitedge.cache.flow`).
        shift_threshold: mean absolute pixel change (0..1) that recomputes a token whose content moved since
            it was computed (compared without motion compensation: the shift is the token's error); the
            larger of this and ``pixel_threshold`` applies.
        min_motion: median flow (pixels per frame at the model's input size) below which the camera counts
            as still and the fixed-camera path runs unchanged.
        all_queries: evaluate attention for every token's query on reused frames, not only for the
            recomputed tokens (:class:`~vitedge.cache.eventful.ReuseEngine`).
    """

    keyframe_interval: int = 30
    threshold: float = 0.1
    pixel_threshold: float = 0.02
    cut_threshold: float = 0.3
    flow: bool = True
    shift_threshold: float = 0.04
    min_motion: float = 0.5
    all_queries: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.keyframe_interval, bool) or not isinstance(self.keyframe_interval, int):
            raise TypeError(f"keyframe_interval must be an integer, got {self.keyframe_interval!r}")
        if self.keyframe_interval < 1:
            raise ValueError(f"keyframe_interval must be >= 1, got {self.keyframe_interval}")
        for name in ("threshold", "pixel_threshold", "cut_threshold", "shift_threshold"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("flow", "all_queries"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not 0 <= self.min_motion <= 64:
            raise ValueError(f"min_motion must be in [0, 64] pixels per frame, got {self.min_motion}")


class SceneCutDetector:
    """Bhattacharyya distance between the HSV histograms of consecutive frames (8x8x8 bins)."""

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self._prev: np.ndarray | None = None
        self.last_distance = 0.0

    def __call__(self, rgb: np.ndarray) -> bool:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
        hist = cv2.calcHist([hsv], [0, 1, 2], None, [8, 8, 8], [0, 180, 0, 256, 0, 256])
        hist = cv2.normalize(hist, hist).flatten()
        prev, self._prev = self._prev, hist
        if prev is None:
            return False
        self.last_distance = float(cv2.compareHist(prev, hist, cv2.HISTCMP_BHATTACHARYYA))
        return self.last_distance > self.threshold


def _cosine(a: torch.Tensor, b: torch.Tensor, num_prefix: int) -> float:
    # a, b: (1, N, D) -> mean over patch tokens of the cosine similarity
    return F.cosine_similarity(a[0, num_prefix:], b[0, num_prefix:], dim=-1).mean().item()


@dataclass
class _Trace:
    cosine: list[float] = field(default_factory=list)
    naive: list[float] = field(default_factory=list)
    recomputed: list[float] = field(default_factory=list)  # share of patch tokens through the first qkv
    gated: list[float] = field(default_factory=list)  # share of patches the patch gate recomputes
    keyframes: list[int] = field(default_factory=list)
    cuts: list[int] = field(default_factory=list)
    motion: list[float] = field(default_factory=list)  # median flow per frame between keyframes, px
    moving: int = 0  # frames where the camera moved (median flow >= min_motion)
    warped: int = 0  # frames whose cached tokens changed cells with the camera
    full_s: float = 0.0
    reuse_s: float = 0.0
    full_macs: int = 0
    reuse_macs: int = 0
    agree: list[bool] = field(default_factory=list)  # reused and recomputed features predict the same class
    naive_agree: list[bool] = field(default_factory=list)


def _frame_macs(blocks: list[Any], n: int, work: Any) -> int:
    return sum(
        block_macs(v, n, q, p, m, a)
        for v, q, p, m, a in zip(blocks, work.qkv, work.proj, work.mlp, work.queries, strict=True)
    )


def run_video(
    model_id: str,
    file: str | Path,
    *,
    config: VideoConfig | None = None,
    max_frames: int | None = None,
    plot: Path | None = None,
    img_size: int | None = None,
    weights: Path | None = None,
    threads: int = 2,
    console: Any = None,
) -> dict[str, Any]:
    """Encode every frame both ways and report the contract's ``video`` keys (see CONTRACT.md)."""
    from vitedge.data import build_transform, iter_frames, video_info
    from vitedge.measure.cost import analyze
    from vitedge.models import load

    config = config or VideoConfig()
    video_info(file)  # a clear error for a missing or unreadable file
    torch.set_num_threads(threads)
    enc = load(model_id, weights=weights, img_size=img_size)
    if enc.preprocess.in_chans != 3:
        raise ValueError(f"{model_id} takes {enc.preprocess.in_chans}-channel images; video needs RGB models")
    transform = build_transform(enc.preprocess)
    blocks = enc.blocks
    n_prefix = enc.layout.num_prefix
    n_tokens = enc.layout.num_tokens
    embed_macs = _outside_blocks_macs(enc, analyze, n_tokens)
    engine = ReuseEngine(
        blocks, num_prefix=n_prefix, threshold=config.threshold, all_queries=config.all_queries
    )
    cuts = SceneCutDetector(config.cut_threshold)
    tr = _Trace()
    gate = PatchGate(
        enc.layout.grid,
        pixel_threshold=config.pixel_threshold,
        shift_threshold=config.shift_threshold,
        flow=config.flow,
        min_motion=config.min_motion,
    )
    pos = torch.zeros(0)
    naive_feats: torch.Tensor | None = None
    since_key = 0
    from vitedge.commands import _progress

    total = max_frames or video_info(file).frames or None
    with torch.inference_mode(), _progress(console) as progress:
        task = progress.add_task(f"video {Path(file).name}", total=total)
        for i, rgb in enumerate(iter_frames(file, size=enc.img_size, max_frames=max_frames)):
            x = transform.batch(torch.from_numpy(rgb).permute(2, 0, 1)).unsqueeze(0)
            if i == 0:
                check_supported(enc, x)
                enc.forward_features(x)  # warm-up of both paths before timing
                # block-0 tokens of a blank frame: the position embedding plus one constant for all patches
                pos = block_input(enc, torch.zeros_like(x))[0]
            t0 = time.perf_counter()
            full = enc.forward_features(x)
            tr.full_s += time.perf_counter() - t0

            t0 = time.perf_counter()
            px = rgb.astype(np.float32) / 255.0
            is_cut = cuts(rgb)
            keyframe = i == 0 or is_cut or since_key >= config.keyframe_interval
            changed = None
            if keyframe:
                gate.keyframe(px, rgb)
                since_key = 0
            else:
                step = gate(px, rgb)
                if step.src is not None:
                    engine.warp(*_token_source(step.src, n_prefix, pos))
                    tr.warped += 1
                tr.motion.append(float(np.hypot(*step.shift)))
                tr.gated.append(len(step.changed) / enc.layout.num_patches)
                if config.flow and tr.motion[-1] >= config.min_motion:
                    tr.moving += 1
                changed = torch.from_numpy(step.changed)
            feats, work = run_reused(enc, engine, x, full=keyframe, changed=changed)
            tr.reuse_s += time.perf_counter() - t0
            since_key += 1

            if keyframe:
                tr.keyframes.append(i)
                naive_feats = full
            if is_cut:
                tr.cuts.append(i)
            assert naive_feats is not None
            tr.cosine.append(_cosine(feats, full, n_prefix))
            tr.naive.append(_cosine(naive_feats, full, n_prefix))
            if enc.info.num_classes:  # the head's prediction from reused against recomputed features
                want = int(enc.forward_head(full).argmax())
                tr.agree.append(int(enc.forward_head(feats).argmax()) == want)
                tr.naive_agree.append(int(enc.forward_head(naive_feats).argmax()) == want)
            tr.recomputed.append((work.qkv[0] - n_prefix) / enc.layout.num_patches)
            tr.full_macs += embed_macs + _frame_macs(blocks, n_tokens, _all(work, n_tokens))
            tr.reuse_macs += embed_macs + _frame_macs(blocks, n_tokens, work)
            progress.advance(task)
    if not tr.cosine:
        raise ValueError(f"{file} holds no frame OpenCV can decode")
    out = {
        "model": model_id,
        "video": str(file),
        "frames": len(tr.cosine),
        "flops_ratio": tr.full_macs / tr.reuse_macs,
        "time_ratio": tr.full_s / tr.reuse_s,
        "mean_cosine": float(np.mean(tr.cosine)),
        "min_cosine": float(np.min(tr.cosine)),
        "naive_mean_cosine": float(np.mean(tr.naive)),
        "naive_min_cosine": float(np.min(tr.naive)),
        **(
            {
                "top1_agreement": float(np.mean(tr.agree)),
                "naive_top1_agreement": float(np.mean(tr.naive_agree)),
            }
            if tr.agree
            else {}
        ),
        "scene_cuts": tr.cuts,
        "keyframes": len(tr.keyframes),
        "mean_tokens_recomputed": float(np.mean(tr.recomputed)),
        "mean_patches_changed": float(np.mean(tr.gated)) if tr.gated else 0.0,
        "mean_motion_px": float(np.mean(tr.motion)) if tr.motion else 0.0,
        "moving_frames": tr.moving,
        "warped_frames": tr.warped,
        "full_s": tr.full_s,
        "reuse_s": tr.reuse_s,
        "config": {
            "keyframe_interval": config.keyframe_interval,
            "threshold": config.threshold,
            "pixel_threshold": config.pixel_threshold,
            "cut_threshold": config.cut_threshold,
            "flow": config.flow,
            "shift_threshold": config.shift_threshold,
            "min_motion": config.min_motion,
            "all_queries": config.all_queries,
        },
    }
    if plot is not None:
        _plot(tr, plot, title=f"{model_id} on {Path(file).name}")
        out["plot"] = str(plot)
    return out


def _token_source(src: np.ndarray, num_prefix: int, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch sources ``(P,)`` -> token sources ``(N,)`` and the position-embedding correction ``(N, D)``."""
    idx = torch.cat([torch.arange(num_prefix), num_prefix + torch.from_numpy(src)])
    return idx, pos - pos.index_select(0, idx)


def _outside_blocks_macs(enc: Any, analyze: Any, n_tokens: int) -> int:
    """MACs outside the blocks (patch embedding, head): the same for both paths."""
    try:
        total = analyze(enc.arch()).macs
    except Exception as e:  # the cost model is optional here; both paths spend these MACs alike
        log.warning("cost model unavailable for %s (%s); FLOP ratio counts the blocks only", enc.model_id, e)
        return 0
    return int(total - sum(block_macs(v, n_tokens, n_tokens, n_tokens, n_tokens) for v in enc.blocks))


def _all(work: Any, n: int) -> Any:
    from vitedge.cache.eventful import FrameWork

    k = len(work.qkv)
    return FrameWork(qkv=[n] * k, proj=[n] * k, mlp=[n] * k, queries=[n] * k)


def _plot(tr: _Trace, path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(10, 6), sharex=True)
    frames = np.arange(len(tr.cosine))
    ax1.plot(frames, tr.cosine, label="token reuse", lw=1)
    ax1.plot(frames, tr.naive, label="naive keyframe reuse", lw=1, alpha=0.7)
    ax1.set_ylabel("cosine to full encode")
    ax1.legend(loc="lower left")
    ax2.plot(frames, np.array(tr.recomputed) * 100, lw=1, color="tab:green")
    ax2.set_ylabel("patch tokens recomputed (%)")
    ax2.set_xlabel("frame")
    for ax in (ax1, ax2):
        for c in tr.cuts:
            ax.axvline(c, color="red", lw=0.8, alpha=0.6)
    ax1.set_title(title + " (red: scene cuts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
