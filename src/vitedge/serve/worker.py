"""The one model worker: owns the encoder and the cores, runs the batches the scheduler picks.

Request threads never run the model. They decode and preprocess an image, hand a :class:`Job` to
:meth:`ModelWorker.submit`, and wait on its future; the worker thread asks the :class:`Batcher` for the next
batch, stacks the inputs, runs the encoder once, and resolves every job of the batch (and of its single-flight
followers).
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import torch

from vitedge.serve.batcher import Batcher, BatcherConfig, Request

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Job:
    """One preprocessed image (``x`` (C, H, W)) and where its answer goes."""

    x: torch.Tensor
    future: Future[dict[str, torch.Tensor]] = field(default_factory=Future)
    queued_s: float = 0.0  # time between admission and the start of its batch
    compute_s: float = 0.0  # its batch's forward time


class ModelWorker:
    """One thread that runs ``encoder`` on batches; ``threads`` torch threads, set once on that thread."""

    def __init__(self, encoder: Any, config: BatcherConfig, *, threads: int = 2) -> None:
        self.encoder = encoder.eval()
        self.batcher = Batcher(config)
        self.threads = threads
        self._cond = threading.Condition()
        self._stop = False
        self.busy_s = 0.0
        self.started = time.monotonic()
        self.batch_sizes: list[int] = []
        self._thread = threading.Thread(target=self._loop, name="vitedge-model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish what is queued (up to ``timeout`` seconds), then end the thread."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        self._thread.join(timeout)

    def submit(
        self, key: str, bucket: Any, x: torch.Tensor, *, priority: str, deadline_s: float | None
    ) -> Job:
        """Queue one image; raises :class:`~vitedge.serve.batcher.QueueFull` when its priority is full."""
        job = Job(x=x)
        with self._cond:
            now = self.batcher.clock()
            deadline = None if deadline_s is None else now + deadline_s
            leader = self.batcher.submit(
                Request(key=key, bucket=bucket, priority=priority, payload=job, deadline=deadline)
            )
            if leader.payload is not job:  # single flight: answered with the identical image's result
                leader.payload.future.add_done_callback(lambda f: _copy_result(f, job))
            self._cond.notify_all()
        return job

    def depth(self) -> dict[str, int]:
        with self._cond:
            return self.batcher.depth()

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)  # once, on the thread that computes
        while True:
            with self._cond:
                for late in self.batcher.expired():
                    late.payload.future.set_exception(TimeoutError("the deadline passed before it ran"))
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
            x = torch.stack([j.x for j in jobs])
            with torch.inference_mode():
                x = x.to(self.encoder.compute_dtype)
                with self.encoder.autocast(x):
                    feats = self.encoder.forward_features(x)
                    logits = self.encoder.forward_head(feats) if self.encoder.info.num_classes else None
            results = [
                {
                    "features": feats[i].float(),
                    **({"logits": logits[i].float()} if logits is not None else {}),
                }
                for i in range(len(jobs))
            ]
        except Exception as e:  # a failing batch answers its requests with the error, the worker goes on
            log.exception("batch of %d failed", len(jobs))
            results = [e] * len(jobs)  # type: ignore[list-item]
        elapsed = time.monotonic() - start
        self.busy_s += elapsed
        self.batch_sizes.append(len(jobs))
        with self._cond:
            self.batcher.done(batch, elapsed)
        for request, job, result in zip(batch, jobs, results, strict=True):
            job.queued_s = start - request.arrival
            job.compute_s = elapsed
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)


def _copy_result(source: Future[dict[str, torch.Tensor]], job: Job) -> None:
    if source.exception() is not None:
        job.future.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        job.future.set_result(source.result())
