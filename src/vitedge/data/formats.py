"""Readers for the on-disk formats of the shared data: gzip IDX (MNIST) and tarballs of JPEGs (CIFAR-10).

They return plain numpy arrays (uint8 images ``(N, H, W, C)``, int64 labels) and know nothing of torch.
Decoding a tarball of JPEGs is slow enough to be worth caching: :func:`read_jpeg_tar_cached` keeps the
decoded arrays as ``.npy`` files under :func:`vitedge.paths.cache_dir`.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np

from vitedge.data.images import decode_image_bytes
from vitedge.paths import cache_dir

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "LabelledArrays", "read_idx", "read_jpeg_tar_cached"]

log = logging.getLogger(__name__)

IDX_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dimension
_CACHE_FORMAT = 1  # bump when the cached layout changes

ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class LabelledArrays:
    """Decoded images ``(N, H, W, C)`` uint8, labels ``(N,)`` int64 and the class names labels index."""

    images: np.ndarray
    labels: np.ndarray
    classes: list[str]


def read_idx(path: str | Path, *, magic: int) -> np.ndarray:
    """Read a (possibly gzipped) IDX file of unsigned bytes, as in the MNIST distribution.

    Args:
        path: the ``.gz`` or raw IDX file.
        magic: the expected magic number, :data:`IDX_IMAGES_MAGIC` or :data:`IDX_LABELS_MAGIC`.

    Returns:
        A uint8 array shaped as the header says, e.g. ``(10000, 28, 28)`` or ``(10000,)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is not gzip/IDX, has another magic number, or its size disagrees with its header.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path} is not a readable gzip file: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"{path} is too short ({len(raw)} bytes) to be an IDX file")
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise ValueError(f"{path} has IDX magic number {found}, expected {magic}")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path} is truncated inside its IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = header + int(np.prod(shape, dtype=np.int64))
    if len(raw) != expected:
        raise ValueError(f"{path} holds {len(raw)} bytes, but its IDX header {shape} needs {expected}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()


def _decode_jpeg_tar(tar_path: Path, split: str, progress: ProgressFn | None) -> LabelledArrays:
    """Stream ``tar_path`` (members ``<split>/<class>/<name>.jpg``) and decode every image, no extraction."""
    decoded: dict[tuple[str, str], np.ndarray] = {}
    total = _count_files(tar_path) if progress is not None else 0
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                parts = PurePosixPath(member.name).parts
                if len(parts) != 3 or parts[0] != split:
                    raise ValueError(
                        f"{tar_path} has member {member.name!r}; expected {split}/<class>/<image> entries"
                    )
                f = tar.extractfile(member)
                assert f is not None  # regular files always have a stream
                decoded[(parts[1], parts[2])] = _decode_member(f.read(), tar_path, member.name)
                if progress is not None:
                    progress(len(decoded), total)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{tar_path} is not a readable tar archive: {e}") from e
    if not decoded:
        raise ValueError(f"{tar_path} holds no {split}/<class>/<image> files")
    keys = sorted(decoded)
    shapes = {decoded[k].shape for k in keys}
    if len(shapes) != 1:
        raise ValueError(f"{tar_path} mixes image sizes {sorted(shapes)}; expected one size")
    classes = sorted({cls for cls, _ in keys})
    index = {cls: i for i, cls in enumerate(classes)}
    images = np.stack([decoded[k] for k in keys])
    labels = np.array([index[cls] for cls, _ in keys], dtype=np.int64)
    return LabelledArrays(images=images, labels=labels, classes=classes)


def _count_files(tar_path: Path) -> int:
    """Number of regular files in the tarball: one cheap streaming pass that decodes no images."""
    try:
        with tarfile.open(tar_path, mode="r|*") as tar:
            return sum(1 for member in tar if member.isfile())
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise ValueError(f"{tar_path} is not a readable tar archive: {e}") from e


def _decode_member(data: bytes, tar_path: Path, name: str) -> np.ndarray:
    image = decode_image_bytes(data, name=f"{name} in {tar_path}")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)  # (H, W, 3)


def _cache_key(path: Path) -> str:
    st = path.stat()
    return f"{path.name.replace('.', '_')}-{st.st_size}-{st.st_mtime_ns}-v{_CACHE_FORMAT}"


def _load_cached(folder: Path) -> LabelledArrays | None:
    try:
        images = np.load(folder / "images.npy", allow_pickle=False)
        labels = np.load(folder / "labels.npy", allow_pickle=False)
        classes = json.loads((folder / "classes.json").read_text())
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable dataset cache %s: %s", folder, e)
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != (len(images),):
        log.warning("ignoring malformed dataset cache %s", folder)
        return None
    return LabelledArrays(images=images, labels=labels.astype(np.int64, copy=False), classes=list(classes))


def _store_cached(folder: Path, arrays: LabelledArrays) -> None:
    """Write the cache into a temporary folder, then rename it into place in one atomic step."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-", dir=folder.parent))
    try:
        np.save(tmp / "images.npy", arrays.images, allow_pickle=False)
        np.save(tmp / "labels.npy", arrays.labels, allow_pickle=False)
        (tmp / "classes.json").write_text(json.dumps(arrays.classes))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():  # another process finishing first is fine; anything else is not
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def read_jpeg_tar_cached(
    tar_path: str | Path, split: str, *, use_cache: bool = True, progress: ProgressFn | None = None
) -> LabelledArrays:
    """Decode a tarball of ``<split>/<class>/<name>.jpg`` files, caching the arrays as ``.npy``.

    Members are ordered by (class, file name); classes are the sorted folder names.
    The cache lives in ``cache_dir()/datasets/<key>``, the key made of the tarball's name, size and
    modification time, so replacing the tarball invalidates it. A cache that cannot be written is logged
    and skipped.

    Args:
        tar_path: the ``.tar.gz`` (any compression ``tarfile`` reads).
        split: the top-level folder inside the tarball, e.g. ``"test"``.
        use_cache: read and write the ``.npy`` cache.
        progress: called as ``progress(done, total)`` after each decoded image (``total`` comes from a
            quick first pass over the tarball). Not called on a cache hit.

    Raises:
        FileNotFoundError: the tarball does not exist.
        ValueError: it is not a tar archive, has unexpected members, or holds an unreadable image.
    """
    tar_path = Path(tar_path)
    if not tar_path.is_file():
        raise FileNotFoundError(f"dataset archive {tar_path} does not exist")
    folder: Path | None = None
    if use_cache:
        try:
            folder = cache_dir() / "datasets" / f"{split}-{_cache_key(tar_path)}"
        except OSError as e:
            log.warning("dataset cache unavailable, decoding without it: %s", e)
        if folder is not None and folder.is_dir():
            cached = _load_cached(folder)
            if cached is not None:
                log.debug("loaded %s from cache %s", tar_path, folder)
                return cached
    log.info("decoding %s (cached after the first time)", tar_path)
    arrays = _decode_jpeg_tar(tar_path, split, progress)
    if folder is not None:
        try:
            if folder.is_dir():  # a stale or malformed cache from before
                shutil.rmtree(folder)
            _store_cached(folder, arrays)
        except OSError as e:
            log.warning("could not write dataset cache %s: %s", folder, e)
    return arrays
