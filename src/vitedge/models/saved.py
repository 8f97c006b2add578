"""Reload a directory written by ``vitedge optimize --out DIR``: the base model, its exact weights, and the
technique stack re-applied in order (``DIR/vitedge.json``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from safetensors.torch import load_model

from vitedge.models.base import Encoder, ModelInfo


def load_optimized(path: Path, manifest: dict[str, Any]) -> Encoder:
    from vitedge.api import config_from_dict, optimize_
    from vitedge.models import load

    if manifest.get("format") != 1 or "base" not in manifest:
        raise ValueError(f"{path}/vitedge.json is not a vitedge optimised-model manifest (format 1)")
    enc = load(manifest["base"], img_size=manifest.get("img_size"))
    weights = path / "base.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the directory is incomplete")
    load_model(enc, str(weights), strict=True)
    configs = [config_from_dict(c) for c in manifest.get("configs", [])]
    optimize_(enc, *configs)
    enc.info = ModelInfo(**{**enc.info.__dict__, "model_id": str(path)})
    return enc.eval()
