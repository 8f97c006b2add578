"""Analytic cost against counted execution on every supported model id (the issue asks for 1 %)."""

from __future__ import annotations

from vitedge.measure import analyze, count_flops
from vitedge.models.base import Encoder


def test_counted_matches_analytic_within_1_percent(any_model: Encoder) -> None:
    counted = count_flops(any_model, any_model.example_input(1)).total
    analytic = analyze(any_model.arch()).flops
    assert abs(counted / analytic - 1) < 0.01, (any_model.model_id, counted, analytic)


def test_batch_scales_linearly(any_model: Encoder) -> None:
    one = analyze(any_model.arch(), batch=1)
    three = analyze(any_model.arch(), batch=3)
    assert three.macs == 3 * one.macs and three.flops == 2 * three.macs
    assert three.weight_bytes == one.weight_bytes
