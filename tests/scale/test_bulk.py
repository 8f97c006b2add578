"""``encode --out FILE.parquet`` with the local engine: the table, the errors, resuming, bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vitedge
from vitedge.cli import app
from vitedge.models import load
from vitedge.scale import EncodeJob, RayConfig, list_inputs, read_features, run_bulk

runner = CliRunner()


def test_local_job_writes_every_good_input_once_and_reports_the_bad(tmp_path, photo_dir):
    out = tmp_path / "f.parquet"
    job = EncodeJob(model="cifar-vit", cache="none", batch=5)
    result = run_bulk(job, [photo_dir], out=out)
    assert result["images"] == 13 and result["encoded"] == 12 and result["rows"] == 12
    assert [e["path"] for e in result["errors"]] == [str((photo_dir / "broken.jpg").resolve())]
    _keys, paths, feats, meta = read_features(out)
    assert sorted(paths) == sorted(str(p.resolve()) for p in photo_dir.glob("n*.jpg"))
    assert feats.shape == (12, 66, 192) and meta["namespace"] == result["namespace"]
    plain = vitedge.encode(paths, load("cifar-vit"), cache=None)
    torch.testing.assert_close(torch.from_numpy(feats), plain, atol=1e-5, rtol=1e-5)
    assert result["steady_images_per_s"] > 0


def test_a_rerun_computes_nothing_and_a_new_file_is_added(tmp_path, photo_dir):
    out = tmp_path / "f.parquet"
    job = EncodeJob(model="cifar-vit", cache="none", batch=4)
    files = sorted(photo_dir.glob("n*.jpg"))
    run_bulk(job, files[:6], out=out)
    again = run_bulk(job, files[:6], out=out)
    assert again["skipped"] == 6 and again["encoded"] == 0 and again["rows"] == 6
    more = run_bulk(job, files[:8], out=out)
    assert more["skipped"] == 6 and more["misses"] == 2 and more["rows"] == 8


def test_the_cache_answers_a_job_into_another_table(tmp_path, photo_dir):
    job = EncodeJob(model="cifar-vit", cache="disk", cache_dir=str(tmp_path / "cache"), batch=4)
    first = run_bulk(job, [photo_dir], out=tmp_path / "a.parquet")
    second = run_bulk(job, [photo_dir], out=tmp_path / "b.parquet")
    assert first["misses"] == 12 and second["hits"] == 12 and second["misses"] == 0
    np.testing.assert_array_equal(
        read_features(tmp_path / "a.parquet")[2], read_features(tmp_path / "b.parquet")[2]
    )


def test_another_stack_cannot_append_to_a_table(tmp_path, photo_dir):
    out = tmp_path / "f.parquet"
    files = sorted(photo_dir.glob("n*.jpg"))[:2]
    run_bulk(EncodeJob(model="cifar-vit", cache="none"), files, out=out)
    with pytest.raises(ValueError, match="another model or stack"):
        run_bulk(EncodeJob(model="cifar-vit", opts=("merge:r=4",), cache="none"), files, out=out)


def test_inputs_mix_folders_and_files_and_appear_once(photo_dir):
    one = sorted(photo_dir.glob("n*.jpg"))[0]
    files = list_inputs([photo_dir, one, str(one)])
    assert len(files) == 13 and files.count(one.resolve()) == 1
    assert len(list_inputs([photo_dir], limit=3)) == 3
    with pytest.raises(ValueError, match="neither a folder nor a file"):
        list_inputs([photo_dir / "nope"])
    with pytest.raises(ValueError, match="at least one"):
        list_inputs([])


def test_bad_engine_settings_are_named(tmp_path, photo_dir):
    job = EncodeJob(model="cifar-vit", cache="none")
    with pytest.raises(ValueError, match="--engine must be one of"):
        run_bulk(job, [photo_dir], out=tmp_path / "f.parquet", engine="spark")
    with pytest.raises(ValueError, match="need --engine ray"):
        run_bulk(job, [photo_dir], out=tmp_path / "f.parquet", ray=RayConfig(actors=2))
    with pytest.raises(ValueError, match="--actors"):
        RayConfig(actors=0)


def test_cli_writes_the_table_and_reports_json(tmp_path, photo_dir):
    out = tmp_path / "f.parquet"
    args = ["encode", "cifar-vit", str(photo_dir), "--out", str(out), "--cache", "none", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["encoded"] == 12 and report["out"] == str(out) and len(report["errors"]) == 1
    assert len(read_features(out)[1]) == 12


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engine", "ray"], "give --out"),
        (["--actors", "2", "--out", "x.parquet"], "need --engine ray"),
        (["--out", "x.csv"], ".parquet"),
    ],
)
def test_cli_refuses_bad_combinations(photo_dir, extra, message):
    res = runner.invoke(app, ["encode", "cifar-vit", str(photo_dir), "--cache", "none", *extra])
    assert res.exit_code == 2
    assert message in res.output


def test_cli_without_out_takes_one_folder(photo_dir):
    res = runner.invoke(app, ["encode", "cifar-vit", str(photo_dir), str(photo_dir), "--cache", "memory"])
    assert res.exit_code == 2 and "give --out" in res.output
