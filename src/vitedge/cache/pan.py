"""A moving-camera clip made from real pixels: a camera panning (and optionally zooming) across a still.

The sample videos have a fixed street camera (vtest.avi) and an animated clip whose camera moves only in
places (Megamind.avi), so the benchmark and the tests of :mod:`vitedge.cache.flow` build their moving-camera
clip from a real frame: by default frame 0 of vtest.avi (768x576), a 336 px window of it shown at 224 px
and panned 2 px per frame to the right and 0.5 px down (sub-pixel steps, bilinear), which changes about half
of the 16 px patches of the frame by more than the patch gate's threshold from one frame to the next.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

__all__ = ["PanSpec", "make_pan_video", "pan_frames"]


@dataclass(frozen=True, kw_only=True)
class PanSpec:
    """How the virtual camera moves.

    Attributes:
        frames: number of frames.
        speed: ``(dx, dy)`` pan per frame in output pixels (positive: the camera moves right / down).
        zoom: scale factor per frame (1.0: none; 1.002 zooms in slowly).
        size: output frames are ``size x size``.
        scale: source pixels per output pixel at the first frame (below 1 enlarges the still).
        fps: frame rate written into the file.
    """

    frames: int = 60
    speed: tuple[float, float] = (2.0, 0.5)
    zoom: float = 1.0
    size: int = 224
    scale: float = 1.5
    fps: float = 25.0

    def __post_init__(self) -> None:
        if self.frames < 1 or self.size < 16:
            raise ValueError(f"frames must be >= 1 and size >= 16, got {self.frames} and {self.size}")
        if self.scale <= 0 or self.zoom <= 0 or self.fps <= 0:
            raise ValueError(
                f"scale, zoom and fps must be positive, got {self.scale}, {self.zoom}, {self.fps}"
            )


def pan_frames(still: np.ndarray, spec: PanSpec) -> Iterator[np.ndarray]:
    """Frames ``(size, size, 3)`` uint8 of a camera panning across ``still`` ``(H, W, 3)`` uint8.

    The window starts at the left edge, vertically centred. Raises ValueError when the pan leaves the still.
    """
    h, w = still.shape[:2]
    step = spec.scale  # source pixels per output pixel at frame 0
    half = spec.size / 2
    cx0, cy0 = half * step, h / 2
    for t in range(spec.frames):
        s = step / spec.zoom**t
        cx, cy = cx0 + t * spec.speed[0] * step, cy0 + t * spec.speed[1] * step
        if cx - half * s < 0 or cy - half * s < 0 or cx + half * s > w or cy + half * s > h:
            raise ValueError(f"the pan leaves the {w}x{h} still at frame {t}; lower speed, frames or scale")
        # output pixel u -> source pixel s * u + (centre - s * size / 2)
        m = np.array([[s, 0, cx - half * s], [0, s, cy - half * s]], np.float32)
        yield cv2.warpAffine(still, m, (spec.size, spec.size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)


def make_pan_video(
    out: str | Path, source: str | Path | None = None, *, frame_index: int = 0, spec: PanSpec | None = None
) -> Path:
    """Write a panning clip (MJPEG in AVI) across one frame of ``source`` and return its path.

    Args:
        out: the ``.avi`` file to write (its folder is created).
        source: a video or an image file; default vtest.avi in the data folder.
        frame_index: which frame of a video source to pan across.
        spec: the camera's motion (:class:`PanSpec`).
    """
    from vitedge.data import iter_frames
    from vitedge.paths import data_root

    spec = spec or PanSpec()
    source = Path(source) if source is not None else data_root() / "video" / "vtest.avi"
    if source.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp"):
        bgr = cv2.imread(str(source))
        if bgr is None:
            raise ValueError(f"OpenCV cannot read {source} as an image")
        still = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
    else:
        if frame_index < 0:
            raise ValueError(f"frame_index must be >= 0, got {frame_index}")
        # frames 0 and frame_index (a step skips the ones between without converting them)
        frames = list(iter_frames(source, step=max(frame_index, 1), max_frames=1 if frame_index == 0 else 2))
        if len(frames) < (1 if frame_index == 0 else 2):
            raise ValueError(f"{source} has no frame {frame_index}")
        still = frames[-1]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    writer = cv2.VideoWriter(str(out), cv2.VideoWriter.fourcc(*"MJPG"), spec.fps, (spec.size, spec.size))
    try:
        for rgb in pan_frames(still, spec):
            writer.write(cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()
    return out
