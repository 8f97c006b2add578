"""The encoder service's scheduler: dynamic batching with priorities, deadlines and resolution buckets.

Torch-free and clock-injected, so its policy is tested with a fake clock (as :mod:`vitedge.cache.policy` is).
The HTTP layer hands it :class:`Request` objects and answers from what it decides; one model worker asks it
for the next batch, runs it, and reports back. Nothing here knows HTTP or tensors.

Policy:

- **Buckets.** Requests are grouped by preprocessed input size (``bucket``); a batch never mixes buckets, so
  nothing is padded into another size's batch.
- **Priorities with aging.** ``realtime`` ranks before ``normal`` before ``bulk``; every request's rank falls
  by one for every ``aging_ms`` it has waited, so one level of priority is a head start of ``aging_ms``
  (default 2 s) and bulk work is never starved. The batch's bucket is that of the
  best-ranked waiting request (ties: the oldest), and the batch is filled from that bucket in the same order.
- **When a batch closes.** When ``max_batch`` requests of the bucket wait, or the oldest has waited
  ``max_wait_ms``, or a realtime request waits (it does not wait for company).
- **Bounding a realtime request's wait.** A running batch is never interrupted. So a batch led by realtime
  work holds realtime work only, at most ``realtime_max_batch``; and while realtime traffic is about (a
  realtime request in the last 2 s), every other batch is capped at the largest predicted to run within
  ``realtime_wait_ms`` (default 250 ms). A realtime request then waits for at most the rest of one such
  batch and its own short batch.
- **Deadlines.** Each request has one (its own or ``deadline_ms``). With a latency model (per-batch latency
  measured by the worker, :class:`LatencyModel`), the batch is the largest that still completes before the
  earliest deadline in it; requests whose deadline has passed before they start are dropped (the service
  answers 504).
- **Backpressure.** Each priority has a bounded queue; a full one refuses with a ``retry_after`` estimate
  (429).
- **Single flight.** A request whose ``key`` (the feature-cache key of its image and model) is already queued
  or running is attached to that one and answered with its result; it never takes a batch slot. A follower
  shares its leader's fate (result, error or expiry); the worker answers ``[leader, *leader.followers]``.
- **Batch size.** ``config.max_batch`` is the limit; ``Batcher.max_batch`` the cap in force, set by the
  service's warm-up (:meth:`resize`) and, with ``latency_target_ms``, moved after each batch by the seed's
  rule ``B_new = n * T_target / T_measured`` (at most doubling per step, within 1..limit), so that batches
  track the latency target as load and input size change.
- **Latency per bucket.** Each input size has its own :class:`LatencyModel`: a 160 px batch says nothing
  about a 224 px one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

PRIORITIES = ("realtime", "normal", "bulk")
REALTIME_MEMORY_S = 2.0  # realtime traffic counts as "about" this long after a realtime request arrived


@dataclass(frozen=True, kw_only=True)
class BatcherConfig:
    """How requests become batches (see the module docstring)."""

    max_batch: int = 16
    max_wait_ms: float = 10.0
    queue_size: int = 256  # per priority
    deadline_ms: float = 30_000.0  # for requests that bring none
    aging_ms: float = 2000.0
    realtime_max_batch: int = 4
    latency_target_ms: float | None = None  # move the batch cap towards this per-batch latency
    realtime_wait_ms: float | None = 250.0  # with realtime traffic about: cap batches to run within this

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.realtime_max_batch < 1 or self.queue_size < 1:
            raise ValueError(
                "max_batch, realtime_max_batch and queue_size must be >= 1, got "
                f"{self.max_batch}, {self.realtime_max_batch} and {self.queue_size}"
            )
        if self.realtime_wait_ms is not None and self.realtime_wait_ms <= 0:
            raise ValueError(f"realtime_wait_ms must be > 0, got {self.realtime_wait_ms}")
        if self.latency_target_ms is not None and self.latency_target_ms <= 0:
            raise ValueError(f"latency_target_ms must be > 0, got {self.latency_target_ms}")
        if self.max_wait_ms < 0 or self.deadline_ms <= 0 or self.aging_ms <= 0:
            raise ValueError(
                f"need max_wait_ms >= 0 and deadline_ms, aging_ms > 0, got {self.max_wait_ms}, "
                f"{self.deadline_ms} and {self.aging_ms}"
            )


class QueueFull(Exception):
    """A priority's queue is full; ``retry_after`` (seconds) estimates when it has room again."""

    def __init__(self, priority: str, retry_after: float) -> None:
        super().__init__(f"the {priority} queue is full; retry after {retry_after:.1f} s")
        self.priority = priority
        self.retry_after = retry_after


@dataclass(eq=False, kw_only=True)
class Request:
    """One image to encode. ``key`` identifies its result (single flight); ``bucket`` its input size."""

    key: str
    bucket: Any
    priority: str = "normal"
    deadline: float | None = None  # absolute, on the batcher's clock; None: arrival + deadline_ms
    payload: Any = None
    arrival: float = 0.0  # set by submit
    followers: list[Request] = field(default_factory=list)  # identical requests answered with this one

    def __post_init__(self) -> None:
        if self.priority not in PRIORITIES:
            raise ValueError(f"priority must be one of {', '.join(PRIORITIES)}, got {self.priority!r}")


