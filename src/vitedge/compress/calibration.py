"""Calibration images for techniques that measure a model before changing it (mixed precision, block removal).

Deterministic given the data, so a saved optimised model re-applies to the same result: ``vit4mnist`` uses the
first 1,000 MNIST test digits (accuracy is then also reported on the other 9,000, ``top1_holdout``); the
CIFAR models use CIFAR-10 training images (spread evenly, so all classes appear); any other model gets
fixed-seed random inputs, which is what models with random weights deserve.
"""

from __future__ import annotations

import numpy as np
import torch

from vitedge.models.base import Encoder

MNIST_CALIBRATION = 1000  # the first 1,000 MNIST test digits; the other 9,000 are held out


def calibration_batches(enc: Encoder, *, images: int = 256, batch: int = 64) -> list[torch.Tensor]:
    """Up to ``images`` calibration inputs for ``enc``, in batches of ``batch``: x (B, C, H, W)."""
    if images < 1 or batch < 1:
        raise ValueError(f"images and batch must be >= 1, got {images} and {batch}")
    from vitedge.data import open_dataset

    model_id = enc.model_id
    if model_id == "vit4mnist":
        ds = open_dataset("mnist", enc.preprocess, limit=MNIST_CALIBRATION)
        idx = np.arange(min(images, MNIST_CALIBRATION))
    elif model_id.startswith("cifar-"):
        ds = open_dataset("cifar10", enc.preprocess, split="train")
        idx = np.linspace(0, len(ds) - 1, num=min(images, len(ds))).round().astype(np.int64)
    else:
        n = min(images, 2 * batch)  # random inputs carry no information worth more compute
        return [enc.example_input(min(batch, n - s)) for s in range(0, n, batch)]
    return [x for x, _ in ds.batches(batch, indices=idx.tolist())]  # type: ignore[union-attr]
