"""The project's own trained CIFAR-10 models (``cifar-resnet``, ``cifar-vit``, ``cifar-swin``).

Their weights are produced by ``vitedge train`` and committed beside this module under ``weights/`` as
safetensors with a JSON model card.
"""

from __future__ import annotations

from pathlib import Path

from vitedge.models.base import Encoder

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_project_model(name: str, *, img_size: int | None = None) -> Encoder:
    path = WEIGHTS_DIR / f"{name}.safetensors"
    if not path.is_file():
        raise ValueError(
            f"{name} has no trained weights yet ({path} is missing); train it with 'vitedge train {name}'"
        )
    raise ValueError(f"{name}: loading trained CIFAR-10 models is not available in this version")
