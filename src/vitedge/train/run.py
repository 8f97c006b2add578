"""``vitedge train``: command-line options -> TrainConfig, a rich progress display, installing the weights.

Both front ends use this module: the typer command in :mod:`vitedge.cli` and the dependency-light
``python -m vitedge.train`` (argparse), which the GPU training script runs. Options left out (None) take
:class:`~vitedge.train.config.TrainConfig`'s defaults, so the defaults live in one place.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from vitedge.train.checkpoint import load_checkpoint
from vitedge.train.config import SESSION_FIELDS, TrainConfig, distill_config
from vitedge.train.events import TrainProgress
from vitedge.train.loop import train

# option name (CLI spelling with underscores) -> (TrainConfig field, type, help)
OPTIONS: dict[str, tuple[str, type, str]] = {
    "data": ("data", str, "cifar10, or a folder of <class>/<image> files (train/ + val/ or test/ inside)"),
    "epochs": ("epochs", int, "passes over the training images"),
    "batch": ("batch_size", int, "images per step"),
    "lr": ("lr", float, "peak learning rate"),
    "weight_decay": ("weight_decay", float, "weight decay"),
    "optimizer": ("optimizer", str, "adamw or sgd (Nesterov)"),
    "momentum": ("momentum", float, "SGD momentum"),
    "warmup_epochs": ("warmup_epochs", float, "linear warm-up, then cosine decay"),
    "label_smoothing": ("label_smoothing", float, "label smoothing of the cross-entropy"),
    "augment": ("augment", str, "none, basic (crop+flip), cutout or trivial (crop+flip+TrivialAugment)"),
    "mixup": ("mixup_alpha", float, "mixup Beta alpha (0: off)"),
    "cutmix": ("cutmix_alpha", float, "cutmix Beta alpha (0: off)"),
    "drop_path": ("drop_path", float, "stochastic depth rate (project transformers)"),
    "seed": ("seed", int, "seed of weights, order and augmentation"),
    "limit": ("limit", int, "train on N images spread over the set"),
    "eval_limit": ("eval_limit", int, "evaluate on N test images"),
    "eval_batch": ("eval_batch_size", int, "images per evaluation forward"),
    "device": ("device", str, "auto, cpu or cuda"),
    "max_minutes": ("max_minutes", float, "time budget: fewer epochs (refitted after each) so the run fits"),
    "stop_after_minutes": (
        "stop_after_minutes",
        float,
        "checkpoint and stop after this long; --resume later",
    ),
    "stop_after_steps": ("stop_after_steps", int, "checkpoint and stop after this many steps in total"),
    "checkpoint_every": ("checkpoint_every_steps", int, "also checkpoint every N steps"),
    "log_every": ("log_every_steps", int, "progress every N steps"),
    "out": ("out", str, "run folder (default runs/<model>)"),
    "init": ("init", str, "start from these .safetensors weights (fine-tune) instead of random ones"),
    "train_only": ("train_only", str, "train only parameters named PREFIX... (e.g. token_scorers)"),
}
# -O strings: repeated, so handled apart from OPTIONS (argparse: action="append"; typer: list[str]).
OPTIMIZE_HELP = "apply this -O option before training (structured, merge, prune); repeat to stack"
DISTILL_OPTIONS: dict[str, tuple[type, str]] = {
    "teacher": (str, "distil from this model id (e.g. cifar-resnet)"),
    "temperature": (float, "KD temperature (default 4)"),
    "ce_weight": (float, "weight of the task cross-entropy"),
    "kd_weight": (float, "weight of the soft KD term"),
    "hard_weight": (float, "weight of hard distillation"),
    "feature_weight": (float, "weight of the feature MSE"),
    "attention_weight": (float, "weight of the attention-map MSE"),
}


def default_out(model: str) -> str:
    """``runs/<model>`` with characters unsafe in file names replaced."""
    return str(Path("runs") / re.sub(r"[^A-Za-z0-9_.-]", "-", model))


def config_from_options(model: str, options: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from option values keyed as in :data:`OPTIONS` / :data:`DISTILL_OPTIONS` (plus ``bf16``,
    ``hard_distill``); None values take the defaults.

    Raises:
        ValueError: an unknown option or a bad value (the message names it).
    """
    given = {k: v for k, v in options.items() if v is not None}
    unknown = set(given) - set(OPTIONS) - set(DISTILL_OPTIONS) - {"bf16", "hard_distill", "optimize"}
    if unknown:
        raise ValueError(f"unknown training options {sorted(unknown)}")
    fields: dict[str, Any] = {OPTIONS[k][0]: v for k, v in given.items() if k in OPTIONS}
    if given.get("optimize"):
        fields["optimize"] = tuple(given["optimize"])
    if "bf16" in given:
        fields["bf16"] = bool(given["bf16"])
    fields.setdefault("out", default_out(model))
    weights = {k.removesuffix("_weight"): given.get(k) for k in DISTILL_OPTIONS if k.endswith("_weight")}
    fields["distill"] = distill_config(
        given.get("teacher"),
        hard=bool(given.get("hard_distill", False)),
        temperature=given.get("temperature", 4.0),
        weights=weights,
    )
    return TrainConfig(model=model, **fields)


