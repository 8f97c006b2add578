"""Datasets over the shared data and user folders, and the fast batched path for evaluation.

Two kinds of dataset:

* In memory (:class:`ArrayDataset`: :class:`MnistTest`, :class:`Cifar10`): every image is decoded once into
  one uint8 array ``(N, H, W, C)``. :func:`as_tensor_batches` slices that array and transforms whole batches
  with torch ops (no per-item PIL round trip); 10,000 images take well under a second at 28 or 32 px.
* On disk (:class:`ImageFolder`, :class:`ImageNetSample`): photos are decoded lazily, one per item.
  :func:`as_tensor_batches` falls back to transforming item by item and stacking.

Items are ``(image, label)``: the transformed float tensor ``(C, H, W)`` when the dataset has a transform,
otherwise the stored uint8 tensor ``(C, H, W)``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from vitedge.data.formats import (
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    ProgressFn,
    read_idx,
    read_jpeg_tar_cached,
)
from vitedge.data.images import IMAGE_EXTENSIONS, build_transform, read_image, to_uint8_tensor
from vitedge.models.base import Preprocess
from vitedge.paths import data_root

__all__ = [
    "DATASET_NAMES",
    "ArrayDataset",
    "Cifar10",
    "FileDataset",
    "ImageFolder",
    "ImageNetSample",
    "MnistTest",
    "Transform",
    "as_tensor_batches",
    "open_dataset",
]

log = logging.getLogger(__name__)

Transform = Callable[[Image.Image | np.ndarray], torch.Tensor]
DATASET_NAMES: tuple[str, ...] = ("mnist", "cifar10", "imagenet-sample")
IMAGENET_CLASSES = 1000
_WNID_FILE = re.compile(r"^(n\d{8})_(.+)\.jpe?g$", re.IGNORECASE)


def _check_limit(limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}")


class ArrayDataset(Dataset[tuple[torch.Tensor, int]]):
    """Images held in memory as one uint8 array.

    Args:
        images: uint8 ``(N, H, W, C)`` with C of 1 or 3 (RGB).
        labels: integer class indices ``(N,)``.
        classes: class names; ``labels`` index into them.
        transform: applied to each uint8 ``(H, W, C)`` image; None returns uint8 tensors ``(C, H, W)``.
        limit: keep only the first ``limit`` images.
    """

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        classes: Sequence[str],
        *,
        transform: Transform | None = None,
        limit: int | None = None,
    ) -> None:
        _check_limit(limit)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] not in (1, 3):
            raise ValueError(
                f"images must be uint8 (N, H, W, C) with C 1 or 3, got {images.dtype} {images.shape}"
            )
        if labels.shape != (len(images),):
            raise ValueError(f"labels must have shape ({len(images)},), got {labels.shape}")
        self.images = images[:limit]
        self.labels = labels[:limit].astype(np.int64, copy=False)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        image = self.images[index]  # (H, W, C)
        x = self.transform(image) if self.transform is not None else to_uint8_tensor(image)
        return x, int(self.labels[index])

    def batches(
        self, batch_size: int, indices: Sequence[int] | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Yield ``(x, y)`` batches transformed as whole tensors: x ``(B, C, H, W)``, y int64 ``(B,)``.

        Uses the transform's ``batch`` method when it has one (as :class:`~vitedge.data.images.ImageTransform`
        does); any other transform is applied per item. Without a transform, x is the stored uint8.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        order = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        batch_fn = getattr(self.transform, "batch", None)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            y = torch.from_numpy(self.labels[idx])
            if self.transform is not None and batch_fn is None:
                yield torch.stack([self.transform(self.images[i]) for i in idx]), y
                continue
            # (B, H, W, C) -> (B, C, H, W); fancy indexing already copied, so no aliasing of the cache.
            x = torch.from_numpy(self.images[idx]).permute(0, 3, 1, 2)
            yield (batch_fn(x) if batch_fn is not None else x.contiguous()), y


class MnistTest(ArrayDataset):
    """The 10,000 MNIST test digits, ``(28, 28, 1)`` uint8, from ``<root>/mnist/t10k-*-ubyte.gz``.

    Args:
        root: the data root; default :func:`vitedge.paths.data_root`.
        transform: see :class:`ArrayDataset`.
        limit: keep only the first ``limit`` digits.
    """

    def __init__(
        self, root: str | Path | None = None, *, transform: Transform | None = None, limit: int | None = None
    ) -> None:
        folder = (Path(root) if root is not None else data_root()) / "mnist"
        images = read_idx(folder / "t10k-images-idx3-ubyte.gz", magic=IDX_IMAGES_MAGIC)  # (N, 28, 28)
        labels = read_idx(folder / "t10k-labels-idx1-ubyte.gz", magic=IDX_LABELS_MAGIC)  # (N,)
        if len(images) != len(labels):
            raise ValueError(f"{folder} holds {len(images)} MNIST images but {len(labels)} labels")
        if labels.size and labels.max() > 9:
            raise ValueError(f"{folder} has MNIST label {labels.max()}, expected 0..9")
        classes = [str(d) for d in range(10)]
        super().__init__(images[:, :, :, None], labels, classes, transform=transform, limit=limit)


class Cifar10(ArrayDataset):
    """CIFAR-10 from ``<root>/cifar10/{split}.tar.gz`` (JPEGs, ``(32, 32, 3)``), decoded once and cached.

    Images are ordered by (class, file name); classes are alphabetical (airplane ... truck). The decoded
    arrays are cached as ``.npy`` under :func:`vitedge.paths.cache_dir` (see
    :func:`~vitedge.data.formats.read_jpeg_tar_cached`); a cold decode of the 50,000 training images takes
    several seconds.

    Args:
        split: ``"train"`` (50,000 images) or ``"test"`` (10,000).
        root: the data root; default :func:`vitedge.paths.data_root`.
        transform: see :class:`ArrayDataset`.
        limit: keep ``limit`` images evenly spaced over the class-sorted set (every class equally
            represented; the first ``limit`` would be the first classes only).
        progress: ``progress(done, total)`` while decoding on a cache miss.
        use_cache: read and write the ``.npy`` cache.
    """

    SPLITS = ("train", "test")

    def __init__(
        self,
        split: str = "test",
        root: str | Path | None = None,
        *,
        transform: Transform | None = None,
        limit: int | None = None,
        progress: ProgressFn | None = None,
        use_cache: bool = True,
    ) -> None:
        if split not in self.SPLITS:
            raise ValueError(f"CIFAR-10 split must be 'train' or 'test', got {split!r}")
        _check_limit(limit)
        tar_path = (Path(root) if root is not None else data_root()) / "cifar10" / f"{split}.tar.gz"
        arrays = read_jpeg_tar_cached(tar_path, split, use_cache=use_cache, progress=progress)
        self.split = split
        images, labels = arrays.images, arrays.labels
        if limit is not None and limit < len(labels):
            idx = np.linspace(0, len(labels) - 1, limit).round().astype(np.int64)
            images, labels = images[idx], labels[idx]
        super().__init__(images, labels, arrays.classes, transform=transform)


class FileDataset(Dataset[tuple[torch.Tensor, int]]):
    """Image files decoded lazily, one per item (large photos stay on disk until needed).

    Args:
        samples: ``(path, label)`` pairs in item order.
        classes: class names; labels index into them.
        transform: applied to each decoded PIL image; None returns uint8 tensors ``(C, H, W)``.
    """

    def __init__(
        self,
        samples: Sequence[tuple[Path, int]],
        classes: Sequence[str],
        *,
        transform: Transform | None = None,
    ) -> None:
        self.samples = list(samples)
        self.classes = list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        image = read_image(path)
        return (self.transform(image) if self.transform is not None else to_uint8_tensor(image)), label


class ImageFolder(FileDataset):
    """Images under ``root/<class>/**/*.{jpg,jpeg,png,bmp,webp}``.

    Classes are the sorted names of the sub-folders holding at least one image (hidden folders skipped);
    files are sorted by path within each class.

    Args:
        root: the folder of class folders.
        transform: applied to each decoded PIL image; None returns uint8 tensors ``(C, H, W)``.
        limit: keep only the first ``limit`` files (of the class-sorted order).

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no class folder with images.
    """

    def __init__(
        self, root: str | Path, *, transform: Transform | None = None, limit: int | None = None
    ) -> None:
        _check_limit(limit)
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder {self.root} does not exist")
        found: dict[str, list[Path]] = {}
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(
                p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if files:
                found[folder.name] = files
        if not found:
            raise ValueError(
                f"{self.root} has no class folders with images; expected {self.root}/<class>/<image> files "
                f"with extensions {', '.join(IMAGE_EXTENSIONS)}"
            )
        classes = sorted(found)
        samples = [(path, label) for label, cls in enumerate(classes) for path in found[cls]]
        super().__init__(samples[:limit], classes, transform=transform)


class ImageNetSample(FileDataset):
    """One photo per ImageNet-1k class, ``<root>/imagenet-sample/<wnid>_<name>.jpg``; the n-th sorted file is
    class n.

    ``classes`` holds the 1,000 names from the file names (underscores read as spaces; ImageNet itself
    repeats the names "crane" and "maillot"); ``wnids`` the WordNet ids. ``limit`` does not shorten them.

    Args:
        root: the data root; default :func:`vitedge.paths.data_root`.
        transform: applied to each decoded PIL image; None returns uint8 tensors ``(C, H, W)``.
        limit: keep only the first ``limit`` photos (classes 0 .. limit-1).

    Raises:
        FileNotFoundError: the folder is missing.
        ValueError: it does not hold exactly 1,000 ``<wnid>_<name>.jpg`` files.
    """

    def __init__(
        self, root: str | Path | None = None, *, transform: Transform | None = None, limit: int | None = None
    ) -> None:
        _check_limit(limit)
        self.root = (Path(root) if root is not None else data_root()) / "imagenet-sample"
        if not self.root.is_dir():
            raise FileNotFoundError(f"ImageNet sample folder {self.root} does not exist")
        files = sorted(p for p in self.root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        matches = [_WNID_FILE.match(p.name) for p in files]
        bad = [p.name for p, m in zip(files, matches, strict=True) if m is None]
        if bad:
            raise ValueError(f"{self.root} has files not named <wnid>_<name>.jpg, e.g. {bad[0]!r}")
        if len(files) != IMAGENET_CLASSES:
            raise ValueError(
                f"{self.root} holds {len(files)} photos; labels come from the sorted position, so all "
                f"{IMAGENET_CLASSES} (one per class) are needed"
            )
        self.wnids = [m.group(1) for m in matches if m is not None]
        classes = [m.group(2).replace("_", " ") for m in matches if m is not None]
        samples = [(path, label) for label, path in enumerate(files)]
        super().__init__(samples[:limit], classes, transform=transform)


def open_dataset(
    name_or_dir: str | Path, pre: Preprocess, *, split: str = "test", limit: int | None = None
) -> ArrayDataset | FileDataset:
    """Open a dataset by its ``--data`` name or folder, with items transformed for a model.

    Args:
        name_or_dir: ``"mnist"`` (the 10,000 test digits), ``"cifar10"``, ``"imagenet-sample"`` (1,000
            photos), or a folder read as :class:`ImageFolder`. The names win over a same-named folder in
            the working directory; write ``./mnist`` for the folder.
        pre: the model's preprocessing; each item is ``(build_transform(pre)(image), label)``.
        split: ``"test"``; CIFAR-10 also has ``"train"``. Ignored for a folder.
        limit: keep only the first ``limit`` items (deterministic order).

    Returns:
        A sized dataset with ``classes``: an :class:`ArrayDataset` (mnist, cifar10; fast batches through
        :func:`as_tensor_batches`) or a :class:`FileDataset` (imagenet-sample, folders; decoded per item).

    Raises:
        ValueError: an unknown name, a split the dataset lacks, or a bad ``limit``.
        FileNotFoundError: the data root or a data file is missing.
    """
    _check_limit(limit)
    transform = build_transform(pre)
    name = str(name_or_dir)
    if name in DATASET_NAMES and split not in (("train", "test") if name == "cifar10" else ("test",)):
        allowed = "'train' or 'test'" if name == "cifar10" else "'test'"
        raise ValueError(f"dataset {name!r} has no split {split!r}; use {allowed}")
    if name == "mnist":
        return MnistTest(transform=transform, limit=limit)
    if name == "cifar10":
        return Cifar10(split, transform=transform, limit=limit)
    if name == "imagenet-sample":
        return ImageNetSample(transform=transform, limit=limit)
    if Path(name).expanduser().is_dir():
        return ImageFolder(Path(name).expanduser(), transform=transform, limit=limit)
    raise ValueError(
        f"unknown dataset {name!r}: use one of {', '.join(DATASET_NAMES)} or an existing folder of "
        "<class>/<image> files"
    )


def as_tensor_batches(
    dataset: Dataset[tuple[torch.Tensor, int]], batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, y)`` batches, x ``(B, C, H, W)``, y int64 ``(B,)``, in dataset order.

    An :class:`ArrayDataset` (or a ``Subset`` of one) is transformed a whole batch at a time with torch ops,
    giving the same tensors as indexing item by item, only faster. Any other dataset is read item by item
    and stacked; for parallel decoding of large photos, wrap it in a ``torch.utils.data.DataLoader`` instead.

    Raises:
        ValueError: ``batch_size`` < 1.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if isinstance(dataset, ArrayDataset):
        yield from dataset.batches(batch_size)
        return
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, ArrayDataset):
        yield from dataset.dataset.batches(batch_size, indices=list(dataset.indices))
        return
    xs: list[torch.Tensor] = []
    ys: list[int] = []
    for i in range(len(dataset)):  # type: ignore[arg-type]
        x, y = dataset[i]
        xs.append(x)
        ys.append(y)
        if len(xs) == batch_size:
            yield torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
            xs, ys = [], []
    if xs:
        yield torch.stack(xs), torch.tensor(ys, dtype=torch.int64)
