"""The service's scheduler with a fake clock: batch closing, buckets, priorities and aging, deadlines,
backpressure, single flight, cancellation; and that it imports no torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vitedge.serve.batcher import Batcher, BatcherConfig, LatencyModel, QueueFull, Request


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def advance(self, ms: float) -> None:
        self.now += ms / 1e3


def make(**config) -> tuple[Batcher, Clock]:
    clock = Clock()
    return Batcher(BatcherConfig(**config), clock=clock), clock


def req(key: str, bucket: int = 224, priority: str = "normal", deadline: float | None = None) -> Request:
    return Request(key=key, bucket=bucket, priority=priority, deadline=deadline)


def test_a_batch_closes_when_full_or_when_the_oldest_has_waited() -> None:
    b, clock = make(max_batch=4, max_wait_ms=10)
    for i in range(3):
        b.submit(req(f"k{i}"))
    assert b.next_batch() == [] and b.wait_time() == pytest.approx(0.010)
    b.submit(req("k3"))
    assert [r.key for r in b.next_batch()] == ["k0", "k1", "k2", "k3"]  # full: now
    b.submit(req("k4"))
    clock.advance(9)
    assert b.next_batch() == []
    clock.advance(1)
    assert [r.key for r in b.next_batch()] == ["k4"]  # waited max_wait_ms
    assert b.wait_time() is None


def test_buckets_are_never_mixed() -> None:
    b, _ = make(max_batch=8, max_wait_ms=0)
    for i in range(3):
        b.submit(req(f"a{i}", bucket=224))
        b.submit(req(f"b{i}", bucket=160))
    first, second = b.next_batch(), b.next_batch()
    assert {r.bucket for r in first} == {224} and {r.bucket for r in second} == {160}
    assert len(first) == len(second) == 3


def test_realtime_goes_first_with_a_smaller_batch_and_aging_prevents_starvation() -> None:
    b, clock = make(max_batch=8, max_wait_ms=50, realtime_max_batch=2, aging_ms=100)
    for i in range(6):
        b.submit(req(f"bulk{i}", priority="bulk"))
    clock.advance(1)
    b.submit(req("rt0", priority="realtime"))
    b.submit(req("rt1", priority="realtime"))
    b.submit(req("rt2", priority="realtime"))
    assert b.cap(realtime_led=True) == 2 and b.wait_time() == 0.0  # realtime does not wait for company
    assert [r.key for r in b.next_batch()] == ["rt0", "rt1"]
    assert [r.key for r in b.next_batch()] == ["rt2"]  # a realtime batch is not padded with bulk work
    clock.advance(150)  # bulk has waited 151 ms: 1.5 levels, not yet ahead of fresh realtime work
    b.submit(req("rt3", priority="realtime"))
    assert b.rank(b.queues["bulk"][0], clock()) == pytest.approx(2 - 1.51)
    assert [r.key for r in b.next_batch()] == ["rt3"]
    clock.advance(100)  # 251 ms: two levels and more ahead of a realtime request that just came
    b.submit(req("rt4", priority="realtime"))
    assert b.rank(b.queues["bulk"][0], clock()) < b.rank(b.queues["realtime"][0], clock())
    batch = [r.key for r in b.next_batch()]  # aged bulk runs before fresh realtime (which may fill it)
    assert batch[:6] == [f"bulk{i}" for i in range(6)]


def test_a_full_queue_refuses_with_retry_after() -> None:
    b, _ = make(queue_size=2)
    b.submit(req("a"))
    b.submit(req("b"))
    with pytest.raises(QueueFull) as e:
        b.submit(req("c"))
    assert e.value.priority == "normal" and e.value.retry_after >= 1.0
    b.submit(req("d", priority="bulk"))  # each priority has its own bound
    assert b.depth() == {"realtime": 0, "normal": 2, "bulk": 1}


def test_expired_requests_are_dropped_before_they_start() -> None:
    b, clock = make(max_wait_ms=1000, deadline_ms=50)
    late = b.submit(req("late"))
    ok = b.submit(req("ok", deadline=clock() + 0.010))
    clock.advance(20)
    assert b.expired() == [ok]
    clock.advance(40)
    assert b.expired() == [late] and b.wait_time() is None


def test_the_batch_shrinks_to_meet_the_earliest_deadline() -> None:
    b, clock = make(max_batch=8, max_wait_ms=0)
    for n, seconds in ((1, 0.012), (8, 0.082)):  # 2 ms + 10 ms per image
        b.latency_of(224).observe(n, seconds)
    for i in range(8):
        b.submit(req(f"k{i}", deadline=clock() + (0.045 if i == 0 else 5.0)))
    batch = b.next_batch()
    assert len(batch) == 4  # 4 images: 42 ms, inside the first request's 45 ms; 5 would take 52
    assert [r.key for r in b.next_batch()] == [f"k{i}" for i in range(4, 8)]


def test_identical_images_are_computed_once() -> None:
    b, _ = make(max_batch=4, max_wait_ms=0)
    leader = b.submit(req("same"))
    follower = req("same")
    assert b.submit(follower) is leader and b.depth()["normal"] == 1
    batch = b.next_batch()
    again = req("same")  # arrives while the batch runs: still attached
    assert b.submit(again) is leader
    answered = b.done(batch, 0.01)
    assert answered == [leader, follower, again] and b.in_flight == {}
    assert b.submit(req("same")) is not leader  # after completion it is computed afresh (or served by cache)


def test_cancel_drops_queued_work_and_hands_followers_over() -> None:
    b, _ = make(max_wait_ms=0)
    leader = b.submit(req("x"))
    follower = req("x")
    b.submit(follower)
    assert b.cancel(leader)
    assert b.in_flight["x"] is follower and b.next_batch() == [follower]
    assert not b.cancel(follower)  # running now: nothing to cancel


def test_a_follower_whose_client_left_is_detached_and_expiry_takes_followers_along() -> None:
    b, clock = make(max_wait_ms=50)
    leader = b.submit(req("x", deadline=clock() + 0.010))
    stays, leaves = req("x"), req("x")
    b.submit(stays)
    b.submit(leaves)
    assert b.cancel(leaves) and leader.followers == [stays]
    assert not b.cancel(leaves)  # already gone
    clock.advance(20)
    assert b.expired() == [leader] and leader.followers == [stays]  # the worker answers both 504
    assert b.in_flight == {}


def test_resize_and_the_latency_target_move_the_cap_within_the_limit() -> None:
    b, _ = make(max_batch=32, max_wait_ms=0, latency_target_ms=100)
    assert b.resize(64) == 32 and b.resize(0) == 1
    b.resize(8)
    for i in range(8):
        b.submit(req(f"a{i}"))
    batch = b.next_batch()
    b.done(batch, 0.050)  # 8 images in 50 ms, target 100 ms: B_new = 8 * 100 / 50 = 16
    assert b.max_batch == 16
    for i in range(16):
        b.submit(req(f"b{i}"))
    b.done(b.next_batch(), 0.400)  # 16 in 400 ms: 16 * 100 / 400 = 4
    assert b.max_batch == 4
    b.submit(req("c"))
    b.done(b.next_batch(), 0.010)  # a partial batch under the target says nothing about the cap
    assert b.max_batch == 4
    fixed, _ = make(max_batch=8, max_wait_ms=0)  # no target: the cap never moves by itself
    for i in range(8):
        fixed.submit(req(f"d{i}"))
    fixed.done(fixed.next_batch(), 5.0)
    assert fixed.max_batch == 8


def test_latency_is_modelled_per_bucket_and_retry_after_grows_with_the_queue() -> None:
    b, _ = make(max_batch=4, max_wait_ms=0, queue_size=8)
    for n, seconds in ((1, 0.5), (4, 2.0)):
        b.latency_of(224).observe(n, seconds)
    b.latency_of(160).observe(1, 0.1)
    assert b.latency_of(160).predict(4) is None and b.latency_of(224).predict(4) == pytest.approx(2.0)
    for i in range(8):
        b.submit(req(f"k{i}"))
    with pytest.raises(QueueFull) as e:
        b.submit(req("k8"))
    assert e.value.retry_after == pytest.approx(4.0)  # two batches of 4 ahead, 2 s each


def test_with_realtime_traffic_about_batches_fit_the_realtime_wait() -> None:
    b, clock = make(max_batch=16, max_wait_ms=0, realtime_max_batch=2, realtime_wait_ms=100)
    for n, seconds in ((1, 0.030), (16, 0.330)):  # 10 ms + 20 ms per image
        b.latency_of(224).observe(n, seconds)
    assert b.cap(224) == 16  # no realtime traffic yet
    b.submit(req("rt", priority="realtime"))
    assert b.cap(224, realtime_led=True) == 2 and [r.key for r in b.next_batch()] == ["rt"]
    for i in range(16):
        b.submit(req(f"n{i}"))
    assert b.cap(224) == 4 and len(b.next_batch()) == 4  # 4 images: 90 ms, within 100
    clock.advance(2001)  # realtime traffic is no longer about: full batches again
    assert b.cap(224) == 16 and len(b.next_batch()) == 12


def test_with_realtime_traffic_about_batches_take_at_most_half_a_full_batch() -> None:
    """A generous realtime_wait_ms does not let the running batch take a full batch's time: a realtime
    request would then wait as long as the normal work it is meant to overtake."""
    b, _ = make(max_batch=16, max_wait_ms=0, realtime_max_batch=2, realtime_wait_ms=1000)
    for n, seconds in ((1, 0.030), (16, 0.330)):  # 10 ms + 20 ms per image; a full batch: 330 ms
        b.latency_of(224).observe(n, seconds)
    b.submit(req("rt", priority="realtime"))
    b.next_batch()
    assert b.cap(224) == 7  # 7 images: 150 ms <= 165 ms; 8 would take 170


def test_latency_model_fits_fixed_and_per_image_cost() -> None:
    m = LatencyModel()
    assert m.predict(4) is None
    for n in (1, 2, 4, 8):
        m.observe(n, 0.003 + 0.010 * n)
    assert m.predict(16) == pytest.approx(0.163)


def test_bad_settings_are_named() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        BatcherConfig(max_batch=0)
    with pytest.raises(ValueError, match="latency_target_ms"):
        BatcherConfig(latency_target_ms=0)
    with pytest.raises(ValueError, match="priority"):
        Request(key="k", bucket=1, priority="urgent")


def test_the_scheduler_imports_no_torch() -> None:
    code = "import sys, vitedge.serve.batcher; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
