"""Reading video files frame by frame with OpenCV, as RGB uint8 arrays."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

__all__ = ["VideoInfo", "iter_frames", "video_info"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a video.

    ``frames`` is the container's frame count, which OpenCV reads from the header and may be approximate
    (or 0 when unknown); count decoded frames where the exact number matters.
    """

    frames: int
    fps: float
    width: int
    height: int


def _backend() -> int:
    # Prefer FFmpeg explicitly: CAP_ANY may hand an image path to the image-sequence backend.
    ffmpeg = cv2.CAP_FFMPEG
    return ffmpeg if ffmpeg in cv2.videoio_registry.getBackends() else cv2.CAP_ANY


def _open(path: str | Path) -> tuple[Path, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    cap = cv2.VideoCapture(str(path), _backend())
    if not cap.isOpened():
        cap.release()
        raise ValueError(f"OpenCV cannot open {path} as a video")
    return path, cap


def video_info(path: str | Path) -> VideoInfo:
    """Frame count, frame rate and frame size of a video file.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: OpenCV cannot open it as a video (the message names it).
    """
    path, cap = _open(path)
    try:
        return VideoInfo(
            frames=max(int(cap.get(cv2.CAP_PROP_FRAME_COUNT)), 0),
            fps=float(cap.get(cv2.CAP_PROP_FPS)),
            width=int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)),
            height=int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)),
        )
    finally:
        cap.release()


def iter_frames(
    path: str | Path,
    *,
    size: tuple[int, int] | None = None,
    step: int = 1,
    max_frames: int | None = None,
) -> Iterator[np.ndarray]:
    """Yield the frames of a video as RGB uint8 arrays ``(H, W, 3)``.

    Args:
        path: a video file OpenCV's FFmpeg backend reads (AVI/MJPEG, XVID, MP4, ...).
        size: ``(height, width)`` to resize each frame to (the order of ``Preprocess.img_size``); None keeps
            the stored size. Shrinking uses area averaging, enlarging bilinear interpolation.
        step: yield every ``step``-th frame (frames 0, step, 2*step, ...); skipped frames are not converted.
        max_frames: stop after yielding this many frames.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: bad ``size``/``step``/``max_frames``, or the file cannot be opened or holds no decodable
            frame (the message names it).
    """
    if size is not None and (len(size) != 2 or any(int(s) != s or s < 1 for s in size)):
        raise ValueError(f"size must be (height, width) with positive integers, got {size!r}")
    if not _is_positive_int(step):
        raise ValueError(f"step must be an integer >= 1, got {step!r}")
    if max_frames is not None and not _is_positive_int(max_frames):
        raise ValueError(f"max_frames must be an integer >= 1 or None, got {max_frames!r}")
    # Open here, outside the generator, so a bad file fails at the call rather than at the first next().
    opened, cap = _open(path)
    return _frames(opened, cap, size, step, max_frames)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _frames(
    path: Path, cap: Any, size: tuple[int, int] | None, step: int, max_frames: int | None
) -> Iterator[np.ndarray]:
    try:
        yielded = 0
        index = 0
        while max_frames is None or yielded < max_frames:
            if index % step:
                if not cap.grab():  # advance without converting the frame
                    break
                index += 1
                continue
            ok, bgr = cap.read()
            if not ok:
                if index == 0:
                    raise ValueError(f"{path} holds no frame OpenCV can decode")
                break
            yield _to_rgb(bgr, size)
            yielded += 1
            index += 1
    finally:
        cap.release()


def _to_rgb(bgr: np.ndarray, size: tuple[int, int] | None) -> np.ndarray:
    # bgr: (H, W, 3) uint8 as OpenCV decodes it -> rgb: (H', W', 3)
    if size is not None and (bgr.shape[0], bgr.shape[1]) != tuple(size):
        height, width = int(size[0]), int(size[1])
        shrink = height * width < bgr.shape[0] * bgr.shape[1]
        bgr = cv2.resize(bgr, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
