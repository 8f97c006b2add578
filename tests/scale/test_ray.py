"""The Ray engine on real local clusters on loopback, started and stopped here: two nodes, a killed actor,
a resumed job, and the CLI."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
from typer.testing import CliRunner

from support import process_titles
from vitedge.cli import app
from vitedge.paths import data_root
from vitedge.scale import EncodeJob, RayConfig, VideoConfig, read_features, run_bulk

ray = pytest.importorskip("ray")
cluster_utils = pytest.importorskip("ray.cluster_utils")
pytestmark = pytest.mark.slow
runner = CliRunner()
LOOPBACK = "127.0.0.1"
# The two-node cluster listens on another loopback address: ray.init(address=...) rewrites 127.0.0.1 (and
# localhost) to the machine's network address, where nothing listens; it leaves the rest of 127/8 alone.
CLUSTER_IP = "127.0.0.2"
MEGAMIND = (data_root() / "video" / "Megamind.avi").resolve()
VIDEO = VideoConfig(frame_step=9, segment_frames=60)  # 30 frames in 5 keyframe segments


def _sorted(out):
    _keys, paths, feats, _ = read_features(out)
    order = np.argsort(paths)
    return [paths[i] for i in order], feats[order]


@pytest.fixture(scope="module")
def local_table(tmp_path_factory, photo_dir):
    """The single-process engine's table of the photos and a video's frames: what Ray runs must reproduce."""
    out = tmp_path_factory.mktemp("local") / "local.parquet"
    run_bulk(EncodeJob(model="cifar-vit", cache="none", batch=4), [photo_dir, MEGAMIND], out=out, video=VIDEO)
    return _sorted(out)


def _photos(table):
    """The rows of a table that are photos (not video frames)."""
    keep = [i for i, p in enumerate(table[0]) if "#frame=" not in p]
    return [table[0][i] for i in keep], table[1][keep]


def _node_pids(class_name: str) -> list[int]:
    """PIDs of the Ray worker processes whose title names ``class_name`` (Ray titles them ``ray::...``)."""
    return [pid for pid, title in process_titles() if title.startswith("ray::") and class_name in title]


def test_two_nodes_share_a_job_and_match_the_local_engine(tmp_path, photo_dir, local_table):
    cluster = cluster_utils.Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "node_ip_address": CLUSTER_IP, "include_dashboard": False},
    )
    try:
        cluster.add_node(num_cpus=1, node_ip_address=CLUSTER_IP)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, _node_ip_address=CLUSTER_IP, log_to_driver=False)
        out = tmp_path / "ray.parquet"
        job = EncodeJob(model="cifar-vit", cache="none", batch=2, threads=1)
        config = RayConfig(show_progress=False)
        result = run_bulk(job, [photo_dir, MEGAMIND], out=out, engine="ray", ray=config, video=VIDEO)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert len(result["nodes"]) == 2, result["nodes"]  # one actor per node, both encoded
    assert sum(result["nodes"].values()) == 42 and result["rows"] == 42 and len(result["errors"]) == 1
    assert result["segments"] == 5  # the video's segments were decoded apart and spread with the photos
    paths, feats = _sorted(out)
    assert paths == local_table[0]
    np.testing.assert_allclose(feats, local_table[1], atol=1e-5, rtol=1e-5)


def test_a_killed_actor_loses_nothing_and_a_rerun_computes_nothing(tmp_path, photo_dir, local_table):
    out = tmp_path / "ray.parquet"
    job = EncodeJob(model="cifar-vit", cache="none", batch=1, threads=1)
    killed: list[int] = []

    def kill_after_first_batch(done: int, total: int) -> None:
        if done >= 2 and not killed:
            pids = _node_pids("_EncoderActor")
            assert pids, "no encoder actor process found"
            os.kill(pids[0], signal.SIGKILL)  # what the OOM killer does; Ray must restart and retry
            killed.append(pids[0])

    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=False)
    try:
        config = RayConfig(actors=2, show_progress=False)
        result = run_bulk(
            job, [photo_dir], out=out, engine="ray", ray=config, progress=kill_after_first_batch
        )
        assert killed
        assert result["rows"] == 12 and result["encoded"] >= 12 - result["duplicates_dropped"]
        paths, feats = _sorted(out)
        photos = _photos(local_table)
        assert paths == photos[0]  # each input exactly once
        np.testing.assert_allclose(feats, photos[1], atol=1e-5, rtol=1e-5)
        again = run_bulk(job, [photo_dir], out=out, engine="ray", ray=config)
    finally:
        ray.shutdown()
    assert again["encoded"] == 0 and again["skipped"] == 12 and again["rows"] == 12


def test_cli_ray_engine_starts_and_stops_its_own_cluster(tmp_path, photo_dir, local_table):
    out = tmp_path / "cli.parquet"
    args = ["encode", "cifar-vit", str(photo_dir), "--engine", "ray", "--out", str(out), "--cache", "none"]
    res = runner.invoke(app, [*args, "--threads", "1", "--batch", "4", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout.strip().splitlines()[-1])
    assert report["encoded"] == 12 and report["out"] == str(out) and report["engine"] == "ray"
    assert [e["reason"] for e in report["errors"]] == [
        f"{photo_dir / 'broken.jpg'} is not an image file PIL can read"
    ]
    assert not ray.is_initialized()
    assert _sorted(out)[0] == _photos(local_table)[0]


def test_too_many_actors_for_the_cluster_is_refused(tmp_path, photo_dir):
    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address=LOOPBACK, log_to_driver=False)
    try:
        with pytest.raises(ValueError, match="need 4 CPUs; the cluster has 1"):
            run_bulk(
                EncodeJob(model="cifar-vit", cache="none", threads=2),
                [photo_dir],
                out=tmp_path / "f.parquet",
                engine="ray",
                ray=RayConfig(actors=2, show_progress=False),
            )
    finally:
        ray.shutdown()
