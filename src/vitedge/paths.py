"""Where vitedge finds its data and keeps its caches."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def data_root() -> Path:
    """The data root: ``$VITEDGE_DATA`` or ``../shared/data`` beside the project root.

    Raises:
        FileNotFoundError: the directory does not exist (the message names it and the variable).
    """
    env = os.environ.get("VITEDGE_DATA")
    root = Path(env).expanduser() if env else (PROJECT_ROOT / ".." / "shared" / "data").resolve()
    if not root.is_dir():
        raise FileNotFoundError(
            f"data root {root} does not exist; set VITEDGE_DATA to the folder holding mnist/, cifar10/, "
            "imagenet-sample/, video/ and vit4mnist/"
        )
    return root


def cache_dir() -> Path:
    """A writable folder for derived, re-creatable files (decoded datasets); ``$VITEDGE_CACHE`` overrides."""
    env = os.environ.get("VITEDGE_CACHE")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "vitedge"
    path.mkdir(parents=True, exist_ok=True)
    return path
