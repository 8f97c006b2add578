"""Measurement: the analytic cost model, counted FLOPs and the memory planner."""

from vitedge.measure.cost import CostReport, LayerCost, analyze, dtype_bytes
from vitedge.measure.counted import CountedFlops, count_flops
from vitedge.measure.memory import (
    BatchPlan,
    MeasuredPeak,
    live_tensor_peak,
    measure_peak_rss,
    parse_bytes,
    plan_batch,
)

__all__ = [
    "BatchPlan",
    "CostReport",
    "CountedFlops",
    "LayerCost",
    "MeasuredPeak",
    "analyze",
    "count_flops",
    "dtype_bytes",
    "live_tensor_peak",
    "measure_peak_rss",
    "parse_bytes",
    "plan_batch",
]
