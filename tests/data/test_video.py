"""Video frames through OpenCV, on the two real sample videos."""

from __future__ import annotations

from itertools import islice
from pathlib import Path

import cv2
import numpy as np
import pytest

from vitedge.data.video import iter_frames, video_info
from vitedge.paths import data_root

# (file, frames, height, width) as the data README states them.
VIDEOS = [("vtest.avi", 795, 576, 768), ("Megamind.avi", 270, 528, 720)]


@pytest.mark.parametrize(("name", "frames", "height", "width"), VIDEOS)
def test_first_frames_and_info(name: str, frames: int, height: int, width: int) -> None:
    path = data_root() / "video" / name
    first = list(iter_frames(path, max_frames=2))
    assert len(first) == 2
    for frame in first:
        assert frame.shape == (height, width, 3) and frame.dtype == np.uint8
    info = video_info(path)
    assert (info.width, info.height) == (width, height)
    assert info.fps > 0
    counted = sum(1 for _ in iter_frames(path))
    assert counted == frames
    assert abs(info.frames - counted) <= 2  # the header count may be approximate


def test_frames_are_rgb() -> None:
    # OpenCV decodes to BGR; iter_frames must hand out the same pixels in RGB order.
    path = data_root() / "video" / "Megamind.avi"
    cap = cv2.VideoCapture(str(path))
    ok, bgr = cap.read()
    cap.release()
    assert ok
    rgb = next(iter_frames(path))
    np.testing.assert_array_equal(rgb, bgr[:, :, ::-1])


def test_step_and_max_frames() -> None:
    path = data_root() / "video" / "Megamind.avi"
    every = list(islice(iter_frames(path), 11))
    stepped = list(iter_frames(path, step=5, max_frames=3))
    assert len(stepped) == 3
    for got, want in zip(stepped, (every[0], every[5], every[10]), strict=True):
        np.testing.assert_array_equal(got, want)
    assert sum(1 for _ in iter_frames(path, step=100)) == 3  # frames 0, 100, 200 of 270


def test_resize() -> None:
    frame = next(iter_frames(data_root() / "video" / "vtest.avi", size=(224, 160)))
    assert frame.shape == (224, 160, 3)


def test_bad_arguments() -> None:
    path = data_root() / "video" / "vtest.avi"
    with pytest.raises(ValueError, match="step must be an integer >= 1, got 0"):
        iter_frames(path, step=0)
    with pytest.raises(ValueError, match="max_frames must be an integer >= 1 or None, got -1"):
        iter_frames(path, max_frames=-1)
    with pytest.raises(ValueError, match=r"size must be \(height, width\)"):
        iter_frames(path, size=(0, 10))


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gone\.avi does not exist"):
        iter_frames(tmp_path / "gone.avi")
    with pytest.raises(FileNotFoundError, match=r"gone\.avi does not exist"):
        video_info(tmp_path / "gone.avi")
    junk = tmp_path / "junk.avi"
    junk.write_bytes(b"definitely not a video " * 100)
    with pytest.raises(ValueError, match=r"junk\.avi"):
        list(iter_frames(junk))
    with pytest.raises(ValueError, match=r"junk\.avi"):
        video_info(junk)
