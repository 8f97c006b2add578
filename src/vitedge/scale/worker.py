"""What a bulk-encoding worker does, whoever calls it: decode and preprocess work units (image files and
video segments), then encode them through the feature cache.

The local engine calls :func:`decode_units` and :class:`EncoderWorker` in one process, one batch after
another; the Ray engine (:mod:`vitedge.scale.bulk`) runs :func:`decode_units` in Ray Data tasks and wraps an
:class:`EncoderWorker` in each actor of a pool. Both see the same :class:`EncodeJob`, a plain JSON-able
record, so a single-process run and a Ray run differ only in who calls these functions. No Ray import here.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vitedge.cache.encode import forward_features

__all__ = [
    "EncodeJob",
    "EncoderWorker",
    "decode_files",
    "decode_units",
    "encode_decoded",
    "frame_name",
    "image_unit",
    "segment_unit",
]

VALUE_FORMATS = ("fp16", "int8")


@dataclass(frozen=True, kw_only=True)
class EncodeJob:
    """The settings every worker of one encoding job shares.

    Attributes:
        model: a model id (``cifar-vit``, ``timm:deit_tiny_patch16_224``) or an ``optimize --out`` folder.
        opts: the ``-O`` strings applied after loading.
        weights: a safetensors file to load instead of the model's own weights.
        cache: tiers fastest first (``memory,disk,redis``), or ``none`` to compute every input.
        value_format: how the cache stores a feature (``fp16`` or ``int8``).
        cache_dir: the disk tier's folder (default ``$VITEDGE_CACHE/features``).
        threads: torch threads of each worker (a Ray actor reserves as many CPUs).
        batch: images per forward.
        max_pixels: refuse larger images before decoding them (default 64 Mpx).
    """

    model: str
    opts: tuple[str, ...] = ()
    weights: str | None = None
    cache: str = "memory,disk"
    value_format: str = "fp16"
    cache_dir: str | None = None
    threads: int = 2
    batch: int = 16
    max_pixels: int | None = None

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads must be >= 1, got {self.threads}")
        if self.batch < 1:
            raise ValueError(f"batch must be >= 1, got {self.batch}")
        if self.value_format not in VALUE_FORMATS:
            raise ValueError(f"--format must be one of {', '.join(VALUE_FORMATS)}, got {self.value_format!r}")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ValueError(f"--max-pixels must be a positive number of pixels, got {self.max_pixels}")

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "opts": list(self.opts)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> EncodeJob:
        return cls(**{**data, "opts": tuple(data.get("opts", ()))})


def frame_name(path: str, number: int) -> str:
    """The ``path`` of video frame ``number`` in a feature table: ``FILE#frame=N``."""
    return f"{path}#frame={number}"


def image_unit(path: str) -> dict[str, Any]:
    """A work unit of one image file (:func:`decode_units`)."""
    return {"path": path, "start": -1, "stop": -1, "seek": -1, "wanted": ""}


def segment_unit(
    path: str, start: int, stop: int, seek: int, wanted: Sequence[int] | None = None
) -> dict[str, Any]:
    """A work unit of video frames ``[start, stop)`` from the keyframe at ``start`` (its seek timestamp
    ``seek``); ``wanted`` restricts it to those frame numbers (a resumed job's missing ones; not empty).

    Raises:
        ValueError: ``wanted`` is empty (leave such a segment out instead).
    """
    if wanted is not None and not wanted:
        raise ValueError("a segment unit needs at least one wanted frame (or None for all)")
    return {
        "path": path,
        "start": start,
        "stop": stop,
        "seek": seek,
        "wanted": "" if wanted is None else ",".join(map(str, wanted)),
    }


