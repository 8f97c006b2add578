"""The eviction policies on their own (no torch): orderings, admission, prefetch prediction, trace replay."""

from __future__ import annotations

import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vitedge.cache.policy import (
    ImportanceConfig,
    ImportanceLRUK,
    LFUPolicy,
    LRUPolicy,
    SequencePredictor,
    make_policy,
)
from vitedge.cache.replay import loop_trace, replay, scan_trace, zipf_trace


def test_policy_module_is_torch_free() -> None:
    import subprocess

    import vitedge.cache.policy as policy

    # Load the file on its own (the vitedge package itself imports torch) and check nothing pulls torch in.
    code = (
        "import importlib.util, sys; "
        f"spec = importlib.util.spec_from_file_location('policy', {policy.__file__!r}); "
        "m = importlib.util.module_from_spec(spec); sys.modules['policy'] = m; spec.loader.exec_module(m); "
        "p = m.ImportanceLRUK(); p.on_access('a'); p.on_insert('a', 1); "
        "assert 'torch' not in sys.modules and 'numpy' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lru_evicts_oldest() -> None:
    p = LRUPolicy()
    for k in "abc":
        p.on_access(k)
        p.on_insert(k, 1)
    p.on_access("a")
    assert p.victims(1) == ["b"]


def test_lfu_evicts_least_used() -> None:
    p = LFUPolicy()
    for k in "abc":
        p.on_access(k)
        p.on_insert(k, 1)
    for _ in range(3):
        p.on_access("a")
    p.on_access("c")
    assert p.victims(1) == ["b"]


def test_importance_evicts_singletons_before_repeated_keys() -> None:
    p = ImportanceLRUK()
    for k in ["hot", "hot", "cold"]:
        p.on_access(k)
        if k not in ("hot",) or p.resident_count == 0:
            p.on_insert(k, 10)
    assert p.victims(5) == ["cold"]


def test_importance_weights_cost_and_uniqueness() -> None:
    p = ImportanceLRUK(ImportanceConfig(freq_weight=0.0, unique_weight=0.5, cost_weight=0.5))
    p.on_access("cheap")
    p.on_insert("cheap", 1, cost=0.1, uniqueness=0.2)
    p.on_access("dear")
    p.on_insert("dear", 1, cost=5.0, uniqueness=0.9)
    assert p.importance("dear") > p.importance("cheap")
    assert p.victims(1) == ["cheap"]


def test_new_key_does_not_displace_hot_set() -> None:
    p = ImportanceLRUK()
    for _ in range(3):
        for k in ("a", "b"):
            p.on_access(k)
            if p.resident_count < 2 and k not in ("a", "b")[: p.resident_count]:
                p.on_insert(k, 1)
    p.on_access("scan-1")
    assert not p.admit("scan-1", 1)


def test_bad_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="decay"):
        ImportanceConfig(decay=-1)
    with pytest.raises(ValueError, match="unknown eviction policy 'fifo'"):
        make_policy("fifo")


def test_sequence_predictor_learns_loops() -> None:
    pred = SequencePredictor(depth=2)
    for k in loop_trace(5, 2):
        pred.observe(k)
    assert pred.predict(1) == [2, 3]
    assert pred.predict(99) == []


def test_replay_hit_rates_order() -> None:
    loop = loop_trace(60, 4)
    assert replay(LRUPolicy(), loop, capacity=20).hit_rate == 0.0
    assert replay(ImportanceLRUK(), loop, capacity=20).hit_rate > 0.2
    pref = replay(ImportanceLRUK(), loop, capacity=20, predictor=SequencePredictor()).hit_rate
    assert pref > 0.4
    scan = scan_trace(30, 3000)
    assert (
        replay(ImportanceLRUK(), scan, capacity=40).hit_rate > replay(LRUPolicy(), scan, capacity=40).hit_rate
    )
    zipf = zipf_trace(500, 4000, alpha=1.0)
    assert (
        replay(ImportanceLRUK(), zipf, capacity=50).hit_rate > replay(LRUPolicy(), zipf, capacity=50).hit_rate
    )


@settings(max_examples=40, deadline=None)
@given(
    trace=st.lists(st.integers(0, 30), min_size=1, max_size=300),
    capacity=st.integers(1, 40),
    name=st.sampled_from(["lru", "lfu", "importance"]),
)
def test_replay_never_exceeds_capacity(trace: list[int], capacity: int, name: str) -> None:
    sizes = {k: 1 + k % 4 for k in range(31)}
    res = replay(make_policy(name), trace, capacity=capacity, size_of=lambda k: sizes[k])  # type: ignore[index]
    assert 0 <= res.hits <= res.requests == len(trace)
    assert res.peak_bytes <= capacity  # the store never held more than it may
    fitting = [k for k in trace if sizes[k] <= capacity]
    assert (res.peak_bytes > 0) == bool(fitting)
