"""Datasets over the real shared data: MNIST, CIFAR-10, the ImageNet sample, and image folders."""

from __future__ import annotations

import io
import shutil
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import Subset

from vitedge.data import (
    Cifar10,
    ImageFolder,
    ImageNetSample,
    MnistTest,
    as_tensor_batches,
    open_dataset,
)
from vitedge.models.base import Preprocess
from vitedge.paths import data_root

MNIST_PRE = Preprocess(img_size=(28, 28), in_chans=1, mean=(0.1307,), std=(0.3081,))
CIFAR_PRE = Preprocess(img_size=(32, 32), mean=(0.4914, 0.4822, 0.4465), std=(0.247, 0.243, 0.261))
IMAGENET_PRE = Preprocess(img_size=(224, 224), resize=256)
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
# The published class counts of the 10,000 MNIST test digits.
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module", autouse=True)
def cold_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh dataset cache for this module, so CIFAR-10 is decoded cold and ~/.cache is left alone."""
    folder = tmp_path_factory.mktemp("vitedge-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VITEDGE_CACHE", str(folder))
        yield folder


@pytest.fixture(scope="module")
def mnist() -> MnistTest:
    return MnistTest()


@pytest.fixture(scope="module")
def cifar_test() -> Cifar10:
    return Cifar10("test")


# --- MNIST ----------------------------------------------------------------------------------------


def test_mnist_test_set(mnist: MnistTest) -> None:
    assert len(mnist) == 10_000
    assert mnist.images.shape == (10_000, 28, 28, 1)
    assert mnist.classes == [str(d) for d in range(10)]
    counts = np.bincount(mnist.labels, minlength=10)
    assert counts.sum() == 10_000 and len(counts) == 10
    assert counts.tolist() == MNIST_TEST_COUNTS
    assert mnist[0][1] == 7  # the well-known first test digit


def test_mnist_items_pass_through_exactly() -> None:
    ds = open_dataset("mnist", MNIST_PRE)
    x, label = ds[0]
    raw = torch.from_numpy(MnistTest(limit=1).images[0, :, :, 0])
    assert x.shape == (1, 28, 28) and label == 7
    assert torch.equal(x[0], (raw.float() / 255 - 0.1307) / 0.3081)


def test_mnist_batches_fast_and_equal_to_items() -> None:
    ds = open_dataset("mnist", MNIST_PRE)
    start = time.perf_counter()
    batches = list(as_tensor_batches(ds, 1000))
    elapsed = time.perf_counter() - start
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    assert x.shape == (10_000, 1, 28, 28) and y.dtype == torch.int64
    assert elapsed < 15, f"10,000 MNIST digits took {elapsed:.1f} s on the batched path"
    for i in (0, 1, 4_321, 9_999):
        xi, yi = ds[i]
        assert torch.equal(x[i], xi) and int(y[i]) == yi


def test_subset_takes_the_batched_path(mnist: MnistTest) -> None:
    mnist_t = open_dataset("mnist", MNIST_PRE)
    sub = Subset(mnist_t, [5, 3, 9])
    (x, y), *rest = list(as_tensor_batches(sub, 8))
    assert not rest
    assert y.tolist() == [int(mnist.labels[i]) for i in (5, 3, 9)]
    assert torch.equal(x[1], mnist_t[3][0])


# --- CIFAR-10 ------------------------------------------------------------------------------------


def test_cifar10_test_split(cifar_test: Cifar10, cold_cache: Path) -> None:
    assert len(cifar_test) == 10_000
    assert cifar_test.classes == CIFAR_CLASSES
    assert np.bincount(cifar_test.labels).tolist() == [1_000] * 10
    assert np.all(np.diff(cifar_test.labels) >= 0)  # class-sorted order
    x, label = open_dataset("cifar10", CIFAR_PRE, limit=3)[0]
    assert x.shape == (3, 32, 32) and label == 0
    # The first image is test/airplane/0000.jpg, decoded exactly as PIL does.
    with tarfile.open(data_root() / "cifar10" / "test.tar.gz", "r:gz") as tar:
        f = tar.extractfile("test/airplane/0000.jpg")
        assert f is not None
        first = np.asarray(Image.open(io.BytesIO(f.read())).convert("RGB"))
    np.testing.assert_array_equal(cifar_test.images[0], first)
    assert (cold_cache / "datasets").is_dir()
    again = Cifar10("test")  # from the .npy cache now
    np.testing.assert_array_equal(again.images, cifar_test.images)
    np.testing.assert_array_equal(again.labels, cifar_test.labels)


def test_cifar10_batches_equal_items(cifar_test: Cifar10) -> None:
    ds = open_dataset("cifar10", IMAGENET_PRE, limit=6)  # 32 -> 256 -> crop 224 on both paths
    (x, _), *_ = as_tensor_batches(ds, 6)
    assert x.shape == (6, 3, 224, 224)
    for i in range(6):
        assert torch.equal(x[i], ds[i][0])


@pytest.mark.slow
def test_cifar10_train_split() -> None:
    start = time.perf_counter()
    train = Cifar10("train")
    elapsed = time.perf_counter() - start
    assert len(train) == 50_000
    assert train.classes == CIFAR_CLASSES
    assert np.bincount(train.labels).tolist() == [5_000] * 10
    assert elapsed < 60, f"decoding CIFAR-10 train took {elapsed:.1f} s"


def test_cifar10_bad_split() -> None:
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'val'"):
        Cifar10("val")


# --- ImageNet sample and folders -----------------------------------------------------------------


def test_imagenet_sample_labels_follow_sorted_files() -> None:
    ds = ImageNetSample()
    files = sorted((data_root() / "imagenet-sample").glob("*.jpg"))
    assert len(ds) == len(files) == 1_000
    for n in (0, 1, 500, 999):
        assert ds.samples[n] == (files[n], n)
    assert ds.wnids[0] == "n01440764" and ds.classes[0] == "tench"
    assert ds.classes[2] == "great white shark"
    assert len(ds.classes) == 1_000


def test_imagenet_sample_transform_and_limit() -> None:
    ds = open_dataset("imagenet-sample", IMAGENET_PRE, limit=3)
    assert len(ds) == 3
    assert len(ds.classes) == 1_000
    x, label = ds[2]
    assert x.shape == (3, 224, 224) and label == 2
    (xb, yb), *_ = as_tensor_batches(ds, 4)
    assert xb.shape == (3, 3, 224, 224) and yb.tolist() == [0, 1, 2]
    assert torch.equal(xb[2], x)


def test_image_folder(tmp_path: Path) -> None:
    sample = sorted((data_root() / "imagenet-sample").glob("*.jpg"))
    (tmp_path / "fish").mkdir()
    (tmp_path / "birds" / "nested").mkdir(parents=True)
    (tmp_path / "empty").mkdir()
    (tmp_path / ".hidden").mkdir()
    shutil.copy(sample[0], tmp_path / "fish" / "b.jpg")
    shutil.copy(sample[1], tmp_path / "fish" / "a.JPEG")
    Image.open(sample[10]).save(tmp_path / "birds" / "nested" / "finch.png")
    shutil.copy(sample[11], tmp_path / ".hidden" / "x.jpg")
    (tmp_path / "fish" / "notes.txt").write_text("not an image")

    ds = open_dataset(str(tmp_path), Preprocess(img_size=(64, 64), resize=72))
    assert isinstance(ds, ImageFolder)
    assert ds.classes == ["birds", "fish"]
    assert [(p.name, label) for p, label in ds.samples] == [("finch.png", 0), ("a.JPEG", 1), ("b.jpg", 1)]
    x, label = ds[1]
    assert x.shape == (3, 64, 64) and label == 1
    assert len(open_dataset(tmp_path, MNIST_PRE, limit=2)) == 2
    assert open_dataset(tmp_path, MNIST_PRE)[0][0].shape == (1, 28, 28)


def test_image_folder_without_classes(tmp_path: Path) -> None:
    (tmp_path / "loose.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="has no class folders with images"):
        ImageFolder(tmp_path)


# --- open_dataset errors --------------------------------------------------------------------------


def test_unknown_dataset_name_lists_the_choices() -> None:
    with pytest.raises(ValueError, match=r"unknown dataset 'imagenet'.*mnist, cifar10, imagenet-sample"):
        open_dataset("imagenet", IMAGENET_PRE)


def test_bad_split_and_limit() -> None:
    with pytest.raises(ValueError, match="dataset 'mnist' has no split 'train'"):
        open_dataset("mnist", MNIST_PRE, split="train")
    with pytest.raises(ValueError, match="limit must be a positive integer or None, got 0"):
        open_dataset("mnist", MNIST_PRE, limit=0)


def test_limit_takes_the_first_items() -> None:
    head = open_dataset("mnist", MNIST_PRE, limit=5)
    full = open_dataset("mnist", MNIST_PRE)
    assert len(head) == 5
    for i in range(5):
        assert torch.equal(head[i][0], full[i][0]) and head[i][1] == full[i][1]


def test_missing_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VITEDGE_DATA", str(tmp_path / "no-such-root"))
    with pytest.raises(FileNotFoundError, match=r"no-such-root does not exist; set VITEDGE_DATA"):
        open_dataset("mnist", MNIST_PRE)


def test_missing_dataset_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "mnist").mkdir()
    monkeypatch.setenv("VITEDGE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"t10k-images-idx3-ubyte\.gz does not exist"):
        open_dataset("mnist", MNIST_PRE)


def test_cifar_limit_spreads_over_every_class() -> None:
    """CIFAR-10 is stored class by class: a limited subset must still hold every class equally."""
    ds = open_dataset("cifar10", CIFAR_PRE, limit=500)
    counts = np.bincount(ds.labels, minlength=10)
    assert len(ds) == 500 and counts.min() == counts.max() == 50
