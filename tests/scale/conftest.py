"""A small folder of real photos (ImageNet sample) with one file that is not an image."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from vitedge.paths import data_root


@pytest.fixture(scope="session")
def photo_dir(tmp_path_factory) -> Path:
    """12 ImageNet photos and ``broken.jpg`` (text bytes)."""
    folder = tmp_path_factory.mktemp("photos")
    for src in sorted((data_root() / "imagenet-sample").glob("*.jpg"))[:12]:
        shutil.copy(src, folder / src.name)
    (folder / "broken.jpg").write_bytes(b"this is not a JPEG")
    return folder
