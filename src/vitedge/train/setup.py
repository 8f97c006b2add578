"""Building a training run: the resume check, stochastic depth, continuing from a model directory, the
teacher, and freezing all but a named part (:mod:`vitedge.train.loop` calls these once per run)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from vitedge.models import Encoder, load
from vitedge.train.checkpoint import Checkpoint, has_checkpoint, load_checkpoint
from vitedge.train.config import SESSION_FIELDS, TrainConfig
from vitedge.train.runtime import to_device


def check_resume(cfg: TrainConfig, resume: bool) -> Checkpoint | None:
    """The checkpoint in ``cfg.out`` to continue from (``resume``), or None for a fresh run.

    Raises:
        ValueError: a fresh run into a folder that holds one, a resumed run whose configuration differs
            (session fields apart), or a run that has already finished.
    """
    out = Path(cfg.out)
    if not resume:
        if has_checkpoint(out):
            raise ValueError(f"{out} already holds a training run; resume it or choose another out folder")
        return None
    ckpt = load_checkpoint(out)
    saved = TrainConfig.from_json(ckpt.state["config"])
    differ = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.name not in SESSION_FIELDS and getattr(saved, f.name) != getattr(cfg, f.name)
    ]
    if differ:
        raise ValueError(f"resuming {out} with a different configuration: {', '.join(differ)} changed")
    if ckpt.state.get("status") == "done":
        raise ValueError(f"the run in {out} has already finished")
    return ckpt


def with_drop_path(cfg: TrainConfig, enc: Encoder) -> Encoder:
    """The project model rebuilt with ``cfg.drop_path`` (seeded, so init stays a function of the seed)."""
    from vitedge.models.cifar import PROJECT_ARCHS, build_project_model

    if cfg.model not in PROJECT_ARCHS:
        raise ValueError(f"drop_path applies to the project models, not {cfg.model}")
    torch.manual_seed(cfg.seed)
    return build_project_model(cfg.model, num_classes=enc.info.num_classes, drop_path=cfg.drop_path)


def from_directory(cfg: TrainConfig, fresh: Encoder, folder: Path) -> tuple[Encoder, list[dict[str, Any]]]:
    """Continue from a model directory (``OUT/model`` of an earlier run with ``-O``): its optimised model
    with its trained weights; returns it and the configs it already carries."""
    from vitedge.models.saved import MANIFEST

    if not (folder / MANIFEST).is_file():
        raise ValueError(f"--init {folder} is a folder without {MANIFEST}; pass weights or a model directory")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("base") != cfg.model:
        raise ValueError(f"--init {folder} holds a {manifest.get('base')} model, not {cfg.model}")
    configs = list(manifest.get("configs", []))
    if manifest.get("weights_after", 0) != len(configs):
        raise ValueError(
            f"--init {folder} re-applies part of its stack after loading (an optimize --out directory); "
            "continue only from a directory a training run wrote"
        )
    if cfg.drop_path is not None:
        raise ValueError("--drop-path rebuilds the model; it cannot continue from a model directory")
    enc = load(str(folder))
    if enc.info.num_classes != fresh.info.num_classes:
        raise ValueError(
            f"--init {folder} has {enc.info.num_classes} classes, the data {fresh.info.num_classes}"
        )
    return enc.train(), configs


def load_teacher(cfg: TrainConfig, num_classes: int, device: torch.device) -> Encoder | None:
    """The frozen teacher on ``device`` (channels-last for CNNs on CUDA), or None without distillation."""
    if cfg.distill is None:
        return None
    teacher = load(cfg.distill.teacher).eval().requires_grad_(False)
    if teacher.info.num_classes != num_classes:
        raise ValueError(
            f"teacher {teacher.model_id} has {teacher.info.num_classes} classes, the student {num_classes}"
        )
    cl = device.type == "cuda" and teacher.info.family == "cnn"
    return to_device(teacher, device, channels_last=cl)


Named = list[tuple[str, torch.nn.Parameter]]


def train_only(named: Named, prefix: str) -> Named:
    """The parameters named ``prefix...``; every other one is frozen (requires_grad off).

    Raises:
        ValueError: no parameter name starts with ``prefix``.
    """
    chosen = [(n, p) for n, p in named if n.startswith(prefix)]
    if not chosen:
        tops = sorted({n.split(".")[0] for n, _ in named})
        raise ValueError(
            f"--train-only {prefix!r} matches no parameter; names start with {', '.join(tops)} "
            "(token_scorers exist under -O prune:...,scorer=learned)"
        )
    keep = {id(p) for _, p in chosen}
    for _, p in named:
        p.requires_grad_(id(p) in keep)
    return chosen
