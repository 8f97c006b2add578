"""The Parquet feature table: parts, resume, merge with each path once, namespace guard, errors table."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from vitedge.scale.table import FeatureTable, read_features

NS_A = "a" * 64
NS_B = "b" * 64


def _batch(start: int, n: int) -> tuple[list[str], list[str], np.ndarray]:
    keys = [f"{i:064x}" for i in range(start, start + n)]
    paths = [f"/data/img{i}.jpg" for i in range(start, start + n)]
    feats = np.arange(start * 6, (start + n) * 6, dtype=np.float32).reshape(n, 2, 3)  # (B, N, D)
    return keys, paths, feats


def test_parts_merge_into_one_table_and_read_back(tmp_path):
    out = tmp_path / "f.parquet"
    table = FeatureTable(out, namespace=NS_A, meta={"model": "cifar-vit"})
    assert table.done_paths() == set()
    table.write_part(*_batch(0, 3))
    table.write_part(*_batch(3, 2))
    assert len(list(table.parts.glob("*.parquet"))) == 2
    assert table.done_paths() == {f"/data/img{i}.jpg" for i in range(5)}
    summary = table.finish([{"path": "/data/bad.jpg", "reason": "not an image"}])
    assert summary == {"rows": 5, "duplicates_dropped": 0}
    assert not table.parts.exists()
    keys, paths, feats, meta = read_features(out)
    assert paths == [f"/data/img{i}.jpg" for i in range(5)]
    assert keys[4] == f"{4:064x}"
    np.testing.assert_array_equal(feats, np.arange(30, dtype=np.float32).reshape(5, 2, 3))
    assert meta == {"model": "cifar-vit", "namespace": NS_A}
    errors = pq.read_table(table.errors_path).to_pylist()
    assert errors == [{"path": "/data/bad.jpg", "reason": "not an image"}]


def test_a_rerun_resumes_from_the_table_and_left_parts(tmp_path):
    out = tmp_path / "f.parquet"
    first = FeatureTable(out, namespace=NS_A)
    first.write_part(*_batch(0, 2))
    first.finish()
    crashed = FeatureTable(out, namespace=NS_A)  # a job that died after one part
    crashed.write_part(*_batch(2, 2))
    rerun = FeatureTable(out, namespace=NS_A)
    assert rerun.done_paths() == {f"/data/img{i}.jpg" for i in range(4)}
    rerun.write_part(*_batch(4, 1))
    assert rerun.finish()["rows"] == 5
    assert len(read_features(out)[1]) == 5


def test_a_path_written_twice_is_kept_once(tmp_path):
    table = FeatureTable(tmp_path / "f.parquet", namespace=NS_A)
    table.write_part(*_batch(0, 3))
    table.write_part(*_batch(2, 2))  # img2 again, as a retried batch would
    assert table.finish() == {"rows": 4, "duplicates_dropped": 1}
    _, paths, feats, _ = read_features(table.out)
    assert paths == [f"/data/img{i}.jpg" for i in range(4)]
    np.testing.assert_array_equal(feats[2], np.arange(12, 18, dtype=np.float32).reshape(2, 3))


def test_another_namespace_cannot_append(tmp_path):
    out = tmp_path / "f.parquet"
    table = FeatureTable(out, namespace=NS_A)
    table.write_part(*_batch(0, 1))
    with pytest.raises(ValueError, match="another model or stack"):
        FeatureTable(out, namespace=NS_B)  # its parts
    table.finish()
    with pytest.raises(ValueError, match="another model or stack"):
        FeatureTable(out, namespace=NS_B)


@pytest.mark.parametrize("name", ["f.csv", "f"])
def test_out_must_be_a_parquet_file(tmp_path, name):
    with pytest.raises(ValueError, match=r"\.parquet"):
        FeatureTable(tmp_path / name, namespace=NS_A)


def test_a_batch_must_be_aligned(tmp_path):
    table = FeatureTable(tmp_path / "f.parquet", namespace=NS_A)
    keys, paths, feats = _batch(0, 3)
    with pytest.raises(ValueError, match="as many keys, paths and features"):
        table.write_part(keys[:2], paths, feats)


def test_an_empty_job_writes_an_empty_table(tmp_path):
    table = FeatureTable(tmp_path / "f.parquet", namespace=NS_A)
    assert table.finish() == {"rows": 0, "duplicates_dropped": 0}
    assert read_features(table.out)[2].shape[0] == 0
    assert not table.errors_path.exists()
