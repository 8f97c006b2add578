"""Directories written by ``vitedge optimize --out DIR`` or by a training run with ``-O`` options: the base
model id, weights, and the technique stack (``DIR/vitedge.json``).

``weights_after`` = k says the weights file holds the model *after* the first k configs were applied (a
structured-pruned model fine-tuned to recover accuracy): loading applies those k configs to the base model for
its shapes, loads the weights over them, then applies the rest. Without it (k = 0) the weights are the
unmodified base model's and the whole stack is re-applied.

A technique whose config names a file (``exit``'s heads) keeps the directory self-contained: its config's
``bundle(model, out)`` copies the file in and returns the config the manifest stores (a relative name, the
values resolved from the file fixed), and ``located(root)`` resolves that name when the directory loads.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from vitedge.models.base import Encoder, ModelInfo

MANIFEST = "vitedge.json"
WEIGHTS = "base.safetensors"


def check_writable(out: Path) -> None:
    """Refuse to write a model directory over a non-empty folder that is not one.

    Raises:
        ValueError: ``out`` exists, is not empty and holds no vitedge manifest.
    """
    if out.exists() and any(out.iterdir()) and not (out / MANIFEST).is_file():
        raise ValueError(f"{out} exists and is not a vitedge model directory; choose an empty or new folder")


def bundle_configs(model: Encoder, out: Path) -> list[dict[str, Any]]:
    """``model``'s applied configs as a manifest in ``out`` stores them (files they read copied in)."""
    from vitedge.api import config_to_dict

    bundle = [c.bundle(model, out) if hasattr(c, "bundle") else c for c in model.applied]
    return [config_to_dict(c) for c in bundle]


def write_optimized(
    out: Path,
    enc: Encoder,
    *,
    manifest: dict[str, Any],
    configs_from: Encoder | None = None,
) -> None:
    """Write ``enc``'s weights and ``manifest`` (``base``, ``configs``, ``name``, ...; ``format`` is added);
    with ``configs_from``, the manifest's configs are that model's, bundled (:func:`bundle_configs`).

    Raises:
        ValueError: ``out`` exists, is not empty and is not a vitedge model directory.
    """
    check_writable(out)
    out.mkdir(parents=True, exist_ok=True)
    if configs_from is not None:
        manifest = {**manifest, "configs": bundle_configs(configs_from, out)}
    save_model(enc, str(out / WEIGHTS))
    (out / MANIFEST).write_text(json.dumps({"format": 1, **manifest}, indent=2) + "\n")


def save(encoder: Encoder, out: str | Path) -> Path:
    """Write ``encoder`` (optimised or not) as a model directory that ``vitedge.load(out)`` reloads with the
    same weights and the same ``-O`` stack.

    The weights are saved as they are now (``weights_after`` = every applied option), so fine-tuned or
    wrapped models keep theirs. Reloading rebuilds the skeleton from the base id (``timm:<name>`` with the
    classifier resized, a project id, ``vit4mnist``, ``hf:...``) and re-applies the stack before loading the
    weights, so a stack whose layer shapes depend on calibration data (``mixed``) or a Hugging Face module
    whose config is not its id's default may not fit; loading then says so.

    Raises:
        ValueError: ``out`` exists, is not empty and holds no vitedge model directory.
    """
    from vitedge import __version__
    from vitedge.api import config_to_dict, describe
    from vitedge.models import parse_model_id

    out = Path(out)
    base = str(encoder.info.extra.get("base", encoder.model_id))
    source, _ = parse_model_id(base)
    manifest: dict[str, Any] = {
        "vitedge_version": __version__,
        "base": base,
        "img_size": encoder.img_size[0] if source == "timm" else None,
        "configs": [config_to_dict(c) for c in encoder.applied],
        "weights_after": len(encoder.applied),
        "name": " ".join(describe(c) for c in encoder.applied) or "baseline",
    }
    if source in ("timm", "project"):  # the skeleton is built with this classifier width
        manifest["num_classes"] = encoder.info.num_classes
    write_optimized(out, encoder, manifest=manifest, configs_from=encoder)
    return out


def load_optimized(path: Path, manifest: dict[str, Any]) -> Encoder:
    from vitedge.api import config_from_dict, optimize_
    from vitedge.models import load

    if manifest.get("format") != 1 or "base" not in manifest:
        raise ValueError(f"{path}/{MANIFEST} is not a vitedge optimised-model manifest (format 1)")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing; the directory is incomplete")
    configs = [config_from_dict(c) for c in manifest.get("configs", [])]
    configs = [c.located(path) if hasattr(c, "located") else c for c in configs]
    k = manifest.get("weights_after", 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= len(configs):
        raise ValueError(
            f"{path}/{MANIFEST}: weights_after must be an integer in [0, {len(configs)}], got {k!r}"
        )
    if "num_classes" in manifest:  # a trained directory: its weights replace everything, build the skeleton
        from vitedge.models import build_untrained

        with torch.random.fork_rng():
            torch.manual_seed(0)
            enc = build_untrained(
                manifest["base"], num_classes=manifest["num_classes"], img_size=manifest["img_size"]
            )
        enc.eval()
    else:
        enc = load(manifest["base"], img_size=manifest.get("img_size"))
    optimize_(enc, *configs[:k])
    try:
        load_model(enc, str(weights), strict=True)
    except RuntimeError as e:
        raise ValueError(
            f"{weights} does not fit the model {path}/{MANIFEST} describes: {str(e)[:300]}"
        ) from None
    optimize_(enc, *configs[k:])
    extra = {**enc.info.extra, "base": manifest["base"]}
    enc.info = ModelInfo(**{**enc.info.__dict__, "model_id": str(path), "extra": extra})
    return enc.eval()