class _Rows:
    """Decoded rows gathered into batches of ``size``."""

    def __init__(self, preprocess: dict[str, Any], size: int) -> None:
        from vitedge.data import build_transform
        from vitedge.models.base import Preprocess

        self.pre = Preprocess.from_json(preprocess)
        self.transform = build_transform(self.pre)
        self.size = size
        self.paths: list[str] = []
        self.keys: list[str] = []
        self.errors: list[str] = []
        self.pixels: list[np.ndarray] = []  # each (C, H, W) float32

    def add(self, path: str, px: torch.Tensor | None = None, error: str = "") -> dict[str, np.ndarray] | None:
        """Add a decoded image ``px`` (C, H, W) uint8, or an error row; returns a full batch, if any."""
        from vitedge.cache.keys import content_digest

        self.paths.append(path)
        if px is None:
            self.keys.append("")
            self.errors.append(error or "unreadable")
            self.pixels.append(np.zeros((self.pre.in_chans, *self.pre.img_size), np.float32))
        else:
            self.keys.append(content_digest(px.numpy()))
            self.errors.append("")
            self.pixels.append(self.transform.batch(px).numpy())
        return self.take() if len(self.paths) >= self.size else None

    def take(self) -> dict[str, np.ndarray] | None:
        if not self.paths:
            return None
        out = {
            "path": np.asarray(self.paths, dtype=object),
            "key": np.asarray(self.keys, dtype=object),
            "pixels": np.stack(self.pixels),  # (B, C, H, W)
            "error": np.asarray(self.errors, dtype=object),
        }
        self.paths, self.keys, self.errors, self.pixels = [], [], [], []
        return out


def _reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def decode_units(
    units: Sequence[dict[str, Any]],
    preprocess: dict[str, Any],
    max_pixels: int | None = None,
    *,
    frame_step: int = 1,
    batch: int = 16,
) -> Iterator[dict[str, np.ndarray]]:
    """Decode and preprocess work units (image files and video segments) into batches of ``batch`` rows.

    A file or segment that cannot be read becomes one row with its reason (a segment that fails part way
    keeps the frames it decoded; its error row is named ``FILE#frames=START-STOP``).

    Args:
        units: :func:`image_unit` and :func:`segment_unit` records.
        preprocess: the model's :class:`~vitedge.models.base.Preprocess` as JSON.
        max_pixels: refuse larger images from their header (default 64 Mpx).
        frame_step: encode video frames whose number is a multiple of this.
        batch: rows per yielded batch (the last may be smaller).

    Yields:
        ``path`` (B,) the file, or ``FILE#frame=N`` for a video frame; ``key`` (B,) content digests of the
        decoded pixels (the feature cache's key; empty on error); ``pixels`` (B, C, H, W) float32 model
        inputs (zeros on error); ``error`` (B,) reasons (empty when read).
    """
    from vitedge.data import read_image, to_uint8_tensor
    from vitedge.data.images import DEFAULT_MAX_PIXELS
    from vitedge.data.segments import decode_segment

    limit = max_pixels or DEFAULT_MAX_PIXELS
    rows = _Rows(preprocess, batch)
    for unit in units:
        path, start, stop = str(unit["path"]), int(unit["start"]), int(unit["stop"])
        if start < 0:  # an image file
            try:
                px = to_uint8_tensor(read_image(path, max_pixels=limit))
            except (ValueError, OSError) as e:  # undecodable, truncated, too large, missing, unreadable
                full = rows.add(path, error=_reason(e))
            else:
                full = rows.add(path, px)
            if full is not None:
                yield full
            continue
        wanted = frozenset(int(n) for n in str(unit["wanted"]).split(",") if n)
        frames = decode_segment(
            path, start, stop, seek_ts=int(unit["seek"]), step=frame_step, wanted=wanted or None
        )
        try:
            for number, rgb in frames:
                full = rows.add(frame_name(path, number), to_uint8_tensor(rgb))
                if full is not None:
                    yield full
        except (ValueError, OSError) as e:
            full = rows.add(f"{path}#frames={start}-{stop}", error=_reason(e))
            if full is not None:
                yield full
    last = rows.take()
    if last is not None:
        yield last


def decode_files(
    paths: Sequence[str], preprocess: dict[str, Any], max_pixels: int | None = None
) -> dict[str, np.ndarray]:
    """Read, decode and preprocess image files as one batch (:func:`decode_units` of image units)."""
    batches = list(
        decode_units([image_unit(p) for p in paths], preprocess, max_pixels, batch=max(1, len(paths)))
    )
    if batches:
        return batches[0]
    pre = _Rows(preprocess, 1).pre
    return {
        "path": np.asarray([], dtype=object),
        "key": np.asarray([], dtype=object),
        "pixels": np.zeros((0, pre.in_chans, *pre.img_size), np.float32),
        "error": np.asarray([], dtype=object),
    }


