"""Splitting long videos into segments that start at a keyframe, and decoding one segment alone (PyAV).

Bulk encoding (``vitedge encode ... --out FILE.parquet``) spreads a long video over several workers: the
driver reads the container's packets once without decoding them (:func:`index_keyframes`), cuts the frame
range at keyframes into segments of about ``target`` frames (:func:`plan_segments`), and each worker seeks to
its segment's keyframe and decodes only that segment (:func:`decode_segment`).

A frame's number is its position in the decoder's output, counted from the start of the file: what decoding
the whole file frame by frame gives (as :func:`vitedge.data.video.iter_frames` does). AVI timestamps can be
out of order when the stream packs B-frames (the Megamind sample's are), so frames are never numbered by
their ``pts``. A keyframe is a place to cut only where it is a clean boundary: every packet before it (in
the file) shows before it, and it shows before every packet after it. That rules out open groups of
pictures, whose leading B-frames refer back past the keyframe (FFmpeg's MPEG-4 part 2 and MPEG-2 encoders
make them when B-frames are on); such keyframes are not cut at, and a video without a clean cut is one
segment, decoded whole. A segment decodes exactly its own packets, from its keyframe, and flushes the
decoder: it must give one frame per packet, or it fails with an error naming the frames. Seeking uses the
keyframe packet's decode timestamp; where the container lands elsewhere (MPEG program streams do), the
segment reads packets from the start of the file, without decoding them, up to its keyframe.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        keyframes: frame numbers of the keyframes a segment can start at: 0, and the keyframes that are clean
            cuts (shown after every frame before them in the file and before every frame after them).
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
    keys: list[tuple[int, int]] = []  # (frame number, seek timestamp) of each keyframe packet
    order: list[int | None] = []  # each packet's pts, in file order
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"{path} holds no video stream")
            stream = container.streams.video[0]
            context = stream.codec_context
            if context is None:  # PyAV has no decoder for the stream's codec
                raise ValueError(f"{path}: the bundled FFmpeg has no decoder for this video's codec")
            width, height = int(context.width), int(context.height)
            if max_pixels is not None and width * height > max_pixels:
                raise ValueError(
                    f"{path} has {width}x{height} frames, more than the {max_pixels} pixels allowed"
                )
            fps = float(stream.average_rate) if stream.average_rate else 0.0
            for packet in container.demux(stream):
                if packet.size == 0:  # a flush packet, or an empty (dropped-frame) chunk: no frame
                    continue
                ts = packet.dts if packet.dts is not None else packet.pts
                if packet.is_keyframe and ts is not None:
                    keys.append((len(order), int(ts)))
                order.append(packet.pts)
    except _av_errors() as e:
        raise ValueError(f"{path} cannot be read as a video: {e}") from None
    if not order:
        raise ValueError(f"{path} holds no video frame")
    clean = _clean_cuts(order)
    cuts = [(n, ts) for n, ts in keys if n > 0 and n in clean]
    return KeyframeIndex(
        len(order),
        (0, *(n for n, _ in cuts)),
        (-1, *(ts for _, ts in cuts)),
        width,
        height,
        fps,
    )


def _clean_cuts(pts: list[int | None]) -> set[int]:
    """Packet positions k where every packet before k is shown before every packet from k on, and packet k
    is shown first among those (by pts): no leading picture that an open group of pictures would decode
    from the frames before the cut.

    pts: each packet's presentation timestamp in file order. No cut is clean when a pts is missing or
    repeated (the order of showing is then unknown).
    """
    if any(t is None for t in pts) or len(set(pts)) != len(pts):
        return set()
    values = [int(t) for t in pts if t is not None]
    cuts = set()
    low_after = [0] * (len(values) + 1)  # low_after[k] = min(values[k:])
    low_after[-1] = max(values) + 1
    for k in range(len(values) - 1, -1, -1):
        low_after[k] = min(values[k], low_after[k + 1])
    high = values[0]
    for k in range(1, len(values)):
        if high < low_after[k] == values[k]:
            cuts.add(k)
        high = max(high, values[k])
    return cuts


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
        ValueError: bad arguments, no decoder for the codec, or the segment's packets do not decode to one
            frame each (the message names the file and the frames).
    """
    if not 0 <= start < stop:
        raise ValueError(f"a segment needs 0 <= start < stop, got {start}, {stop}")
    if step < 1:
        raise ValueError(f"--frame-step must be >= 1, got {step}")
    path = Path(path)
    count = stop - start  # packets of the segment, and the frames they must give
    got = 0
    try:
        container, stream, packets = _open_at(path, start, seek_ts)
        with container:
            context = stream.codec_context
            fed = 0
            for packet in packets:
                if packet.size == 0:  # a flush packet or an empty chunk: no frame of its own
                    continue
                for frame in packet.decode():
                    number, got = start + got, got + 1
                    if _keep(number, stop, step, wanted):
                        yield number, frame.to_ndarray(format="rgb24")  # (H, W, 3)
                fed += 1
                if fed == count:
                    break
            for frame in context.decode(None):  # flush: the frames the decoder still holds
                number, got = start + got, got + 1
                if _keep(number, stop, step, wanted):
                    yield number, frame.to_ndarray(format="rgb24")
    except _av_errors() as e:
        raise ValueError(f"{path}: decoding frames {start}-{stop} failed: {e}") from None
    if got != count:
        raise ValueError(
            f"{path}: frames {start}-{stop} are {count} packets, decoding gave {got} frames (a keyframe "
            "that is not a clean cut, or a damaged stream)"
        )


def _keep(number: int, stop: int, step: int, wanted: frozenset[int] | None) -> bool:
    return number < stop and number % step == 0 and (wanted is None or number in wanted)


def _open_at(path: Path, start: int, seek_ts: int) -> tuple[Any, Any, Iterator[Any]]:
    """Open ``path`` and position it at the keyframe packet of frame ``start``: (container, its video
    stream, the packets from that keyframe on). Seeks by the keyframe's decode timestamp; where the
    container lands past it, or on no packet with that timestamp, reads from the start of the file (demux
    only, no decoding) and counts ``start`` non-empty packets.

    Raises:
        ValueError: the stream has no decoder, or the file holds fewer packets than ``start``.
    """
    import av

    container = av.open(str(path))
    stream = container.streams.video[0]
    if stream.codec_context is None:
        container.close()
        raise ValueError(f"{path}: the bundled FFmpeg has no decoder for this video's codec")
    if seek_ts >= 0:
        container.seek(seek_ts, stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        for packet in packets:
            if packet.size == 0:
                continue
            ts = packet.dts if packet.dts is not None else packet.pts
            if ts is not None and ts < seek_ts:
                continue  # landed on an earlier keyframe: read on to ours without decoding
            if ts == seek_ts and packet.is_keyframe:
                return container, stream, itertools.chain([packet], packets)
            break  # landed past it: count from the start instead
        container.close()
        container = av.open(str(path))
        stream = container.streams.video[0]
    packets = (p for p in container.demux(stream) if p.size)
    skipped = sum(1 for _ in itertools.islice(packets, start))
    if skipped < start:
        container.close()
        raise ValueError(f"{path} holds {skipped} frames, fewer than the segment's start {start}")
    return container, stream, packets
