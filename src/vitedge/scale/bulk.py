"""Bulk encoding to a Parquet feature table, in one process or on a Ray cluster (seed 22.3.4-22.3.5).

``vitedge encode MODEL DIR|FILE... --out FILE.parquet [--engine ray [--address ADDR]]``. Both engines run the
same :mod:`vitedge.scale.worker` code: the local engine decodes and encodes batch after batch; the Ray engine
is a Ray Data pipeline that decodes in parallel tasks and encodes in an actor pool of
:class:`~vitedge.scale.worker.EncoderWorker` (each loads the model and its ``-O`` stack once and sets torch's
threads to the CPUs it reserves). Either way the driver writes finished batches as part files of a
:class:`~vitedge.scale.table.FeatureTable`, so a rerun skips what is written, and the feature cache skips what
any worker computed before. Ray restarts a killed actor and retries its batch; the table keeps each path once.
Ray is imported only by the Ray engine.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from vitedge.scale.cluster import check_fits, connected
from vitedge.scale.table import FeatureTable
from vitedge.scale.worker import (
    EncodeJob,
    EncoderWorker,
    decode_units,
    encode_decoded,
    frame_name,
    image_unit,
    segment_unit,
)

__all__ = ["ENGINES", "RayConfig", "VideoConfig", "list_inputs", "plan_units", "run_bulk"]

log = logging.getLogger(__name__)
ACTOR_START_TIMEOUT_S = 600  # how long a Ray job waits for its encoder actors to start
ENGINES = ("local", "ray")
Batch = dict[str, np.ndarray]


@dataclass(frozen=True, kw_only=True)
class RayConfig:
    """Where and how wide the Ray engine runs.

    Attributes:
        address: an existing cluster (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``); None starts a local
            one on loopback for this job and stops it after.
        actors: encoder actors (default: the cluster's CPUs // ``threads``, at least 1).
        num_cpus: CPUs of the local cluster it starts (default: this machine's cores).
        show_progress: Ray Data's progress bars on stderr.
    """

    address: str | None = None
    actors: int | None = None
    num_cpus: int | None = None
    show_progress: bool = True

    def __post_init__(self) -> None:
        if self.actors is not None and self.actors < 1:
            raise ValueError(f"--actors must be >= 1, got {self.actors}")
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ValueError(f"--num-cpus must be >= 1, got {self.num_cpus}")


@dataclass(frozen=True, kw_only=True)
class VideoConfig:
    """How video inputs become rows.

    Attributes:
        frame_step: encode every ``frame_step``-th frame (frame numbers 0, k, 2k, ... from the file's start).
        segment_frames: cut videos longer than this into segments of about this many frames, each starting
            at a keyframe, which workers decode apart (a video is never cut between keyframes).
    """

    frame_step: int = 1
    segment_frames: int = 256

    def __post_init__(self) -> None:
        if self.frame_step < 1:
            raise ValueError(f"--frame-step must be >= 1, got {self.frame_step}")
        if self.segment_frames < 1:
            raise ValueError(f"--segment-frames must be >= 1, got {self.segment_frames}")


def list_inputs(inputs: Sequence[str | Path], *, limit: int | None = None) -> list[Path]:
    """Files to encode: each input is a folder (its images and videos, recursively), ``imagenet-sample``, or
    a file.

    A named file is taken whatever its extension, so a bad one is reported, not silently left out. Paths are
    absolute and each appears once, in the order given.

    Raises:
        ValueError: no inputs, a bad ``limit``, a folder with no image or video, or an input that is neither
            a folder nor a file.
    """
    from vitedge.cache.encode import list_images
    from vitedge.data import IMAGE_EXTENSIONS
    from vitedge.data.segments import VIDEO_EXTENSIONS

    if not inputs:
        raise ValueError("name at least one folder, image or video file to encode")
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be a positive integer, got {limit}")
    files: list[Path] = []
    for item in inputs:
        path = Path(item).expanduser()
        if str(item) == "imagenet-sample":
            files += list_images(item)
        elif path.is_dir():
            found = sorted(
                p
                for p in path.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS and p.is_file()
            )
            if not found:
                raise ValueError(
                    f"{path} holds no image or video files ({', '.join(IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)})"
                )
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"{item} is neither a folder nor a file")
    unique = list(dict.fromkeys(p.resolve() for p in files))
    return unique[:limit]


@dataclass
class Plan:
    """The work units of a job and what the table already holds.

    Attributes:
        units: image and segment units (:func:`~vitedge.scale.worker.image_unit`, ``segment_unit``) to run.
        rows: rows the whole job covers (image files and sampled video frames).
        todo: rows the units will produce.
        videos: video files among the inputs; ``frames`` their sampled frames; ``segments`` their segments.
        errors: videos that could not be indexed (``path``, ``reason``).
    """

    units: list[dict[str, Any]]
    rows: int = 0
    todo: int = 0
    videos: int = 0
    frames: int = 0
    segments: int = 0
    errors: list[dict[str, str]] = field(default_factory=list)


def plan_units(
    files: Sequence[Path], done: set[str], video: VideoConfig, *, max_pixels: int | None = None
) -> Plan:
    """Turn input files into work units, leaving out rows in ``done``.

    Images are one unit each. Videos (by extension) are indexed here, in the driver, by reading their
    packets without decoding (:func:`~vitedge.data.segments.index_keyframes`) and cut into keyframe
    segments; a segment whose sampled frames are all in ``done`` is left out, one partly done is restricted
    to the missing frames.
    """
    from vitedge.data.images import DEFAULT_MAX_PIXELS
    from vitedge.data.segments import VIDEO_EXTENSIONS, index_keyframes, plan_segments

    plan = Plan(units=[])
    for path in files:
        name = str(path)
        if path.suffix.lower() not in VIDEO_EXTENSIONS:
            plan.rows += 1
            if name not in done:
                plan.units.append(image_unit(name))
                plan.todo += 1
            continue
        plan.videos += 1
        try:
            index = index_keyframes(path, max_pixels=max_pixels or DEFAULT_MAX_PIXELS)
        except (ValueError, OSError) as e:
            plan.rows += 1
            plan.errors.append({"path": name, "reason": str(e).splitlines()[0]})
            continue
        for start, stop in plan_segments(index.keyframes, index.frames, target=video.segment_frames):
            plan.segments += 1
            sampled = [n for n in range(start, stop) if n % video.frame_step == 0]
            missing = [n for n in sampled if frame_name(name, n) not in done]
            plan.rows += len(sampled)
            plan.frames += len(sampled)
            if missing:
                wanted = None if len(missing) == len(sampled) else missing
                plan.units.append(segment_unit(name, start, stop, index.seek_of(start), wanted))
                plan.todo += len(missing)
    return plan


def run_bulk(
    job: EncodeJob,
    inputs: Sequence[str | Path],
    *,
    out: str | Path,
    engine: str = "local",
    ray: RayConfig | None = None,
    video: VideoConfig | None = None,
    limit: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Encode ``inputs`` (images and videos) with ``job``'s model into the Parquet table ``out``; resume what
    it holds. A video's frames are rows named ``FILE#frame=N`` (:class:`VideoConfig` says which frames).

    Returns:
        The ``encode`` JSON keys (``images``: rows the job covers, i.e. image files and sampled video frames;
        ``encoded``, ``errors``, ``hits``, ``misses``, ``hit_rate``, ``out``) and ``engine``, ``inputs``
        (files), ``videos``, ``frames`` (sampled), ``segments``, ``rows`` (in ``out``), ``skipped`` (rows
        ``out`` already held),
        ``duplicates_dropped``, ``nodes`` (rows computed per Ray node), ``startup_s`` (until the first batch
        came back: cluster start, model loading, the first batch), ``time_s``, ``steady_images_per_s``
        (inputs after the first batch / the time after it), ``shape``, ``namespace``.

    Raises:
        ValueError: a bad engine, input, model id, ``-O`` string or ``out``.
    """
    if engine not in ENGINES:
        raise ValueError(f"--engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if ray is not None and engine != "ray":
        raise ValueError("Ray settings (--address, --actors, --num-cpus) need --engine ray")
    t0 = time.perf_counter()
    files = list_inputs(inputs, limit=limit)
    # The driver loads the model once in either engine: a bad id or stack fails here, before any cluster
    # starts, and it names the namespace the table belongs to.
    worker = EncoderWorker(job if engine == "local" else replace(job, cache="none"))
    table = FeatureTable(out, namespace=worker.namespace, meta={"model": job.model, "opts": list(job.opts)})
    video = video or VideoConfig()
    plan = plan_units(files, table.done_paths(), video, max_pixels=job.max_pixels)
    preprocess = worker.model.preprocess.to_json()
    shape = list(worker.feature_shape)
    if engine == "ray":
        worker.close()
        del worker
        batches = _ray_batches(job, plan.units, preprocess, ray or RayConfig(), video.frame_step)
    else:
        batches = _local_batches(worker, plan.units, preprocess, video.frame_step)
    tally = _Tally(total=plan.todo, progress=progress, start=t0)
    tally.errors += plan.errors
    try:
        for batch in batches:
            good = batch["error"] == ""
            table.write_part(
                [str(k) for k in batch["key"][good]],
                [str(p) for p in batch["path"][good]],
                batch["feature"][good],
            )
            tally.add(batch)
    finally:
        if engine == "local":
            worker.close()
    summary = table.finish(tally.errors)
    encoded = tally.hits + tally.misses
    return {
        "model": job.model,
        "name": " ".join(job.opts) or "baseline",
        "engine": engine,
        "images": plan.rows,
        "inputs": len(files),
        "videos": plan.videos,
        "frames": plan.frames,
        "segments": plan.segments,
        "encoded": encoded,
        "errors": tally.errors,
        "hits": tally.hits,
        "misses": tally.misses,
        "hit_rate": tally.hits / encoded if encoded else 0.0,
        "skipped": plan.rows - plan.todo - len(plan.errors),
        "out": str(table.out),
        "errors_out": str(table.errors_path) if table.errors_path.exists() else None,
        "rows": summary["rows"],
        "duplicates_dropped": summary["duplicates_dropped"],
        "nodes": tally.nodes,
        "startup_s": tally.startup_s,
        "time_s": time.perf_counter() - t0,
        "steady_images_per_s": tally.steady_rate(),
        "shape": shape,
        "namespace": table.namespace,
        "batch": job.batch,
        "threads": job.threads,
    }


class _Tally:
    """Counts and times the batches as they come back."""

    def __init__(self, *, total: int, progress: Callable[[int, int], None] | None, start: float) -> None:
        self.total, self.progress, self.start = total, progress, start
        self.done = self.hits = self.misses = 0
        self.errors: list[dict[str, str]] = []
        self.nodes: dict[str, int] = {}
        self.arrivals: list[tuple[float, int]] = []  # (time, inputs in the batch)
        self.startup_s: float | None = None

    def add(self, batch: Batch) -> None:
        now = time.perf_counter()
        n = len(batch["path"])
        if self.startup_s is None:
            self.startup_s = now - self.start
        self.arrivals.append((now, n))
        good = batch["error"] == ""
        self.hits += int(batch["hit"][good].sum())
        self.misses += int((~batch["hit"][good]).sum())
        for node in batch["node"][good]:
            self.nodes[str(node)] = self.nodes.get(str(node), 0) + 1
        self.errors += [
            {"path": str(p), "reason": str(r)}
            for p, r in zip(batch["path"][~good], batch["error"][~good], strict=True)
        ]
        self.done += n
        if self.progress:
            # a segment failing part way adds an error row the plan did not count
            self.progress(self.done, max(self.total, self.done))

    def steady_rate(self) -> float | None:
        """Inputs per second after the first batch came back (None with fewer than two batches)."""
        if len(self.arrivals) < 2:
            return None
        elapsed = self.arrivals[-1][0] - self.arrivals[0][0]
        return sum(n for _, n in self.arrivals[1:]) / elapsed if elapsed > 0 else None


def _local_batches(
    worker: EncoderWorker, units: list[dict[str, Any]], preprocess: dict[str, Any], frame_step: int
) -> Iterator[Batch]:
    decoded = decode_units(
        units, preprocess, worker.job.max_pixels, frame_step=frame_step, batch=worker.job.batch
    )
    for batch in decoded:
        yield encode_decoded(worker, batch, node="local")


def _groups(units: list[dict[str, Any]], size: int) -> list[list[dict[str, Any]]]:
    """Image units in groups of ``size``, and each video segment alone."""
    images = [u for u in units if u["start"] < 0]
    groups = [images[i : i + size] for i in range(0, len(images), size)]
    return groups + [[u] for u in units if u["start"] >= 0]


def _decode_udf(
    batch: Batch, preprocess: dict[str, Any], max_pixels: int | None, frame_step: int, size: int
) -> Iterator[Batch]:
    for group in batch["units"]:
        units = json.loads(str(group))
        yield from decode_units(units, preprocess, max_pixels, frame_step=frame_step, batch=size)


class _EncoderActor:
    """One Ray actor of the pool: an :class:`EncoderWorker`, built from the job's JSON."""

    def __init__(self, job: dict[str, Any]) -> None:
        import ray

        self.worker = EncoderWorker(EncodeJob.from_json(job))
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: Batch) -> Batch:
        return encode_decoded(self.worker, batch, node=self.node)


def _ray_batches(
    job: EncodeJob,
    units: list[dict[str, Any]],
    preprocess: dict[str, Any],
    config: RayConfig,
    frame_step: int,
) -> Iterator[Batch]:
    import ray
    import ray.data

    if not units:
        return
    with connected(config.address, num_cpus=config.num_cpus) as cpus:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = config.show_progress
        # Dispatch only once every encoder actor has loaded its model: otherwise the first actor up takes
        # a short job whole while the others still start (seen on a loaded two-node run: 42 rows, 1 node).
        # check_fits has made sure they all fit; a cluster that cannot start them fails after this wait.
        context.wait_for_min_actors_s = ACTOR_START_TIMEOUT_S
        actors = config.actors or max(1, int(cpus // job.threads))
        check_fits(actors, job.threads, cpus, what="actors", flag="--actors")
        log.info("ray: %d encoder actors x %d threads on %g CPUs", actors, job.threads, cpus)
        # One Ray item per group: up to --batch images, or one video segment (decoded by one task, which
        # yields its frames in batches), so a long video spreads over the decoders.
        groups = _groups(units, job.batch)
        ds: ray.data.Dataset = ray.data.from_items(
            [{"units": json.dumps(g)} for g in groups], override_num_blocks=len(groups)
        )
        # Decoding reserves no CPU: the actors hold them all, and the decoders, as many as the actors,
        # fill the gaps between forwards (the local engine decodes in the same gaps, serially).
        ds = ds.map_batches(
            _decode_udf,  # type: ignore[arg-type]  # Ray's UDF type names no extra keyword arguments
            batch_size=1,
            fn_kwargs={
                "preprocess": preprocess,
                "max_pixels": job.max_pixels,
                "frame_step": frame_step,
                "size": job.batch,
            },
            compute=ray.data.TaskPoolStrategy(size=actors),
            num_cpus=0,
        )
        ds = ds.map_batches(
            _EncoderActor,
            batch_size=job.batch,
            fn_constructor_kwargs={"job": job.to_json()},
            compute=ray.data.ActorPoolStrategy(size=actors),
            num_cpus=job.threads,
        )
        yield from ds.iter_batches(batch_size=None, batch_format="numpy")
