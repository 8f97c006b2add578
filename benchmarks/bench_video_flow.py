"""Temporal token reuse with and without optical-flow warping: a moving camera and the two sample videos.

Usage: python benchmarks/bench_video_flow.py [--model timm:vit_base_patch16_224] [--max-frames 60]
       [--threads 2]

The moving-camera clip is made from real pixels (:func:`vitedge.cache.pan.make_pan_video`: a pan across
frame 0 of vtest.avi) in a temporary folder. Every video runs with the ``video`` command's default options,
once with ``flow`` on and once off, plus a control: flow off with ``pixel_threshold`` raised to the default
``shift_threshold`` (how much of the gain is the looser threshold under motion rather than the warp). Both
paths of each run (full per-frame encoding and reuse) are measured in the same process, interleaved. Prints
one JSON line per run, then a Markdown table. ``changed_share`` is the share of patches whose mean absolute
pixel change from the previous frame exceeds ``pixel_threshold``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from vitedge.cache.flow import patch_change
from vitedge.cache.pan import make_pan_video
from vitedge.cache.video import VideoConfig, run_video
from vitedge.data import iter_frames
from vitedge.paths import data_root

KEYS = ("flops_ratio", "time_ratio", "mean_cosine", "min_cosine", "naive_mean_cosine", "changed_share")


def changed_share(path: Path, max_frames: int, threshold: float) -> float:
    """Mean share of 16 px patches (224 px frames) that change by more than ``threshold``, frame to frame."""
    prev, shares = None, []
    for rgb in iter_frames(path, size=(224, 224), max_frames=max_frames):
        px = rgb.astype(np.float32) / 255.0
        if prev is not None:
            shares.append(float((patch_change(px, prev, (14, 14)) > threshold).mean()))
        prev = px
    return float(np.mean(shares)) if shares else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--max-frames", type=int, default=60)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        pan = make_pan_video(Path(tmp) / "pan.avi")
        videos = {"pan (synthetic)": pan}
        videos |= {name: data_root() / "video" / name for name in ("vtest.avi", "Megamind.avi")}
        for name, path in videos.items():
            share = changed_share(path, args.max_frames, VideoConfig().pixel_threshold)
            loose = VideoConfig().shift_threshold
            runs = {
                "on": VideoConfig(),
                "off": VideoConfig(flow=False),
                f"off, pixel_threshold={loose}": VideoConfig(flow=False, pixel_threshold=loose),
            }
            for flow, config in runs.items():
                kw = {"max_frames": args.max_frames, "threads": args.threads}
                out = run_video(args.model, path, config=config, **kw)
                row = {"video": name, "flow": flow, "changed_share": share}
                row |= {k: v for k, v in out.items() if k not in ("video", "config", "plot")}
                print(json.dumps(row), flush=True)
                rows.append(row)
    print(f"\n{args.model}, at most {args.max_frames} frames, default options (time_ratio: wall time)")
    extra = "patches gated | block-0 qkv share | moving frames | warped frames"
    print("| video | flow | " + " | ".join(KEYS) + f" | {extra} |")
    print("|---|---|" + "---|" * (len(KEYS) + 4))
    for r in rows:
        cells = " | ".join(f"{r[k]:.4f}" if "cosine" in k else f"{r[k]:.2f}" for k in KEYS)
        tail = f"{r['mean_patches_changed']:.2f} | {r['mean_tokens_recomputed']:.2f}"
        tail += f" | {r['moving_frames']} | {r['warped_frames']}"
        print(f"| {r['video']} | {r['flow']} | {cells} | {tail} |")


if __name__ == "__main__":
    main()