@dataclass
class EncodeStats:
    hits: int = 0
    misses: int = 0
    compute_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class EncoderWorker:
    """One loaded model (with its ``-O`` stack) and its feature cache; encodes decoded batches.

    Loading sets torch's thread count to ``job.threads`` once, so several workers on one machine do not
    oversubscribe its cores.

    Args:
        job: the job's settings.
    """

    def __init__(self, job: EncodeJob) -> None:
        from vitedge.cache.keys import Namespace
        from vitedge.cache.store import CacheConfig, FeatureCache
        from vitedge.commands import build_model
        from vitedge.options import parse_options

        torch.set_num_threads(job.threads)
        self.job = job
        self.model = build_model(
            job.model,
            parse_options(list(job.opts)),
            img_size=None,
            weights=None if job.weights is None else Path(job.weights),
        )
        ns = Namespace.of(self.model)
        self.namespace = ns.digest
        self.store: FeatureCache | None = None
        if job.cache != "none":
            config = CacheConfig.parse(job.cache, value_format=job.value_format, disk_dir=job.cache_dir)
            self.store = FeatureCache(config)
            self.store.register(self.namespace, ns.to_json())
        self.stats = EncodeStats()
        self.last_hits = np.zeros(0, bool)  # which rows of the last encode() the cache held
        # one forward at load: warms the kernels and fixes the shape of a feature (error rows need it)
        pre = self.model.preprocess
        probe = torch.zeros(1, pre.in_chans, *pre.img_size)
        self.feature_shape: tuple[int, ...] = tuple(forward_features(self.model, probe).shape[1:])

    def encode(self, keys: Sequence[str], pixels: np.ndarray) -> np.ndarray:  # pixels: (B, C, H, W)
        """Features ``(B, N, D)`` float32 of a decoded batch: cache hits read, misses computed in one
        forward and stored (returned as the cache rounds them, so a hit and a miss agree)."""
        out: list[np.ndarray | None] = [None] * len(keys)
        misses = list(range(len(keys)))
        if self.store is not None:
            for i, key in enumerate(keys):
                out[i] = self.store.get(self.namespace, key)
            misses = [i for i in misses if out[i] is None]
        self.stats.hits += len(keys) - len(misses)
        self.last_hits = np.array([out[i] is not None for i in range(len(keys))], bool)
        if misses:
            t0 = time.perf_counter()
            feats = forward_features(self.model, torch.from_numpy(pixels[misses])).numpy()  # (M, N, D)
            elapsed = time.perf_counter() - t0
            self.stats.compute_s += elapsed
            self.stats.misses += len(misses)
            for i, f in zip(misses, feats, strict=True):
                out[i] = (
                    f
                    if self.store is None
                    else self.store.put(self.namespace, keys[i], f, cost=elapsed / len(misses))
                )
        return np.stack([np.asarray(f, dtype=np.float32) for f in out if f is not None])

    def close(self) -> None:
        if self.store is not None:
            self.store.close()
            self.store = None


def encode_decoded(
    worker: EncoderWorker, batch: dict[str, np.ndarray], node: str = ""
) -> dict[str, np.ndarray]:
    """Encode the readable rows of a :func:`decode_files` batch; rows with an error pass through.

    Returns:
        ``path``, ``key``, ``error`` as given, ``feature`` (B, N, D) float32 (zeros on error), ``hit`` (B,)
        whether the cache held the row, and ``node`` (B,) who computed it.
    """
    ok = batch["error"] == ""  # (B,)
    features = np.zeros((len(ok), *worker.feature_shape), np.float32)  # (B, N, D)
    hit = np.zeros(len(ok), bool)
    if ok.any():
        idx = np.flatnonzero(ok)
        keys = [str(k) for k in batch["key"][idx]]
        features[idx] = worker.encode(keys, np.ascontiguousarray(batch["pixels"][idx]))
        hit[idx] = worker.last_hits
    return {
        "path": batch["path"],
        "key": batch["key"],
        "error": batch["error"],
        "feature": features,
        "hit": hit,
        "node": np.full(len(ok), node, dtype=object),
    }
