"""Keyframe segments of the two real sample videos (PyAV), checked against OpenCV's whole-file decode."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitedge.data.segments import decode_segment, index_keyframes, plan_segments
from vitedge.data.video import iter_frames
from vitedge.paths import data_root


def _video(name: str) -> Path:
    return data_root() / "video" / name


@pytest.fixture(scope="module")
def megamind_frames() -> list[np.ndarray]:
    """Every frame of Megamind.avi as OpenCV decodes the whole file: the oracle segments must reproduce."""
    return list(iter_frames(_video("Megamind.avi")))


def test_index_lists_frames_and_keyframes_of_both_samples() -> None:
    vtest = index_keyframes(_video("vtest.avi"))
    assert (vtest.frames, vtest.width, vtest.height) == (795, 768, 576)  # as the data README states
    assert vtest.keyframes == (0, 250, 500, 750) and vtest.fps == pytest.approx(10.0)
    megamind = index_keyframes(_video("Megamind.avi"))
    assert (megamind.frames, megamind.width, megamind.height) == (270, 720, 528)
    # the clip has cuts, so keyframes fall irregularly; its packets carry B-frame timestamps out of order
    assert megamind.keyframes[0] == 0 and len(megamind.keyframes) >= 3
    assert megamind.seek_ts[0] == -1 and all(t >= 0 for t in megamind.seek_ts[1:])


@pytest.mark.parametrize(("target", "step"), [(1, 1), (60, 7), (100, 3), (1000, 10)])
def test_segments_decoded_apart_equal_the_whole_file(target, step, megamind_frames) -> None:
    path = _video("Megamind.avi")
    index = index_keyframes(path)
    segments = plan_segments(index.keyframes, index.frames, target=target)
    if target < 100:
        assert len(segments) == len(index.keyframes)  # every keyframe starts one
    got = [
        (number, frame)
        for start, stop in segments
        for number, frame in decode_segment(path, start, stop, seek_ts=index.seek_of(start), step=step)
    ]
    assert [n for n, _ in got] == list(range(0, index.frames, step))
    for number, frame in got:
        np.testing.assert_array_equal(frame, megamind_frames[number], err_msg=f"frame {number}")


def test_a_late_segment_of_the_long_sample_starts_at_its_keyframe() -> None:
    path = _video("vtest.avi")
    index = index_keyframes(path)
    got = list(decode_segment(path, 500, 750, seek_ts=index.seek_of(500), step=50))
    assert [n for n, _ in got] == [500, 550, 600, 650, 700]
    oracle = iter_frames(path, step=50)
    expected = [f for i, f in enumerate(oracle) if 500 <= i * 50 < 750]
    for (_, frame), want in zip(got, expected, strict=True):
        np.testing.assert_array_equal(frame, want)


def test_wanted_frames_restrict_a_segment() -> None:
    path = _video("Megamind.avi")
    index = index_keyframes(path)
    start, stop = index.keyframes[2], index.keyframes[3]
    wanted = frozenset({start + 1, start + 4, stop + 5})
    got = [n for n, _ in decode_segment(path, start, stop, seek_ts=index.seek_of(start), wanted=wanted)]
    assert got == [start + 1, start + 4]


@given(
    frames=st.integers(1, 400),
    cuts=st.sets(st.integers(1, 399), max_size=30),
    target=st.integers(1, 120),
)
def test_plan_covers_every_frame_once_from_keyframes(frames: int, cuts: set[int], target: int) -> None:
    keyframes = (0, *sorted(k for k in cuts if k < frames))
    segments = plan_segments(keyframes, frames, target=target)
    assert segments[0][0] == 0 and segments[-1][1] == frames
    for (_, stop), (start, _) in itertools.pairwise(segments):
        assert stop == start  # contiguous, no gap, no overlap
    for start, stop in segments:
        assert start in keyframes and stop > start
        # longer than target only where no keyframe lies inside the allowed length
        if stop - start > target and stop != frames:
            assert not any(start < k <= start + target for k in keyframes)


def test_bad_files_and_arguments_are_named(tmp_path: Path) -> None:
    fake = tmp_path / "fake.avi"
    fake.write_bytes(b"not a video at all" * 10)
    with pytest.raises(ValueError, match=r"fake\.avi cannot be read as a video"):
        index_keyframes(fake)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        index_keyframes(tmp_path / "missing.mp4")
    with pytest.raises(ValueError, match="more than the 1000 pixels"):
        index_keyframes(_video("Megamind.avi"), max_pixels=1000)
    path = _video("Megamind.avi")
    with pytest.raises(ValueError, match="not a keyframe"):
        index_keyframes(path).seek_of(5)
    with pytest.raises(ValueError, match="start < stop"):
        next(decode_segment(path, 10, 10, seek_ts=-1))
    with pytest.raises(ValueError, match="promised 300 frames, decoding gave 270"):
        list(decode_segment(path, 0, 300, seek_ts=-1, step=100))
    with pytest.raises(ValueError, match="segment length"):
        plan_segments((0,), 10, target=0)
    with pytest.raises(ValueError, match="start with frame 0"):
        plan_segments((3,), 10, target=5)