class LatencyModel:
    """Per-batch latency as ``fixed + per_image * n``, fitted by least squares to the worker's measurements
    (warm-up calibrates it); ``predict`` is None until two distinct batch sizes were seen."""

    def __init__(self, history: int = 64) -> None:
        self.samples: list[tuple[int, float]] = []
        self.history = history

    def observe(self, n: int, seconds: float) -> None:
        self.samples = [*self.samples, (n, seconds)][-self.history :]

    def fit(self) -> tuple[float, float] | None:
        sizes = {n for n, _ in self.samples}
        if len(sizes) < 2:
            return None
        k = len(self.samples)
        mx = sum(n for n, _ in self.samples) / k
        my = sum(s for _, s in self.samples) / k
        var = sum((n - mx) ** 2 for n, _ in self.samples)
        slope = sum((n - mx) * (s - my) for n, s in self.samples) / var
        slope = max(slope, 0.0)
        return max(my - slope * mx, 0.0), slope

    def predict(self, n: int) -> float | None:
        fitted = self.fit()
        return None if fitted is None else fitted[0] + fitted[1] * n


class Batcher:
    """Queues, admission and batch selection (not thread-safe: the service calls it under one lock)."""

    def __init__(
        self,
        config: BatcherConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config or BatcherConfig()
        self.clock = clock
        self.max_batch = self.config.max_batch  # the cap in force (see resize and latency_target_ms)
        self.last_realtime: float | None = None  # arrival of the latest realtime request
        self.latency: dict[Any, LatencyModel] = {}  # per bucket
        self.queues: dict[str, list[Request]] = {p: [] for p in PRIORITIES}
        self.in_flight: dict[str, Request] = {}  # key -> the request computing it (queued or running)
        self.completed = 0

    # --- admission ------------------------------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Queue ``request`` (or attach it to an identical one in flight) and return the request whose result
        will answer it.

        Raises:
            QueueFull: its priority's queue is full.
        """
        now = self.clock()
        request.arrival = now
        if request.priority == "realtime":
            self.last_realtime = now
        if request.deadline is None:
            request.deadline = now + self.config.deadline_ms / 1e3
        leader = self.in_flight.get(request.key)
        if leader is not None:  # single flight: the same image for the same model is computed once
            leader.followers.append(request)
            return leader
        self.admit(request.priority)
        self.queues[request.priority].append(request)
        self.in_flight[request.key] = request
        return request

    def admit(self, priority: str) -> None:
        """Raise :class:`QueueFull` now if ``priority``'s queue is full, so a refused request costs no
        decoding (``submit`` checks again: the queue may fill in between)."""
        if len(self.queues[priority]) >= self.config.queue_size:
            raise QueueFull(priority, self._retry_after(priority))

    def _retry_after(self, priority: str) -> float:
        """Seconds until the queue of ``priority`` may have drained a batch: one batch's predicted time, at
        least a second (HTTP's Retry-After is whole seconds)."""
        queued = len(self.queues[priority])
        per_batch = [m.predict(self.max_batch) for m in self.latency.values()]
        known = [s for s in per_batch if s is not None]
        batches = math.ceil(queued / self.max_batch)
        return max(1.0, batches * max(known) if known else 1.0)

    def latency_of(self, bucket: Any) -> LatencyModel:
        if bucket not in self.latency:
            self.latency[bucket] = LatencyModel()
        return self.latency[bucket]

    def resize(self, n: int) -> int:
        """Set the batch cap to ``n`` within 1..``config.max_batch``; return the cap now in force."""
        self.max_batch = max(1, min(int(n), self.config.max_batch))
        return self.max_batch

    def cancel(self, request: Request) -> bool:
        """Drop a request whose client went away: a queued one (its followers, if any, take over) or a
        follower (detached from its leader). False when it is running or unknown."""
        queue = self.queues[request.priority]
        if request not in queue:
            leader = self.in_flight.get(request.key)
            if leader is not None and request in leader.followers:
                leader.followers.remove(request)
                return True
            return False
        queue.remove(request)
        if request.followers:  # its followers still want the result: the first of them takes its place
            heir = request.followers[0]
            heir.followers = request.followers[1:]
            self.queues[heir.priority].append(heir)
            self.in_flight[request.key] = heir
        else:
            self.in_flight.pop(request.key, None)
        return True

    # --- scheduling -----------------------------------------------------------------------------
    def rank(self, request: Request, now: float) -> float:
        """Lower runs first: the priority's index less the time waited in units of ``aging_ms``. Every
        request ages alike, so one level of priority is a head start of ``aging_ms``: a normal request runs
        before a realtime one only if it has waited ``aging_ms`` longer, and bulk is never starved."""
        return PRIORITIES.index(request.priority) - (now - request.arrival) * 1e3 / self.config.aging_ms

    def expired(self) -> list[Request]:
        """Remove and return the queued requests whose deadline has passed (answered 504 with their
        followers, never run)."""
        now = self.clock()
        dropped: list[Request] = []
        for priority, queue in self.queues.items():
            keep: list[Request] = []
            for r in queue:
                (dropped if r.deadline is not None and r.deadline <= now else keep).append(r)
            self.queues[priority] = keep
        for r in dropped:
            self.in_flight.pop(r.key, None)
        return dropped

    def _waiting(self, now: float) -> list[Request]:
        everyone = [r for q in self.queues.values() for r in q]
        return sorted(everyone, key=lambda r: (self.rank(r, now), r.arrival))

    def cap(self, bucket: Any = None, *, realtime_led: bool = False) -> int:
        """The batch size limit now: ``realtime_max_batch`` for a batch led by realtime work; while realtime
        work has arrived in the last ``REALTIME_MEMORY_S`` seconds, the largest batch of ``bucket`` predicted
        to run within ``realtime_wait_ms`` and within half the time of a full batch (a realtime request that
        arrives next waits behind at most that);
        else ``max_batch``. (Capping every batch while realtime work is queued would starve throughput: aged
        normal work that outranks queued realtime work would then run in realtime-sized batches.)"""
        if realtime_led:
            return min(self.max_batch, self.config.realtime_max_batch)
        wait = self.config.realtime_wait_ms
        recent = self.last_realtime is not None and self.clock() - self.last_realtime < REALTIME_MEMORY_S
        if wait is None or not recent or bucket is None:
            return self.max_batch
        model = self.latency_of(bucket)
        full = model.predict(self.max_batch)
        # a realtime request arriving now waits behind the running batch: at most realtime_wait_ms, and at
        # most half a full batch's time, so it overtakes normal work by more than the batch it waits for
        limit = min(wait / 1e3, full / 2) if full else wait / 1e3
        fits = [n for n in range(1, self.max_batch + 1) if (model.predict(n) or 0.0) <= limit]
        return max([min(self.max_batch, self.config.realtime_max_batch), *fits])

    def wait_time(self) -> float | None:
        """Seconds until a batch is due (0: now), or None when nothing is queued."""
        now = self.clock()
        order = self._waiting(now)
        if not order:
            return None
        head = order[0]
        same = [r for r in order if r.bucket == head.bucket]
        led = head.priority == "realtime"
        if (
            len(same) >= self.cap(head.bucket, realtime_led=led)
            or head.priority == "realtime"
            or self.queues["realtime"]
        ):
            return 0.0
        oldest = min(r.arrival for r in same)
        return max(0.0, oldest + self.config.max_wait_ms / 1e3 - now)

    def next_batch(self) -> list[Request]:
        """The batch to run now (removed from the queues), or [] when none is due yet."""
        if self.wait_time() != 0.0:
            return []
        now = self.clock()
        order = self._waiting(now)
        head = order[0]
        batch = [r for r in order if r.bucket == head.bucket]
        if head.priority == "realtime":  # not padded with lower priorities: they would only make it slower
            batch = [r for r in batch if r.priority == "realtime"]
        batch = batch[: self.cap(head.bucket, realtime_led=head.priority == "realtime")]
        batch = self._fit_deadlines(batch, now)
        for r in batch:
            self.queues[r.priority].remove(r)
        return batch

    def _fit_deadlines(self, batch: list[Request], now: float) -> list[Request]:
        """The largest prefix of ``batch`` (at least one) predicted to finish before its earliest deadline."""
        model = self.latency_of(batch[0].bucket)
        for n in range(len(batch), 1, -1):
            predicted = model.predict(n)
            earliest = min(r.deadline for r in batch[:n] if r.deadline is not None)
            if predicted is None or now + predicted <= earliest:
                return batch[:n]
        return batch[:1]

    def done(self, batch: list[Request], seconds: float) -> list[Request]:
        """Record that ``batch`` ran in ``seconds``; return every request to answer (the batch and its
        followers)."""
        self.latency_of(batch[0].bucket).observe(len(batch), seconds)
        target = self.config.latency_target_ms
        if target is not None and seconds > 0 and len(batch) >= self.max_batch:
            # the seed's rule, only from full batches (a partial one says how long n took, not the cap)
            wanted = len(batch) * target / 1e3 / seconds
            self.resize(min(round(wanted), 2 * self.max_batch))
        elif target is not None and seconds * 1e3 > target:
            self.resize(min(self.max_batch, round(len(batch) * target / 1e3 / seconds)))
        answered: list[Request] = []
        for r in batch:
            if self.in_flight.get(r.key) is r:
                del self.in_flight[r.key]
            answered += [r, *r.followers]
        self.completed += len(answered)
        return answered

    def depth(self) -> dict[str, int]:
        """Queued requests per priority (for /metrics)."""
        return {p: len(q) for p, q in self.queues.items()}
