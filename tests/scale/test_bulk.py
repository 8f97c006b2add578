"""``encode --out FILE.parquet`` with the local engine: the table, the errors, resuming, bad arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vitedge
from vitedge.cli import app
from vitedge.data.video import iter_frames
from vitedge.models import load
from vitedge.paths import data_root
from vitedge.scale import (
    EncodeJob,
    FeatureTable,
    RayConfig,
    VideoConfig,
    list_inputs,
    read_features,
    run_bulk,
)

runner = CliRunner()
MEGAMIND = (data_root() / "video" / "Megamind.avi").resolve()
# 30 frames (every 9th of 270) in 5 keyframe segments
VIDEO = VideoConfig(frame_step=9, segment_frames=60)


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


def test_video_frames_become_rows_equal_to_encoding_the_frames(tmp_path, photo_dir):
    out = tmp_path / "f.parquet"
    job = EncodeJob(model="cifar-vit", cache="none", batch=8)
    result = run_bulk(job, [photo_dir, MEGAMIND], out=out, video=VIDEO)
    assert (result["videos"], result["frames"], result["segments"]) == (1, 30, 5)
    assert result["images"] == 13 + 30 and result["encoded"] == 12 + 30 and result["inputs"] == 14
    _keys, paths, feats, _ = read_features(out)
    frames = {p: f for p, f in zip(paths, feats, strict=True) if "#frame=" in p}
    names = [f"{MEGAMIND}#frame={n}" for n in range(0, 270, 9)]
    assert sorted(frames) == sorted(names)
    # the oracle: OpenCV decodes the whole file, and the model encodes those frames directly
    oracle = vitedge.encode(list(iter_frames(MEGAMIND, step=9)), load("cifar-vit"), cache=None)
    got = torch.from_numpy(np.stack([frames[n] for n in names]))
    torch.testing.assert_close(got, oracle, atol=1e-5, rtol=1e-5)


def test_a_video_job_resumes_inside_a_segment(tmp_path):
    job = EncodeJob(model="cifar-vit", cache="none", batch=4)
    full = tmp_path / "full.parquet"
    run_bulk(job, [MEGAMIND], out=full, video=VIDEO)
    keys, paths, feats, meta = read_features(full)
    # a job that died after writing every other frame: its parts hold 15 of the 30 rows, cutting segments
    out = tmp_path / "resumed.parquet"
    table = FeatureTable(out, namespace=meta["namespace"])
    table.write_part(list(keys[::2]), list(paths[::2]), feats[::2])
    again = run_bulk(job, [MEGAMIND], out=out, video=VIDEO)
    assert again["skipped"] == 15 and again["misses"] == 15 and again["rows"] == 30
    resumed = dict(zip(read_features(out)[1], read_features(out)[2], strict=True))
    for p, f in zip(paths, feats, strict=True):
        np.testing.assert_array_equal(resumed[p], f)


def test_a_broken_video_is_an_error_row_and_the_job_finishes(tmp_path, photo_dir):
    fake = tmp_path / "clip.mp4"
    fake.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"junk" * 100)
    one = sorted(photo_dir.glob("n*.jpg"))[0]
    result = run_bulk(EncodeJob(model="cifar-vit", cache="none"), [fake, one], out=tmp_path / "f.parquet")
    assert result["encoded"] == 1 and result["videos"] == 1
    assert [e["path"] for e in result["errors"]] == [str(fake.resolve())]
    assert "cannot be read as a video" in result["errors"][0]["reason"]


def test_folders_list_videos_and_video_flags_need_out(tmp_path, photo_dir):
    (tmp_path / "v").mkdir()
    (tmp_path / "v" / "a.avi").write_bytes(b"x")
    assert [p.name for p in list_inputs([tmp_path / "v"])] == ["a.avi"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no image or video"):
        list_inputs([tmp_path / "empty"])
    with pytest.raises(ValueError, match="--frame-step"):
        VideoConfig(frame_step=0)
    res = runner.invoke(app, ["encode", "cifar-vit", str(photo_dir), "--frame-step", "5"])
    assert res.exit_code == 2 and "give --out" in res.output
