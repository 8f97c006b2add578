"""The one-call Python entry points over an encoder in memory: profile, evaluate, bench."""

from __future__ import annotations

import pytest

import vitedge
from vitedge.models import load


def test_profile_measures_the_object_as_optimised() -> None:
    base = vitedge.profile("vit4mnist", counted=False)
    merged = vitedge.profile(vitedge.optimize_(load("vit4mnist"), "merge:r=2"))
    assert merged["name"] == "merge:r=2" and merged["macs"] < base["macs"]
    assert abs(merged["counted_flops"] / merged["flops"] - 1) < 0.01
    with pytest.raises(ValueError, match="batch"):
        vitedge.profile("vit4mnist", batch=0)


def test_evaluate_on_real_digits_against_a_baseline() -> None:
    model = vitedge.optimize_(load("vit4mnist"), "bf16")
    r = vitedge.evaluate(model, "mnist", baseline="vit4mnist", limit=300, batch=100)
    assert r["n"] == 300 and r["top1"] > 0.9 and r["baseline_top1"] > 0.9
    assert r["top1_agreement"] > 0.98 and r["mean_cosine"] > 0.99
    with pytest.raises(ValueError, match="positive"):
        vitedge.evaluate(model, "mnist", limit=0)


def test_bench_times_against_a_baseline_in_the_same_run() -> None:
    model = vitedge.optimize_(load("vit4mnist"), "merge:r=2")
    r = vitedge.bench(model, baseline="vit4mnist", batch=8, min_seconds=0.2, max_seconds=1.0)
    assert r["baseline"]["name"] == "baseline" and r["variants"][0]["name"] == "merge:r=2"
    v = r["variants"][0]
    assert v["speedup_low"] <= v["speedup"] <= v["speedup_high"]
    alone = vitedge.bench("vit4mnist", batch=4, min_seconds=0.1, max_seconds=0.5)
    assert "baseline" not in alone and alone["variants"][0]["images_per_s"] > 0


@pytest.mark.slow
def test_the_readme_session_runs(tmp_path) -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "examples" / "session.py"
    args = [sys.executable, str(script), "--limit", "200", "--seconds", "0.3", "--out", str(tmp_path / "m")]
    out = subprocess.run(args, check=True, capture_output=True, text=True, timeout=300).stdout
    assert "merge:r=5 int8: 66 -> 21 tokens" in out and "same outputs True" in out
