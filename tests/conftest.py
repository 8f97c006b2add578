"""Shared fixtures: the supported model ids, built once per session; real redis-server processes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from redis_support import redis_procs, redis_server  # noqa: F401  (fixtures for every folder)
from support import SUPPORTED_IDS, load_cached

os.environ.setdefault(
    "VITEDGE_DATA", str((Path(__file__).resolve().parents[1] / ".." / "shared" / "data").resolve())
)
torch.set_num_threads(2)


@pytest.fixture(params=SUPPORTED_IDS)
def any_model(request):
    return load_cached(request.param)
