"""The JSON model card written beside trained weights."""

from __future__ import annotations

import datetime
import json
import logging
import platform
import re
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from vitedge.models.base import Encoder
from vitedge.models.project import portable_state_dict
from vitedge.train.config import TrainConfig
from vitedge.train.runtime import inner_network

log = logging.getLogger(__name__)

CIFAR10_NOTE = "CIFAR-10 as JPEG quality 75 tarballs: 50,000 training and 10,000 test images, 32x32"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _versions() -> dict[str, str]:
    import timm

    from vitedge import __version__

    return {
        "vitedge": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }


def architecture(enc: Encoder) -> dict[str, Any]:
    from vitedge.models.cifar import PROJECT_ARCHS

    arch = PROJECT_ARCHS.get(enc.model_id)
    described: dict[str, Any] = dict(arch) if arch is not None else {"model_id": enc.model_id}
    described["family"] = enc.info.family
    described["params"] = sum(p.numel() for p in enc.parameters())
    try:
        described["macs_per_image"] = enc.arch().macs
    except Exception as e:  # the card must not cost a finished run; the cost model is a nicety here
        log.warning("no MAC count for %s: %s", enc.model_id, e)
        described["macs_per_image"] = None
    return described


def model_card(
    *,
    config: TrainConfig,
    enc: Encoder,
    accuracy: dict[str, Any],
    run: dict[str, Any],
    weights: Path,
    command: str | None,
) -> dict[str, Any]:
    """Everything needed to judge and reproduce a trained model.

    Args:
        config: the run's configuration (the recipe).
        enc: the trained model.
        accuracy: ``top1``, ``top5``, ``n`` on the test split (fp32 forward).
        run: ``epochs_requested``, ``epochs_run``, ``budget`` refits, ``history``, ``seconds``, ``device``,
            ``train_images``, ``test_images``.
        weights: the written safetensors file.
        command: the command line that reproduces the run.
    """
    data: dict[str, Any] = {
        "name": config.data,
        "train_images": run["train_images"],
        "test_images": run["test_images"],
    }
    if config.data == "cifar10":
        data["note"] = CIFAR10_NOTE
    return {
        "model": enc.model_id,
        "architecture": architecture(enc),
        "preprocess": enc.preprocess.to_json(),
        "weights": {"file": weights.name, "bytes": weights.stat().st_size, "dtype": "float32"},
        "data": data,
        "accuracy": accuracy,
        "recipe": config.to_json(),
        "training": {k: run[k] for k in ("epochs_requested", "epochs_run", "budget", "seconds", "device")},
        "history": run["history"],
        "versions": _versions(),
        "command": command or " ".join(["python", *sys.argv]),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def write_model(
    out: Path,
    *,
    config: TrainConfig,
    enc: Encoder,
    accuracy: dict[str, Any],
    run: dict[str, Any],
    command: str | None,
) -> tuple[Path, dict[str, Any]]:
    """Write the final weights ``out/<model>.safetensors`` and the card ``out/<model>.json`` (see
    :func:`model_card` for the arguments); returns the weights path and the card."""
    inner = inner_network(enc)
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", config.model)
    weights = out / f"{name}.safetensors"
    save_file(portable_state_dict(inner), str(weights), metadata={"model": config.model})
    card = model_card(config=config, enc=enc, accuracy=accuracy, run=run, weights=weights, command=command)
    (out / f"{name}.json").write_text(json.dumps(card, indent=2, default=float) + "\n")
    return weights, card


def write_trained_model(
    out: Path,
    config: TrainConfig,
    enc: Encoder,
    accuracy: dict[str, Any],
    *,
    prior: list[dict[str, Any]] | None = None,
) -> Path:
    """Write a run trained with ``-O`` options as a model directory (``vitedge eval out``): the base id,
    the options (after ``prior``, those an ``--init`` directory already carried), and the trained weights of
    the optimised model, loaded over its shapes on reload."""
    from vitedge import __version__
    from vitedge.api import config_from_dict, config_to_dict, describe
    from vitedge.models.saved import write_optimized
    from vitedge.train.config import trainable_options

    configs = list(prior or []) + [config_to_dict(c) for c in trainable_options(config.optimize)]
    names = [describe(config_from_dict(c)) for c in prior or []] + list(config.optimize)
    write_optimized(
        out,
        enc,
        manifest={
            "vitedge_version": __version__,
            "base": config.model,
            "configs": configs,
            "name": " ".join(names),
            "weights_after": len(configs),
            # The saved weights carry the whole model: reload builds this skeleton, not the installed base.
            "num_classes": enc.info.num_classes,
            "img_size": enc.img_size[0],
            "trained": {"init": config.init, "top1": accuracy.get("top1"), "n": accuracy.get("n")},
        },
    )
    return out
