"""The worker both engines run: decoding with per-file errors, and encoding through the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import vitedge
from vitedge.models import load
from vitedge.scale.worker import EncodeJob, EncoderWorker, decode_files, encode_decoded


def test_decode_files_keeps_going_past_bad_files(photo_dir):
    pre = load("cifar-vit").preprocess.to_json()
    good = sorted(photo_dir.glob("n*.jpg"))[:2]
    paths = [str(good[0]), str(photo_dir / "broken.jpg"), str(photo_dir / "missing.jpg"), str(good[1])]
    out = decode_files(paths, pre)
    assert out["pixels"].shape == (4, 3, 32, 32)
    assert list(out["error"] == "") == [True, False, False, True]
    assert "not an image" in out["error"][1] and "does not exist" in out["error"][2]
    assert len(out["key"][0]) == 64 and out["key"][1] == ""
    assert not out["pixels"][1].any()


def test_decode_files_refuses_pixels_over_the_limit(photo_dir):
    pre = load("cifar-vit").preprocess.to_json()
    path = str(sorted(photo_dir.glob("n*.jpg"))[0])
    out = decode_files([path], pre, max_pixels=1000)
    assert "over the limit" in out["error"][0]


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("threads", 0, "threads"),
        ("batch", 0, "batch"),
        ("value_format", "fp8", "--format"),
        ("max_pixels", 0, "max-pixels"),
    ],
)
def test_bad_job_settings_are_named(field, value, match):
    with pytest.raises(ValueError, match=match):
        EncodeJob(model="cifar-vit", **{field: value})


def test_job_round_trips_through_json():
    job = EncodeJob(model="cifar-vit", opts=("merge:r=4",), cache="none", batch=8)
    assert EncodeJob.from_json(job.to_json()) == job


def test_worker_features_equal_encode_and_hits_equal_misses(photo_dir):
    paths = [str(p) for p in sorted(photo_dir.glob("n*.jpg"))[:5]]
    worker = EncoderWorker(EncodeJob(model="cifar-vit", cache="memory", threads=2))
    pre = worker.model.preprocess.to_json()
    first = encode_decoded(worker, decode_files(paths, pre))
    assert worker.feature_shape == (66, 192)
    assert not first["hit"].any() and worker.stats.misses == 5
    again = encode_decoded(worker, decode_files(paths, pre))
    assert again["hit"].all()
    np.testing.assert_array_equal(first["feature"], again["feature"])
    plain = vitedge.encode(paths, load("cifar-vit"), cache=None)
    torch.testing.assert_close(torch.from_numpy(first["feature"]), plain, atol=2e-3, rtol=2e-3)
    worker.close()


def test_error_rows_pass_through_with_zero_features(photo_dir):
    worker = EncoderWorker(EncodeJob(model="cifar-vit", cache="none"))
    pre = worker.model.preprocess.to_json()
    out = encode_decoded(worker, decode_files([str(photo_dir / "broken.jpg")], pre), node="n1")
    assert out["feature"].shape == (1, 66, 192) and not out["feature"].any()
    assert out["error"][0] and list(out["node"]) == ["n1"]
