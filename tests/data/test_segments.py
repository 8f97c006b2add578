"""Keyframe segments of the two real sample videos (PyAV), checked against OpenCV's whole-file decode."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vitedge.data.segments import _clean_cuts, decode_segment, index_keyframes, plan_segments
from vitedge.data.video import iter_frames
from vitedge.paths import data_root


def _video(name: str) -> Path:
    return data_root() / "video" / name


def make_clip(path: Path, codec: str, *, b_frames: int, frames: int = 60) -> Path:
    """A 64x64 clip written with PyAV's bundled encoders (keyframe every 12 frames); each frame differs."""
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=25)
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        stream.codec_context.gop_size = 12
        stream.codec_context.max_b_frames = b_frames
        for i in range(frames):
            img = np.zeros((64, 64, 3), np.uint8)
            img[:, :, 0] = (i * 4) % 256
            img[i % 64, :, 1] = 255
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def _all_segments(path: Path, target: int) -> list[tuple[int, np.ndarray]]:
    index = index_keyframes(path)
    return [
        (number, frame)
        for start, stop in plan_segments(index.keyframes, index.frames, target=target)
        for number, frame in decode_segment(path, start, stop, seek_ts=index.seek_of(start))
    ]


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
    with pytest.raises(ValueError, match="are 300 packets, decoding gave 270 frames"):
        list(decode_segment(path, 0, 300, seek_ts=-1, step=100))
    with pytest.raises(ValueError, match="segment length"):
        plan_segments((0,), 10, target=0)
    with pytest.raises(ValueError, match="start with frame 0"):
        plan_segments((3,), 10, target=5)


def test_clean_cuts_refuse_keyframes_with_leading_pictures() -> None:
    # decode order of pts: I0 P3 B1 B2 | I4 P7 B5 B6: the second group is closed, a clean cut at packet 4
    assert _clean_cuts([0, 3, 1, 2, 4, 7, 5, 6]) == {4}
    # I6 is decoded before B4 and B5, which are shown before it (an open group): no cut there
    assert _clean_cuts([0, 3, 1, 2, 6, 4, 5, 9, 7, 8]) == set()
    assert _clean_cuts([0, 1, 2]) == {1, 2}
    assert _clean_cuts([0, None, 2]) == set()  # unknown order: never cut


@pytest.mark.parametrize(
    ("name", "codec", "b_frames"),
    [
        ("open.mp4", "mpeg4", 2),  # FFmpeg's MPEG-4 part 2 with B-frames: open groups, leading B-frames
        ("open.mkv", "mpeg4", 2),
        ("cut.mpg", "mpeg2video", 0),  # MPEG program stream: seeks land elsewhere, segments count packets
        ("cut.mkv", "mpeg4", 0),
    ],
)
def test_generated_clips_decode_in_segments_as_a_whole(tmp_path: Path, name, codec, b_frames) -> None:
    path = make_clip(tmp_path / name, codec, b_frames=b_frames)
    index = index_keyframes(path)
    if b_frames:
        assert index.keyframes == (0,)  # no clean cut: one segment, decoded whole
    else:
        assert len(index.keyframes) >= 4
    got = _all_segments(path, target=12)
    whole = list(iter_frames(path))
    assert [n for n, _ in got] == list(range(len(whole)))
    for number, frame in got:
        np.testing.assert_array_equal(frame, whole[number], err_msg=f"{name} frame {number}")


def test_a_codec_without_decoder_is_named(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.avi", "mpeg4", b_frames=0).read_bytes()
    assert clip[:4096].count(b"FMP4") >= 1
    bad = tmp_path / "bad.avi"
    bad.write_bytes(clip[:4096].replace(b"FMP4", b"ZZZZ") + clip[4096:])  # a fourcc nothing decodes
    with pytest.raises(ValueError, match="no decoder"):
        index_keyframes(bad)
    with pytest.raises(ValueError, match="no decoder"):
        list(decode_segment(bad, 0, 5, seek_ts=-1))
