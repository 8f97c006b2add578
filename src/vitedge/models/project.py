"""The project's own trained CIFAR-10 models (``cifar-resnet``, ``cifar-vit``, ``cifar-swin``).

Their weights are produced by ``vitedge train MODEL --install`` and committed beside this module under
``weights/`` as ``<name>.safetensors`` with a ``<name>.json`` model card (architecture, recipe, accuracy and
the command that reproduces them). The architectures live in :mod:`vitedge.models.cifar`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from vitedge.models.base import Encoder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Buffers computed from the architecture (Swin's relative position index and shift masks): not saved, and
# tolerated when a timm version saves them, so weights move between timm versions.
DERIVED_BUFFERS = ("relative_position_index", "attn_mask")

log = logging.getLogger(__name__)


def weights_dir() -> Path:
    """The project models' weights folder: ``$VITEDGE_WEIGHTS`` if set (scratch runs), else ``weights/``."""
    env = os.environ.get("VITEDGE_WEIGHTS")
    return Path(env).expanduser() if env else WEIGHTS_DIR


def weights_path(name: str) -> Path:
    return weights_dir() / f"{name}.safetensors"


def read_model_card(name: str) -> dict[str, Any]:
    """The JSON model card beside the weights, or an empty dict when there is none (or it is unreadable)."""
    path = weights_dir() / f"{name}.json"
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        log.debug("no readable model card %s: %s", path, e)
        return {}
    return card if isinstance(card, dict) else {}


def portable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict to save as weights: contiguous CPU tensors without :data:`DERIVED_BUFFERS`."""
    return {
        k: v.detach().to("cpu").contiguous()
        for k, v in module.state_dict().items()
        if not k.endswith(DERIVED_BUFFERS)
    }


def load_project_model(name: str, *, img_size: int | None = None) -> Encoder:
    """Build ``name`` from :mod:`vitedge.models.cifar` and load its committed weights (eval mode).

    Raises:
        ValueError: the weights are missing (the message names the command that trains them), do not fit,
            or ``img_size`` is not 32.
    """
    from vitedge.models.cifar import CIFAR_IMG_SIZE, build_project_model
    from vitedge.models.timm_models import load_weights

    if img_size not in (None, CIFAR_IMG_SIZE):
        raise ValueError(f"{name} takes 32x32 images only, got img_size={img_size}")
    path = weights_path(name)
    if not path.is_file():
        raise ValueError(
            f"{name} has no trained weights yet ({path} is missing); train it with "
            f"'vitedge train {name} --data cifar10 --install'"
        )
    enc = build_project_model(name)
    load_weights(cast(nn.Module, enc.model), path, derived=DERIVED_BUFFERS)
    card = read_model_card(name)
    extra = {**enc.info.extra, "weights": str(path)}
    if "accuracy" in card:
        extra["card_accuracy"] = card["accuracy"]
    enc.info = dataclasses.replace(enc.info, trained=True, extra=extra)
    return enc.eval()
