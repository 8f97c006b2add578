"""vitedge.encode and the encode / cache CLI commands, on vit4mnist and DeiT-Ti with real images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import vitedge
from vitedge.cache import CacheConfig, FeatureCache
from vitedge.cli import app
from vitedge.models import load
from vitedge.paths import data_root

runner = CliRunner()


def digits(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (28, 28), dtype=np.uint8) for _ in range(n)]


def test_encode_hits_match_misses_and_the_model() -> None:
    enc = load("vit4mnist")
    cache = FeatureCache(CacheConfig(tiers=("memory",)))
    images = digits(5)
    first = vitedge.encode(images, enc, cache=cache)
    assert first.shape == (5, 17, 64)
    assert cache.stats["memory"].misses == 5
    second = vitedge.encode(images, enc, cache=cache)
    assert cache.stats["memory"].hits == 5
    assert torch.equal(first, second)
    plain = vitedge.encode(images, enc, cache=None)
    assert torch.allclose(first, plain, atol=2e-3 * plain.abs().max().item())


def test_weights_change_never_hits_old_entries() -> None:
    enc = load("vit4mnist")
    cache = FeatureCache(CacheConfig(tiers=("memory",)))
    images = digits(3)
    old = vitedge.encode(images, enc, cache=cache)
    with torch.no_grad():
        enc.blocks[0].mlp[0].weight.mul_(1.5) if isinstance(enc.blocks[0].mlp, torch.nn.Sequential) else next(
            enc.blocks[0].mlp.parameters()
        ).mul_(1.5)
    new = vitedge.encode(images, enc, cache=cache)
    assert cache.stats["memory"].hits == 0
    assert not torch.allclose(old, new)
    assert torch.allclose(new, vitedge.encode(images, enc, cache=None), atol=1e-2)


def test_preprocessing_and_configs_change_the_namespace() -> None:
    from vitedge.cache.keys import Namespace

    a = load("timm:deit_tiny_patch16_224")
    base = Namespace.of(a)
    vitedge.optimize_(a, vitedge.Bf16Config())
    assert Namespace.of(a).digest != base.digest
    b = load("timm:deit_tiny_patch16_224", img_size=160)
    assert Namespace.of(b).digest != base.digest


def test_every_field_and_the_algorithm_version_are_in_the_namespace(monkeypatch: pytest.MonkeyPatch) -> None:
    """A default that changes, or an algorithm that changes under the same config, moves the namespace: a
    persistent tier can never serve features of the old algorithm."""
    import dataclasses

    from vitedge.api import technique
    from vitedge.cache.keys import Namespace
    from vitedge.tokens.merge import MergeConfig

    model = vitedge.optimize_(load("vit4mnist"), MergeConfig(r=1))
    entry = json.loads(Namespace.of(model).configs[0])
    assert entry == {
        "name": "merge",
        "params": dataclasses.asdict(MergeConfig(r=1)),  # defaults included
        "version": technique(MergeConfig()).version,
    }
    before = Namespace.of(model).digest
    # the same -O string after a default changed: keep_norm's default flips, the namespace follows
    flipped = dataclasses.replace(model.applied[0], keep_norm=not MergeConfig().keep_norm)
    monkeypatch.setattr(model, "applied", [flipped])
    assert Namespace.of(model).digest != before
    # the same config after an algorithm change (a version bump)
    monkeypatch.setattr(model, "applied", [MergeConfig(r=1)])
    assert Namespace.of(model).digest == before
    from vitedge import api

    bumped = dataclasses.replace(technique(MergeConfig()), version=technique(MergeConfig()).version + 1)
    monkeypatch.setitem(api._BY_TYPE, MergeConfig, bumped)
    assert Namespace.of(model).digest != before


def test_encode_rejects_bad_input() -> None:
    enc = load("vit4mnist")
    with pytest.raises(ValueError, match="unknown cache tier 'tape'"):
        vitedge.encode(digits(1), enc, cache="memory,tape")
    with pytest.raises(ValueError, match="uint8"):
        vitedge.encode(torch.zeros(1, 28, 28), enc, cache=None)


def test_cli_encode_then_served_from_cache(tmp_path: Path) -> None:
    src = data_root() / "imagenet-sample"
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in sorted(src.iterdir())[:4]:
        (folder / p.name).symlink_to(p)
    args = ["encode", "timm:deit_tiny_patch16_224", str(folder), "--cache", "memory,disk"]
    args += ["--cache-dir", str(tmp_path / "c"), "--json"]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    out1 = json.loads(first.stdout)
    assert out1["images"] == 4 and out1["misses"] == 4 and out1["hit_rate"] == 0.0
    second = json.loads(runner.invoke(app, args).stdout)
    assert second["hit_rate"] == 1.0 and second["tiers"]["disk"]["hits"] == 4
    assert second["time_saved_s"] >= 0 and second["shape"] == [197, 192]

    admin = ["--cache", "disk", "--cache-dir", str(tmp_path / "c"), "--json"]
    stats = json.loads(runner.invoke(app, ["cache", "stats", *admin]).stdout)
    assert stats["tiers"]["disk"]["entries"] >= 4
    assert stats["namespaces"][0]["model_id"] == "timm:deit_tiny_patch16_224"
    inv = runner.invoke(app, ["cache", "invalidate", "--model", "timm:deit_tiny_patch16_224", *admin])
    assert json.loads(inv.stdout)["entries_dropped"]["disk"] == 4
    third = json.loads(runner.invoke(app, args).stdout)
    assert third["hit_rate"] == 0.0


def _png_bomb(path: Path, side: int) -> None:
    """A tiny PNG whose header claims ``side`` x ``side`` pixels (the classic decompression bomb shape)."""
    import struct
    import zlib

    from PIL import Image

    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = 8 + 8  # signature, then length + type of IHDR
    data[ihdr : ihdr + 8] = struct.pack(">II", side, side)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13])) & 0xFFFFFFFF
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))


def test_encode_reports_bad_files_and_encodes_the_rest(tmp_path: Path) -> None:
    """A bomb, a truncated JPEG and a text file among real photos: every good photo is encoded, each bad file
    is reported with its reason, and the command exits 0 (every file was handled)."""
    src = sorted((data_root() / "imagenet-sample").iterdir())[:3]
    folder = tmp_path / "imgs"
    folder.mkdir()
    for p in src:
        (folder / p.name).symlink_to(p)
    _png_bomb(folder / "bomb.png", 30_000)
    (folder / "cut.jpg").write_bytes(src[0].read_bytes()[:2000])
    (folder / "notes.jpg").write_text("not an image")
    args = ["encode", "vit4mnist", str(folder), "--cache", "memory", "--json"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["images"] == 6 and out["encoded"] == 3 and out["misses"] == 3
    reasons = {Path(e["path"]).name: e["reason"] for e in out["errors"]}
    assert set(reasons) == {"bomb.png", "cut.jpg", "notes.jpg"}
    assert "over the limit of" in reasons["bomb.png"] and "900000000 pixels" in reasons["bomb.png"]
    assert "corrupt or truncated" in reasons["cut.jpg"] and "not an image" in reasons["notes.jpg"]
    small = runner.invoke(app, [*args, "--max-pixels", "1000"])  # every photo is now over the limit
    assert small.exit_code == 0 and json.loads(small.stdout)["encoded"] == 0
    _png_bomb(folder / "bomb.png", 9_000)  # 81 Mpx: under PIL's own limits, over vitedge's 64 Mpx
    again = json.loads(runner.invoke(app, args).stdout)
    bomb = next(e["reason"] for e in again["errors"] if e["path"].endswith("bomb.png"))
    assert "9000x9000 = 81000000 pixels, over the limit of 67108864" in bomb


def test_encode_takes_an_optimisation_stack(tmp_path: Path) -> None:
    src = sorted((data_root() / "imagenet-sample").iterdir())[:2]
    args = ["encode", "vit4mnist", str(src[0].parent), "--limit", "2", "--cache", "memory", "--json"]
    plain = json.loads(runner.invoke(app, args).stdout)
    merged = json.loads(runner.invoke(app, [*args, "-O", "merge:r=2"]).stdout)
    assert merged["name"] == "merge:r=2" and merged["namespace"] != plain["namespace"]
    assert merged["shape"][0] < plain["shape"][0]  # fewer tokens leave the merged encoder
    with pytest.raises(ValueError, match="corrupt or truncated"):  # the Python API raises by default
        cut = tmp_path / "cut.jpg"
        cut.write_bytes(src[0].read_bytes()[:2000])
        vitedge.encode([cut], load("vit4mnist"), cache=None)


def test_cli_errors_are_one_line(tmp_path: Path) -> None:
    res = runner.invoke(app, ["encode", "vit4mnist", str(tmp_path), "--cache", "memory,ssd"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["cache", "stats", "--cache", "memory"])
    assert res.exit_code == 2 and "memory tier" in res.output
