"""The model worker alone: a result nobody waits for any more must not end the thread that computes."""

from __future__ import annotations

import concurrent.futures
import gc
import weakref

import pytest

from vitedge.models import load
from vitedge.serve.batcher import BatcherConfig
from vitedge.serve.worker import ModelWorker, settle


def test_a_client_gone_while_its_batch_runs_does_not_end_the_worker() -> None:
    enc = load("timm:deit_tiny_patch16_224")
    worker = ModelWorker({(224, 224): enc}, BatcherConfig(max_batch=1, max_wait_ms=0), threads=1)
    worker.start()
    worker.ready.result(60)
    x = enc.example_input(1)[0]  # (3, 224, 224)
    left = worker.submit("left", (224, 224), x, priority="normal", deadline_s=None)
    left.future.cancel()  # what the event loop does when the client goes away after the batch has started
    stayed = worker.submit("stayed", (224, 224), x, priority="normal", deadline_s=None)
    try:
        assert stayed.future.result(60)["features"].shape == (197, 192)
        assert worker.images == 2 and left.future.cancelled()
    finally:
        worker.stop()


def test_settle_still_refuses_to_answer_twice() -> None:
    future: concurrent.futures.Future[int] = concurrent.futures.Future()
    settle(future, 1)
    with pytest.raises(concurrent.futures.InvalidStateError):
        settle(future, 2)
    assert future.result() == 1
    failed: concurrent.futures.Future[int] = concurrent.futures.Future()
    settle(failed, ValueError("bad batch"))
    assert isinstance(failed.exception(), ValueError)


def test_an_answered_job_is_freed_without_waiting_for_the_garbage_collector() -> None:
    """A job and the batcher's request for it must not form a reference cycle: under sustained load the
    cycles (each holding an image and its features) outlived Python's rare full collections, and the
    service's RSS grew steadily."""
    enc = load("timm:deit_tiny_patch16_224")
    worker = ModelWorker({(224, 224): enc}, BatcherConfig(max_batch=1, max_wait_ms=0), threads=1)
    worker.start()
    worker.ready.result(60)
    x = enc.example_input(1)[0]
    gc.disable()
    try:
        first = worker.submit("first", (224, 224), x.clone(), priority="normal", deadline_s=None)
        first.future.result(60)
        freed = weakref.ref(first)
        del first
        # the next batch rebinds the worker's locals that still name the first
        worker.submit("second", (224, 224), x, priority="normal", deadline_s=None).future.result(60)
        assert freed() is None
    finally:
        gc.enable()
        worker.stop()
