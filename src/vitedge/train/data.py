"""Training data held as decoded uint8 tensors: CIFAR-10 from its tarballs, or an ImageFolder."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitedge.data import Cifar10, ImageFolder, MnistTest
from vitedge.data.images import build_transform, convert_channels
from vitedge.models.base import Preprocess

log = logging.getLogger(__name__)

_EVAL_FOLDERS = ("val", "test")


@dataclass(frozen=True)
class TrainData:
    """Decoded images ``(N, C, H, W)`` uint8 with int64 labels; the test part may be empty."""

    name: str
    classes: list[str]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor

    def to(self, device: torch.device) -> TrainData:
        return TrainData(
            name=self.name,
            classes=self.classes,
            train_images=self.train_images.to(device),
            train_labels=self.train_labels.to(device),
            test_images=self.test_images.to(device),
            test_labels=self.test_labels.to(device),
        )


def spread_subset(n: int, limit: int | None) -> np.ndarray:
    """``limit`` indices spread evenly over ``range(n)`` (class-sorted data keeps every class), or all."""
    if limit is None or limit >= n:
        return np.arange(n)
    return (np.arange(limit, dtype=np.int64) * n) // limit


def _from_arrays(
    images: np.ndarray, labels: np.ndarray, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    idx = spread_subset(len(images), limit)
    x = torch.from_numpy(np.ascontiguousarray(images[idx].transpose(0, 3, 1, 2)))  # (N, C, H, W)
    return x, torch.from_numpy(labels[idx].astype(np.int64))


def _read_folder(
    root: Path, pre: Preprocess, limit: int | None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    folder = ImageFolder(root)
    transform = build_transform(pre)
    idx = spread_subset(len(folder), limit)
    xs, ys = [], []
    for i in idx:
        x, y = folder[int(i)]  # uint8 (C, H, W)
        xs.append(transform.resize(convert_channels(x, pre.in_chans)))
        ys.append(y)
    return torch.stack(xs), torch.tensor(ys, dtype=torch.int64), folder.classes


def load_train_data(data: str, pre: Preprocess, *, limit: int | None, eval_limit: int | None) -> TrainData:
    """Decode the training and test images once, at the model's input size.

    Args:
        data: ``cifar10``, ``mnist`` (the shipped test digits: the first 5,000 train, the other 5,000
            evaluate; for models trained elsewhere, such as vit4mnist's exit heads) or a folder: with
            ``train/`` and ``val/`` (or ``test/``) sub-folders those are the splits; otherwise the whole
            folder trains and there is no test split.
        pre: the model's preprocessing (input size and channels for folders; CIFAR-10 is 32x32 RGB).
        limit: keep this many training images, spread evenly over the (class-sorted) set.
        eval_limit: likewise for the test split.

    Raises:
        ValueError: an unknown name or a folder with no images; FileNotFoundError: missing data.
    """
    if data == "mnist":  # only the 10,000 test digits ship: the first half trains, the second evaluates
        if pre.img_size != (28, 28) or pre.in_chans != 1:
            raise ValueError(f"mnist is 28x28 greyscale; the model expects {pre.in_chans}x{pre.img_size}")
        digits = MnistTest()
        half = len(digits.images) // 2
        x, y = _from_arrays(digits.images[:half], digits.labels[:half], limit)
        tx, ty = _from_arrays(digits.images[half:], digits.labels[half:], eval_limit)
        return TrainData("mnist", digits.classes, x, y, tx, ty)
    if data == "cifar10":
        train, test = Cifar10("train"), Cifar10("test")
        if pre.img_size != train.images.shape[1:3] or pre.in_chans != 3:
            raise ValueError(f"cifar10 is 32x32 RGB; the model expects {pre.in_chans}x{pre.img_size}")
        x, y = _from_arrays(train.images, train.labels, limit)
        tx, ty = _from_arrays(test.images, test.labels, eval_limit)
        return TrainData("cifar10", train.classes, x, y, tx, ty)
    root = Path(data).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"unknown training data {data!r}: use cifar10 or an existing folder of <class>/<image> files"
        )
    splits = [root / name for name in _EVAL_FOLDERS if (root / name).is_dir()]
    if (root / "train").is_dir() and splits:
        x, y, classes = _read_folder(root / "train", pre, limit)
        tx, ty, test_classes = _read_folder(splits[0], pre, eval_limit)
        if test_classes != classes:
            raise ValueError(f"{splits[0]} has classes {test_classes}, but {root / 'train'} has {classes}")
    else:
        x, y, classes = _read_folder(root, pre, limit)
        tx = torch.empty((0, *x.shape[1:]), dtype=torch.uint8)
        ty = torch.empty(0, dtype=torch.int64)
        log.info("%s has no train/ and val/ sub-folders: training on all of it, no evaluation", root)
    return TrainData(str(root), classes, x, y, tx, ty)


def data_classes(data: str) -> int:
    """Number of classes of ``data`` without decoding any image (for building the classifier)."""
    if data in ("cifar10", "mnist"):
        return 10
    root = Path(data).expanduser()
    if not root.is_dir():
        raise ValueError(
            f"unknown training data {data!r}: use cifar10 or an existing folder of <class>/<image> files"
        )
    has_splits = (root / "train").is_dir() and any((root / name).is_dir() for name in _EVAL_FOLDERS)
    return len(ImageFolder(root / "train" if has_splits else root).classes)


def data_img_size(data: str) -> int | None:
    """The input size training data fixes (32 for CIFAR-10), or None to use the model's own."""
    return 32 if data == "cifar10" else None
