"""Model ids -> Encoder. The only package that knows concrete model classes.

Ids (``../shared/CONTRACT.md``): ``vit4mnist``; ``cifar-resnet``, ``cifar-vit``, ``cifar-swin`` (the project's
trained CIFAR-10 models); ``timm:<name>``; ``hf:vit``, ``hf:clip-vision``, ``hf:siglip-vision``, ``hf:<dir>``;
and a directory written by ``vitedge optimize --out DIR``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from vitedge.models.base import AttentionView, BlockView, Encoder, ModelInfo, Preprocess, TokenLayout
from vitedge.models.spec import ArchSpec, AttnOp, LayerSpec, LinearOp

__all__ = [
    "ArchSpec",
    "AttentionView",
    "AttnOp",
    "BlockView",
    "Encoder",
    "LayerSpec",
    "LinearOp",
    "ModelInfo",
    "Preprocess",
    "TokenLayout",
    "build_untrained",
    "bundled_part",
    "load",
    "parse_model_id",
]

PROJECT_MODELS = ("cifar-resnet", "cifar-vit", "cifar-swin")
OPTIMIZED_MANIFEST = "vitedge.json"


def parse_model_id(model_id: str) -> tuple[str, str]:
    """Split an id into (source, name); raise ValueError for anything that is not a model id."""
    if not isinstance(model_id, str) or not model_id.strip():
        raise ValueError(
            "model id must be a non-empty string such as 'vit4mnist' or 'timm:deit_tiny_patch16_224'"
        )
    if model_id == "vit4mnist":
        return "vit4mnist", ""
    if model_id in PROJECT_MODELS:
        return "project", model_id
    for prefix in ("timm:", "hf:"):
        if model_id.startswith(prefix):
            name = model_id[len(prefix) :]
            if not name:
                raise ValueError(f"model id {model_id!r} lacks a name after {prefix!r}")
            return prefix[:-1], name
    if (Path(model_id) / OPTIMIZED_MANIFEST).is_file():
        return "optimized", model_id
    raise ValueError(
        f"unknown model id {model_id!r}; use vit4mnist, cifar-resnet, cifar-vit, cifar-swin, timm:<name>, "
        "hf:vit, hf:clip-vision, hf:siglip-vision, hf:<dir>, or a directory written by 'vitedge optimize'"
    )


def bundled_part(model_id: str, part: str) -> Path | None:
    """A trained part shipped beside a project model's weights (``cifar-vit.exits.safetensors`` for
    ``("cifar-vit", "exits")``), or None where the model has none."""
    if model_id not in (*PROJECT_MODELS, "vit4mnist"):
        return None
    from vitedge.models.project import weights_dir

    path = weights_dir() / f"{model_id}.{part}.safetensors"
    return path if path.is_file() else None


@contextlib.contextmanager
def _seeded(seed: int = 0) -> Iterator[None]:
    """Random weights drawn from a fixed seed, leaving the caller's RNG untouched: the same id gives the same
    model in every process (stable weights digest, cache namespace and benchmark inputs)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


def load(model_id: str, *, weights: str | Path | None = None, img_size: int | None = None) -> Encoder:
    """Build the encoder named by ``model_id`` in eval mode.

    Args:
        model_id: see the module docstring.
        weights: a local ``.safetensors`` file for ``timm:`` models (and an override for ``vit4mnist``).
        img_size: build the model for this square input size instead of its configured one.

    Raises:
        ValueError: unknown id, unsupported architecture, or weights that do not fit.
        FileNotFoundError: weights or data root missing.
    """
    if img_size is not None and (not isinstance(img_size, int) or img_size < 1):
        raise ValueError(f"img_size must be a positive integer, got {img_size!r}")
    source, name = parse_model_id(model_id)
    if source == "vit4mnist":
        from vitedge.models.vit4mnist import load_vit4mnist

        if img_size not in (None, 28):
            raise ValueError(f"vit4mnist takes 28x28 digits only, got img_size={img_size}")
        return load_vit4mnist(weights)
    if source == "timm":
        from vitedge.models.timm_models import create_timm

        with _seeded():
            return create_timm(name, weights=weights, img_size=img_size)
    if source == "hf":
        from vitedge.models.hf_models import create_hf

        if weights is not None:
            raise ValueError("--weights applies to timm: models; pass a local directory as hf:<dir> instead")
        if img_size is not None:
            raise ValueError("img_size is fixed by the Hugging Face config for hf: models")
        with _seeded():
            return create_hf(name)
    if source == "project":
        from vitedge.models.project import load_project_model

        return load_project_model(name, img_size=img_size)
    from vitedge.models.saved import load_optimized

    manifest = json.loads((Path(name) / OPTIMIZED_MANIFEST).read_text())
    return load_optimized(Path(name), manifest)


def build_untrained(model_id: str, *, num_classes: int, img_size: int | None = None) -> Encoder:
    """A randomly initialised model to train, in train mode: a project id (``cifar-resnet``, ``cifar-vit``,
    ``cifar-swin``) or ``timm:<name>`` with its classifier resized to ``num_classes``.

    Raises:
        ValueError: any other id, or an ``img_size`` the model cannot take.
    """
    source, name = parse_model_id(model_id)
    if source == "project":
        from vitedge.models.cifar import CIFAR_IMG_SIZE, build_project_model

        if img_size not in (None, CIFAR_IMG_SIZE):
            raise ValueError(f"{model_id} takes 32x32 images; got data of size {img_size}")
        return build_project_model(name, num_classes=num_classes).train()
    if source == "timm":
        import dataclasses
        from typing import Any, cast

        from vitedge.models.timm_models import create_timm

        enc = create_timm(name, img_size=img_size)
        cast(Any, enc).model.reset_classifier(num_classes)
        enc.info = dataclasses.replace(enc.info, num_classes=num_classes)
        return enc.train()
    raise ValueError(f"training takes cifar-resnet, cifar-vit, cifar-swin or timm:<name>, got {model_id!r}")
