"""Splitting long videos into segments that start at a keyframe, and decoding one segment alone (PyAV).

Bulk encoding (``vitedge encode ... --out FILE.parquet``) spreads a long video over several workers: the
driver reads the container's packets once without decoding them (:func:`index_keyframes`), cuts the frame
range at keyframes into segments of about ``target`` frames (:func:`plan_segments`), and each worker seeks to
its segment's keyframe and decodes only that segment (:func:`decode_segment`).

A frame's number is its position in the decoder's output, counted from the start of the file: what decoding
the whole file frame by frame gives (as :func:`vitedge.data.video.iter_frames` does). AVI timestamps can be
out of order when the stream packs B-frames (the Megamind sample's are), so segments seek by the keyframe
packet's decode timestamp and count frames as they come out, never trust a frame's ``pts``. Each
non-empty packet decodes to one frame; a segment that yields fewer frames than that count promised fails
with an error naming it rather than renumbering frames. Segments assume closed groups of pictures: a
keyframe's frames do not refer back past it (true of the codecs that keyframes here come from: MJPEG,
MPEG-4 part 2, and H.264/H.265 IDR frames).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "VIDEO_EXTENSIONS",
    "KeyframeIndex",
    "decode_segment",
    "index_keyframes",
    "plan_segments",
]

VIDEO_EXTENSIONS: tuple[str, ...] = (".avi", ".mp4", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg")


@dataclass(frozen=True)
class KeyframeIndex:
    """The frames of a video's first video stream and where decoding can start.

    Attributes:
        frames: frames in the stream (its non-empty packets).
        keyframes: frame numbers of the keyframes a decoder can start at (0 always among them).
        seek_ts: the decode timestamp of each keyframe's packet, in the stream's time base (what
            :func:`decode_segment` seeks to); -1 for frame 0, which needs no seek.
        width, height: the frame size.
        fps: the stream's average frame rate (0.0 when the container does not say).
    """

    frames: int
    keyframes: tuple[int, ...]
    seek_ts: tuple[int, ...]
    width: int
    height: int
    fps: float

    def seek_of(self, start: int) -> int:
        """The seek timestamp of the keyframe at frame ``start``.

        Raises:
            ValueError: no keyframe starts at ``start``.
        """
        try:
            return self.seek_ts[self.keyframes.index(start)]
        except ValueError:
            raise ValueError(f"frame {start} is not a keyframe of this video") from None


def _av_errors() -> tuple[type[BaseException], ...]:
    import av

    return (av.FFmpegError, UnicodeDecodeError)


def index_keyframes(path: str | Path, *, max_pixels: int | None = None) -> KeyframeIndex:
    """Read a video's packets (no decoding) and list its frames and keyframes.

    Args:
        path: a video file FFmpeg reads.
        max_pixels: refuse frames larger than this many pixels (read from the stream header).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: FFmpeg cannot read it, it holds no video stream or no frame, or its frames are larger
            than ``max_pixels`` (the message names the file).
    """
    import av

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"video file {path} does not exist")
    frames = 0
    keyframes: list[int] = []
    seek_ts: list[int] = []
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} holds no video stream")
            stream = container.streams.video[0]
            width, height = int(stream.codec_context.width), int(stream.codec_context.height)
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(
                    f"{path} has {width}x{height} frames, more than the {max_pixels} pixels allowed"
                )
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            for packet in container.demux(stream):
                if packet.size == 0:  # the flush packet at the end
                    continue
                ts = packet.dts if packet.dts is not None else packet.pts
                if frames == 0 or (packet.is_keyframe and ts is not None):
                    keyframes.append(frames)
                    seek_ts.append(-1 if frames == 0 else int(ts))  # type: ignore[arg-type]
                frames += 1
    except _av_errors() as e:
        raise ValueError(f"{path} cannot be read as a video: {e}") from None
    if frames == 0:
        raise ValueError(f"{path} holds no video frame")
    return KeyframeIndex(frames, tuple(keyframes), tuple(seek_ts), width, height, fps)


def plan_segments(keyframes: tuple[int, ...], frames: int, *, target: int) -> list[tuple[int, int]]:
    """Cut frames ``[0, frames)`` at keyframes into segments ``(start, stop)`` of about ``target`` frames.

    Each segment ends at the last keyframe within ``target`` frames of its start, or, where the next
    keyframe lies further, at that keyframe (a segment is never cut between keyframes). A video of at most
    ``target`` frames is one segment.

    Raises:
        ValueError: ``target`` < 1, ``frames`` < 1, or ``keyframes`` does not start at 0.
    """
    if target < 1:
        raise ValueError(f"segment length must be >= 1 frame, got {target}")
    if frames < 1:
        raise ValueError(f"a video needs at least one frame, got {frames}")
    if not keyframes or keyframes[0] != 0:
        raise ValueError("keyframes must start with frame 0")
    cuts = sorted({k for k in keyframes if 0 < k < frames})
    segments: list[tuple[int, int]] = []
    start = 0
    while start < frames:
        if frames - start <= target:
            stop = frames
        else:
            later = [k for k in cuts if k > start]
            within = [k for k in later if k - start <= target]
            stop = within[-1] if within else (later[0] if later else frames)
        segments.append((start, stop))
        start = stop
    return segments


def decode_segment(
    path: str | Path,
    start: int,
    stop: int,
    *,
    seek_ts: int,
    step: int = 1,
    wanted: frozenset[int] | None = None,
) -> Iterator[tuple[int, np.ndarray]]:
    """Decode frames ``[start, stop)`` of a video, starting at the keyframe ``start``.

    Args:
        path: the video.
        start, stop: a segment of :func:`plan_segments` (``start`` a keyframe of the index).
        seek_ts: the keyframe's :attr:`KeyframeIndex.seek_ts` (-1 for frame 0).
        step: yield frames whose number is a multiple of ``step`` (numbers count from the file's start,
            so segments sample the same frames as the whole file does).
        wanted: yield only these frame numbers (a resumed job's missing frames); None yields every sampled
            frame.

    Yields:
        ``(frame number, RGB uint8 array (H, W, 3))``, in frame order.

    Raises:
        ValueError: bad arguments, the seek lands past the keyframe, or the file ends (or fails to decode)
            before ``stop`` (the message names the file and the frames).
    """
    import av

    if not 0 <= start < stop:
        raise ValueError(f"a segment needs 0 <= start < stop, got {start}, {stop}")
    if step < 1:
        raise ValueError(f"--frame-step must be >= 1, got {step}")
    path = Path(path)
    number: int | None = None  # the next frame's number, once the keyframe is reached
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            if seek_ts >= 0:
                container.seek(seek_ts, stream=stream, backward=True, any_frame=False)
            for packet in container.demux(stream):
                if number is None:
                    if packet.size == 0:
                        continue
                    ts = packet.dts if packet.dts is not None else packet.pts
                    if seek_ts >= 0 and (ts is None or ts < seek_ts):
                        continue  # landed on an earlier keyframe: read on to ours without decoding
                    if seek_ts >= 0 and (ts != seek_ts or not packet.is_keyframe):
                        raise ValueError(f"seeking to frame {start} landed past its keyframe")
                    number = start
                for frame in packet.decode():
                    if number >= stop:
                        return
                    if number % step == 0 and (wanted is None or number in wanted):
                        yield number, frame.to_ndarray(format="rgb24")  # (H, W, 3)
                    number += 1
    except _av_errors() as e:
        raise ValueError(f"{path}: decoding frames {start}-{stop} failed: {e}") from None
    if number is None or number < stop:
        got = 0 if number is None else number - start
        raise ValueError(f"{path}: frames {start}-{stop} promised {stop - start} frames, decoding gave {got}")
