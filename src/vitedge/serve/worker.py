"""The one model worker: owns the encoders and the cores, runs the batches the scheduler picks.

Request threads never run the model. They decode and preprocess an image, hand it to
:meth:`ModelWorker.submit`, and wait on the :class:`Job`'s future; the worker thread asks the
:class:`~vitedge.serve.batcher.Batcher` for the next batch, stacks the inputs, runs the encoder of that
batch's input size once, and answers every request of the batch and its single-flight followers.

Before it admits work the worker warms up: one forward per input size, then a sweep of batch sizes
1, 2, 4, ... on the first (default) size that calibrates the batcher's latency model and, with
``auto_batch``, sets the batch cap to the throughput sweet spot: the smallest batch within ``SWEET_SPOT``
of the best images/s measured (larger batches only add latency).
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Any

import torch

from vitedge.serve.batcher import Batcher, BatcherConfig, Request

log = logging.getLogger(__name__)

SWEET_SPOT = 0.95  # a batch within 5 % of the best images/s is as good, and waits less
SWEEP_ROUNDS = 3  # interleaved extra rounds of the sweep, within its time budget


@dataclass(eq=False)
class Job:
    """One image (``x``: the model's input (C, H, W), or decoded uint8 pixels that the worker's ``prepare``
    turns into it) and where its answer goes."""

    x: torch.Tensor
    future: Future[dict[str, torch.Tensor]] = field(default_factory=Future)
    request: Request | None = None
    queued_s: float = 0.0  # time between admission and the start of its batch
    compute_s: float = 0.0  # its batch's forward time

    def answer(self, result: Any) -> None:
        """Settle the future with ``result`` and let go of the input and of the batcher's request. The
        request holds this job as its payload: left in place, the pair is a reference cycle that only
        Python's rare full collection frees, and under sustained load hundreds of them (pixels and
        features, ~200 KB each for deit-tiny) piled up between collections: RSS grew by 2 MB/s."""
        settle(self.future, result)
        self.release()

    def release(self) -> None:
        self.request = None
        self.x = torch.empty(0)


@dataclass(frozen=True, kw_only=True)
class SweepPoint:
    batch: int
    seconds: float  # the fastest of three timed forwards after an untimed one

    @property
    def images_per_s(self) -> float:
        return self.batch / self.seconds

    def to_json(self) -> dict[str, float]:
        return {"batch": self.batch, "seconds": self.seconds, "images_per_s": self.images_per_s}


def settle(future: Future[Any], result: Any) -> None:
    """Answer ``future`` with ``result`` (an exception is raised to its waiter). A future already cancelled
    (its client went away while the batch ran: the event loop cancels its side, and so this one, at any
    moment) is left alone: setting it would raise in the worker thread and end it."""
    try:
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)
    except InvalidStateError:
        if not future.cancelled():
            raise


class ModelWorker:
    """One thread that runs ``encoders`` (one per input size, the first is the default) on batches, with
    ``threads`` torch threads set once on that thread.

    Args:
        encoders: ``{(H, W): encoder}``; a request's bucket is its input size.
        config: the batcher's settings; ``max_batch`` is the limit the cap never exceeds.
        threads: torch threads of the worker (the cores it owns).
        auto_batch: set the cap to the warm-up sweep's sweet spot (else it stays ``config.max_batch``).
        prepare: ``{(H, W): fn}`` turning a job's ``x`` into the model's input, run on the worker thread
            (with its torch threads: preprocessing in request threads would oversubscribe the cores while a
            forward runs); None: jobs arrive prepared.
        sweep_seconds: stop the sweep once it has spent this long or one forward takes over a tenth of it.
    """

    def __init__(
        self,
        encoders: Mapping[tuple[int, int], Any],
        config: BatcherConfig,
        *,
        threads: int = 2,
        auto_batch: bool = False,
        prepare: Mapping[tuple[int, int], Callable[[torch.Tensor], torch.Tensor]] | None = None,
        sweep_seconds: float = 20.0,
    ) -> None:
        if not encoders:
            raise ValueError("the worker needs at least one encoder")
        self.encoders = {size: enc.eval() for size, enc in encoders.items()}
        self.batcher = Batcher(config)
        self.threads = threads
        self.auto_batch = auto_batch
        self.prepare = dict(prepare or {})
        self.sweep_seconds = sweep_seconds
        self.sweep: list[SweepPoint] = []
        self.ready: Future[None] = Future()  # resolved when warm-up is done (or failed)
        self._cond = threading.Condition()
        self._stop = False
        self.busy_s = 0.0
        self.images = 0
        self.batches = 0
        self.cancelled = 0
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._main, name="vitedge-model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued (up to ``timeout`` seconds), then end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(
        self, key: str, bucket: tuple[int, int], x: torch.Tensor, *, priority: str, deadline_s: float | None
    ) -> Job:
        """Queue one image; raises :class:`~vitedge.serve.batcher.QueueFull` when its priority is full."""
        if bucket not in self.encoders:
            raise ValueError(f"no encoder for input size {bucket}; the service runs {list(self.encoders)}")
        job = Job(x=x)
        with self._cond:
            now = self.batcher.clock()
            deadline = None if deadline_s is None else now + deadline_s
            job.request = Request(key=key, bucket=bucket, priority=priority, payload=job, deadline=deadline)
            self.batcher.submit(job.request)
            self._cond.notify_all()
        return job

    def admit(self, priority: str) -> None:
        """Raise :class:`~vitedge.serve.batcher.QueueFull` if ``priority``'s queue is full now."""
        with self._cond:
            self.batcher.admit(priority)

    def cancel(self, job: Job) -> bool:
        """Drop ``job`` if it has not started (its client went away); True when it was dropped."""
        with self._cond:
            dropped = job.request is not None and self.batcher.cancel(job.request)
            self.cancelled += dropped
        if dropped:  # nobody waits for it: the caller cancels the future
            job.release()
        return dropped

    def depth(self) -> dict[str, int]:
        with self._cond:
            return self.batcher.depth()

    def sizes_since(self, batches: int) -> list[int]:
        """The sizes of the batches run after the first ``batches`` (of the last 10,000)."""
        n = self.batches - batches
        return list(self.batch_sizes)[-n:] if n > 0 else []

    @property
    def max_batch(self) -> int:
        return self.batcher.max_batch

    # --- the worker thread ----------------------------------------------------------------------
    def _main(self) -> None:
        torch.set_num_threads(self.threads)  # once, on the thread that computes
        try:
            self._warm_up()
        except Exception as e:
            log.exception("warm-up failed")
            self.ready.set_exception(e)
            return
        self.ready.set_result(None)
        self._loop()

    def _forward(self, enc: Any, x: torch.Tensor) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            x = x.to(enc.compute_dtype)
            with enc.autocast(x):
                feats = enc.forward_features(x)
                out = {"features": feats}
                if enc.info.num_classes:
                    out["logits"] = enc.forward_head(feats)
        return out

    def _timed(self, size: tuple[int, int], n: int) -> float:
        enc = self.encoders[size]
        x = enc.example_input(n)
        start = time.perf_counter()
        self._forward(enc, x)
        return time.perf_counter() - start

    def _warm_up(self) -> None:
        for size in self.encoders:  # kernels paged in, thread pool started, for every input size
            self._timed(size, 1)
        size = next(iter(self.encoders))
        spent, n = 0.0, 1
        while n <= self.batcher.config.max_batch:
            first = self._timed(size, n)  # a new shape: the kernels' first call sets up
            seconds = min(self._timed(size, n) for _ in range(3))
            spent += first + 3 * seconds
            self.sweep.append(SweepPoint(batch=n, seconds=seconds))
            with self._cond:
                self.batcher.latency_of(size).observe(n, seconds)
            if spent > self.sweep_seconds or seconds > self.sweep_seconds / 10:
                break
            n *= 2
        # one more timed call per size, interleaved, while the budget lasts: a burst of load elsewhere
        # during the first pass then costs one sample, not the choice (a deit-tiny sweep once read batch 2
        # as best that way)
        for _ in range(SWEEP_ROUNDS):
            if spent > self.sweep_seconds:
                break
            for i, p in enumerate(self.sweep):
                seconds = self._timed(size, p.batch)
                spent += seconds
                if seconds < p.seconds:
                    self.sweep[i] = SweepPoint(batch=p.batch, seconds=seconds)
                    with self._cond:
                        self.batcher.latency_of(size).observe(p.batch, seconds)
        if self.auto_batch:
            best = max(p.images_per_s for p in self.sweep)
            sweet = min(p.batch for p in self.sweep if p.images_per_s >= SWEET_SPOT * best)
            with self._cond:
                self.batcher.resize(sweet)

    def _loop(self) -> None:
        while True:
            with self._cond:
                for late in self.batcher.expired():
                    for r in (late, *late.followers):
                        r.payload.answer(TimeoutError("the deadline passed before it ran"))
                wait = self.batcher.wait_time()
                if wait is None and self._stop:
                    return
                if wait != 0.0:
                    self._cond.wait(timeout=0.05 if wait is None else wait)
                    continue
                batch = self.batcher.next_batch()
            if batch:
                self._run(batch)

    def _run(self, batch: list[Request]) -> None:
        jobs: list[Job] = [r.payload for r in batch]
        start = time.monotonic()
        try:
            prepare = self.prepare.get(batch[0].bucket)
            x = torch.stack([prepare(j.x) if prepare else j.x for j in jobs])
            out = self._forward(self.encoders[batch[0].bucket], x)
            results: list[Any] = [{k: v[i].float() for k, v in out.items()} for i in range(len(jobs))]
        except Exception as e:  # a failing batch answers its requests with the error, the worker goes on
            log.exception("batch of %d failed", len(jobs))
            results = [e] * len(jobs)
        elapsed = time.monotonic() - start
        self.busy_s += elapsed
        self.images += len(jobs)
        self.batches += 1
        self.batch_sizes.append(len(jobs))
        with self._cond:
            self.batcher.done(batch, elapsed)
            answers = [
                (r, result)
                for leader, result in zip(batch, results, strict=True)
                for r in (leader, *leader.followers)
            ]
        for request, result in answers:
            job = request.payload
            job.queued_s = max(0.0, start - request.arrival)
            job.compute_s = elapsed
            job.answer(result)
