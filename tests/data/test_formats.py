"""The IDX and JPEG-tarball readers, on the real MNIST files and on small tarballs made from real JPEGs."""

from __future__ import annotations

import gzip
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitedge.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, read_idx, read_jpeg_tar_cached
from vitedge.paths import data_root


@pytest.fixture()
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("VITEDGE_CACHE", str(folder))
    return folder


def _cifar_jpegs(count: int) -> list[bytes]:
    """The first ``count`` real 32x32 JPEGs of the CIFAR-10 test tarball."""
    out: list[bytes] = []
    with tarfile.open(data_root() / "cifar10" / "test.tar.gz", "r|gz") as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                assert f is not None
                out.append(f.read())
                if len(out) == count:
                    break
    return out


def _write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


# --- IDX ------------------------------------------------------------------------------------------


def test_read_idx_real_mnist() -> None:
    folder = data_root() / "mnist"
    images = read_idx(folder / "t10k-images-idx3-ubyte.gz", magic=IDX_IMAGES_MAGIC)
    labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz", magic=IDX_LABELS_MAGIC)
    assert images.shape == (10_000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (10_000,)


def test_read_idx_wrong_magic() -> None:
    labels = data_root() / "mnist" / "t10k-labels-idx1-ubyte.gz"
    with pytest.raises(ValueError, match="magic number 2049, expected 2051"):
        read_idx(labels, magic=IDX_IMAGES_MAGIC)


def test_read_idx_size_mismatch(tmp_path: Path) -> None:
    raw = gzip.decompress((data_root() / "mnist" / "t10k-labels-idx1-ubyte.gz").read_bytes())
    short = tmp_path / "short-idx1-ubyte.gz"
    short.write_bytes(gzip.compress(raw[:-5]))
    with pytest.raises(ValueError, match=r"short-idx1-ubyte\.gz holds 10003 bytes"):
        read_idx(short, magic=IDX_LABELS_MAGIC)


def test_read_idx_not_gzip(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gz"
    bad.write_bytes(b"plain text, not gzip")
    with pytest.raises(ValueError, match=r"bad\.gz is not a readable gzip file"):
        read_idx(bad, magic=IDX_LABELS_MAGIC)


def test_read_idx_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"gone\.gz"):
        read_idx(tmp_path / "gone.gz", magic=IDX_LABELS_MAGIC)


# --- JPEG tarballs ------------------------------------------------------------------------------


def test_tar_order_classes_and_cache(tmp_path: Path, cache: Path) -> None:
    jpegs = _cifar_jpegs(4)
    # Written out of order on purpose: the reader sorts by (class, name).
    tar = _write_tar(
        tmp_path / "mini.tar.gz",
        {"test/zebra/0001.jpg": jpegs[0], "test/ant/0002.jpg": jpegs[1], "test/ant/0000.jpg": jpegs[2],
         "test/zebra/0000.jpg": jpegs[3]},
    )  # fmt: skip
    calls: list[tuple[int, int]] = []
    first = read_jpeg_tar_cached(tar, "test", progress=lambda done, total: calls.append((done, total)))
    assert first.classes == ["ant", "zebra"]
    assert first.images.shape == (4, 32, 32, 3) and first.images.dtype == np.uint8
    assert first.labels.tolist() == [0, 0, 1, 1]
    assert calls[-1] == (4, 4)
    expected_first = np.asarray(Image.open(io.BytesIO(jpegs[2])).convert("RGB"))
    np.testing.assert_array_equal(first.images[0], expected_first)  # test/ant/0000.jpg

    assert len(list((cache / "datasets").iterdir())) == 1
    calls.clear()
    second = read_jpeg_tar_cached(tar, "test", progress=lambda done, total: calls.append((done, total)))
    assert calls == []  # served from the .npy cache
    np.testing.assert_array_equal(second.images, first.images)
    np.testing.assert_array_equal(second.labels, first.labels)
    assert second.classes == first.classes

    # Replacing the tarball (new size/mtime) invalidates the cache.
    _write_tar(tar, {"test/ant/0000.jpg": jpegs[0]})
    os.utime(tar, ns=(1, 1))
    third = read_jpeg_tar_cached(tar, "test")
    assert len(third.images) == 1


def test_tar_without_cache_writes_nothing(tmp_path: Path, cache: Path) -> None:
    tar = _write_tar(tmp_path / "mini.tar.gz", {"test/a/0.jpg": _cifar_jpegs(1)[0]})
    assert len(read_jpeg_tar_cached(tar, "test", use_cache=False).images) == 1
    assert not (cache / "datasets").exists()


def test_tar_unexpected_member(tmp_path: Path, cache: Path) -> None:
    tar = _write_tar(tmp_path / "odd.tar.gz", {"train/cat/0000.jpg": _cifar_jpegs(1)[0]})
    with pytest.raises(ValueError, match=r"member 'train/cat/0000\.jpg'"):
        read_jpeg_tar_cached(tar, "test")


def test_tar_corrupt_member(tmp_path: Path, cache: Path) -> None:
    jpeg = _cifar_jpegs(1)[0]
    tar = _write_tar(tmp_path / "bad.tar.gz", {"test/cat/0000.jpg": jpeg[: len(jpeg) // 3]})
    with pytest.raises(ValueError, match=r"test/cat/0000\.jpg in .*bad\.tar\.gz is corrupt or truncated"):
        read_jpeg_tar_cached(tar, "test")


def test_tar_not_a_tarball(tmp_path: Path, cache: Path) -> None:
    bad = tmp_path / "junk.tar.gz"
    bad.write_bytes(b"\x1f\x8b" + b"junk" * 50)
    with pytest.raises(ValueError, match=r"junk\.tar\.gz is not a readable tar archive"):
        read_jpeg_tar_cached(bad, "test")


def test_tar_missing(tmp_path: Path, cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"absent\.tar\.gz does not exist"):
        read_jpeg_tar_cached(tmp_path / "absent.tar.gz", "test")