def resume_config(model: str, out: str, options: dict[str, Any]) -> TrainConfig:
    """The configuration checkpointed in ``out``, with session options (device, stop, logging) replaced."""
    saved = TrainConfig.from_json(load_checkpoint(Path(out)).state["config"])
    if saved.model != model:
        raise ValueError(f"{out} trains {saved.model}, not {model}")
    allowed = {k for k, (f, _, _) in OPTIONS.items() if f in SESSION_FIELDS} | {"out"}
    ignored = sorted(k for k, v in options.items() if v is not None and v is not False and k not in allowed)
    if ignored:
        raise ValueError(
            "--resume continues the saved configuration; only --device, --stop-after-*, --checkpoint-every "
            f"and --log-every apply, not {', '.join('--' + k.replace('_', '-') for k in ignored)}"
        )
    session = {OPTIONS[k][0]: v for k, v in options.items() if v is not None and k in allowed and k != "out"}
    return dataclasses.replace(saved, **session)


def install(model: str, weights: Path, card: Path) -> list[str]:
    """Copy final weights and model card into ``vitedge/models/weights/`` (or ``$VITEDGE_WEIGHTS``) as
    ``<model>.*``, with atomic renames."""
    from vitedge.models import PROJECT_MODELS
    from vitedge.models.project import weights_dir

    if model not in PROJECT_MODELS:
        raise ValueError(f"--install is for the project models {', '.join(PROJECT_MODELS)}, not {model}")
    folder = weights_dir()
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for src, suffix in ((weights, ".safetensors"), (card, ".json")):
        dst = folder / f"{model}{suffix}"
        tmp = dst.with_name(f".{dst.name}.tmp")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
        written.append(str(dst))
    return written


class _Display:
    """Rich progress on stderr: a bar per epoch, and one printed line per finished epoch (kept in logs)."""

    def __init__(self, console: Console, model: str) -> None:
        self.console = console
        self.model = model
        self.bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self.task = self.bar.add_task(model, total=None, stats="")

    def __call__(self, p: TrainProgress) -> None:
        if p.kind == "step":
            stats = f"loss {p.loss:.3f} acc {p.train_acc:.3f} {p.images_per_s:,.0f} img/s ETA {_hms(p.eta_s)}"
            self.bar.update(
                self.task,
                description=f"{self.model} {p.epoch}/{p.epochs}",
                completed=p.step,
                total=p.steps,
                stats=stats,
            )
        elif p.kind == "epoch":
            test = "-" if p.test_top1 is None else f"{p.test_top1:.4f}"
            self.console.print(
                f"{self.model} epoch {p.epoch - 1}/{p.epochs} loss {p.loss:.4f} train_acc {p.train_acc:.4f} "
                f"test_top1 {test} lr {p.lr:.2e} {p.images_per_s or 0:,.0f} img/s {p.epoch_s:.1f} s "
                f"(elapsed {_hms(p.elapsed_s)})",
                highlight=False,
                soft_wrap=True,
            )
        else:
            self.console.print(f"{self.model}: {p.message}", highlight=False, soft_wrap=True)


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_train(
    config: TrainConfig, *, resume: bool, install_weights: bool, console: Console | None, command: str | None
) -> dict[str, Any]:
    """Train (or resume) and return the JSON summary; ``install_weights`` copies a finished project model
    into ``vitedge/models/weights/``."""
    if install_weights and (config.optimize or (config.init and Path(config.init).is_dir())):
        raise ValueError(
            "--install would replace the project weights with an optimised model; use the run's model "
            "directory (OUT/model) instead"
        )
    if install_weights:
        from vitedge.models import PROJECT_MODELS

        if config.model not in PROJECT_MODELS:
            raise ValueError(
                f"--install is for the project models {', '.join(PROJECT_MODELS)}, not {config.model}"
            )
    display = _Display(console, config.model) if console is not None else None
    if display is not None:
        with display.bar:
            result = train(config, resume=resume, progress=display, command=command)
    else:
        result = train(config, resume=resume, command=command)
    out: dict[str, Any] = {
        "model": config.model,
        "status": result.status,
        "top1": result.top1,
        "top5": result.top5,
        "epochs_run": result.epochs_run,
        "epochs_requested": result.epochs_requested,
        "seconds": round(result.seconds, 1),
        "out": str(result.out),
        "weights": str(result.weights) if result.weights else None,
    }
    if result.card is not None:
        out["params"] = result.card["architecture"]["params"]
        out["training"] = result.card["training"]
    if install_weights and result.status == "done" and result.weights is not None:
        out["installed"] = install(config.model, result.weights, result.weights.with_suffix(".json"))
    return out


def build_parser() -> argparse.ArgumentParser:
    """The argparse twin of the ``vitedge train`` typer command (same option names)."""
    p = argparse.ArgumentParser(prog="python -m vitedge.train", description="Train or distil a model.")
    p.add_argument("model", help="cifar-resnet, cifar-vit, cifar-swin or timm:<name>")
    for name, (_, typ, help_) in {
        **OPTIONS,
        **{k: (k, t, h) for k, (t, h) in DISTILL_OPTIONS.items()},
    }.items():
        p.add_argument("--" + name.replace("_", "-"), dest=name, type=typ, default=None, help=help_)
    p.add_argument(
        "--bf16", dest="bf16", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast"
    )
    p.add_argument("-O", "--optimize", dest="optimize", action="append", default=None, help=OPTIMIZE_HELP)
    p.add_argument("--hard-distill", dest="hard_distill", action="store_true", help="DeiT hard distillation")
    p.add_argument("--resume", action="store_true", help="continue the run checkpointed in --out")
    p.add_argument(
        "--install", action="store_true", help="copy the final weights into vitedge/models/weights/"
    )
    p.add_argument(
        "--exit-heads", dest="exit_heads", default=None, help="train exit heads after these blocks (3,5,7)"
    )
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--json", dest="as_json", action="store_true", help="print one JSON object on stdout")
    return p
