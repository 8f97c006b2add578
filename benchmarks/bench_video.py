"""Temporal token reuse on the two sample videos with ViT-B/16, default options, against full encoding.

Usage: python benchmarks/bench_video.py [--model timm:vit_base_patch16_224] [--max-frames N] [--threads T]

Prints one JSON line per video (the contract's ``video`` keys; ratios measured in the same run) and writes
``<video>-reuse.png`` plots into the current folder. The same as ``vitedge video MODEL FILE --json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from vitedge.cache.video import run_video
from vitedge.paths import data_root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm:vit_base_patch16_224")
    ap.add_argument("--max-frames", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for name in ("vtest.avi", "Megamind.avi"):
        path = data_root() / "video" / name
        out = run_video(
            args.model,
            path,
            max_frames=args.max_frames,
            threads=args.threads,
            plot=Path(f"{path.stem}-reuse.png"),
        )
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
