"""Checkpoints without pickle: weights and optimiser tensors as safetensors, everything else as JSON.

A checkpoint is the folder ``<out>/checkpoint/`` holding ``state.json``, ``model.safetensors`` and
``optimizer.safetensors``. It is written into a temporary folder first and swapped in with renames, so a
crash leaves either the old or the new checkpoint whole (a leftover ``checkpoint.old/`` is used when
``checkpoint/`` is missing).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

CHECKPOINT = "checkpoint"
FORMAT = 1


@dataclass
class RunState:
    """The loop's counters and records; with the config, RNG states and tensors it makes a checkpoint."""

    epochs: int  # planned epochs (refitted by a time budget)
    epoch: int = 0  # epochs completed
    step_in_epoch: int = 0
    global_step: int = 0
    elapsed_s: float = 0.0  # time spent in earlier sessions
    history: list[dict[str, Any]] = field(default_factory=list)
    budget: list[dict[str, Any]] = field(default_factory=list)
    epoch_stats: dict[str, float] = field(
        default_factory=lambda: {"loss_sum": 0.0, "correct": 0.0, "seen": 0.0}
    )
    status: str = "running"  # "running" | "done"

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> RunState:
        return cls(**{f.name: obj[f.name] for f in dataclasses.fields(cls)})


@dataclass(frozen=True)
class Checkpoint:
    state: dict[str, Any]  # JSON: config, counters, RNG states, history
    model: dict[str, torch.Tensor]  # student state dict (plus "projector." entries)
    optimizer: dict[str, Any]  # a torch optimiser state dict


def cpu_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU copies (safetensors rejects channels-last and other strided tensors)."""
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def flatten_optimizer(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimiser state dict into tensors ``state.<param>.<key>`` and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entries in state_dict["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            elif value is not None:
                scalars[f"{pid}.{key}"] = value
    return cpu_tensors(tensors), {"param_groups": state_dict["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        pid, key = name.split(".", 1)
        state.setdefault(int(pid), {})[key] = value
    groups = [dict(g) for g in meta["param_groups"]]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=1, default=float) + "\n")


def save_checkpoint(out: Path, ckpt: Checkpoint) -> Path:
    """Write ``out/checkpoint/`` atomically; returns its path."""
    out.mkdir(parents=True, exist_ok=True)
    target, old = out / CHECKPOINT, out / f"{CHECKPOINT}.old"
    tmp = Path(tempfile.mkdtemp(prefix=f".{CHECKPOINT}-", dir=out))
    tmp.chmod(0o755)
    try:
        save_file(cpu_tensors(ckpt.model), str(tmp / "model.safetensors"), metadata={"format": str(FORMAT)})
        opt_tensors, opt_meta = flatten_optimizer(ckpt.optimizer)
        save_file(opt_tensors, str(tmp / "optimizer.safetensors"), metadata={"format": str(FORMAT)})
        _write_json(tmp / "state.json", {**ckpt.state, "format": FORMAT, "optimizer": opt_meta})
        if target.exists():
            if old.exists():
                shutil.rmtree(old)
            os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def has_checkpoint(out: Path) -> bool:
    return any((out / name / "state.json").is_file() for name in (CHECKPOINT, f"{CHECKPOINT}.old"))


def load_checkpoint(out: Path) -> Checkpoint:
    """Read ``out/checkpoint/`` (or the ``checkpoint.old/`` a crash mid-swap left).

    Raises:
        FileNotFoundError: there is no checkpoint in ``out``.
        ValueError: it is unreadable or of another format.
    """
    folder = next(
        (out / n for n in (CHECKPOINT, f"{CHECKPOINT}.old") if (out / n / "state.json").is_file()), None
    )
    if folder is None:
        raise FileNotFoundError(f"{out} holds no checkpoint to resume; start the run without --resume")
    try:
        state = json.loads((folder / "state.json").read_text())
        model = load_file(str(folder / "model.safetensors"))
        opt_tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, ValueError) as e:
        raise ValueError(f"checkpoint {folder} is unreadable: {e}") from e
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint {folder} has format {state.get('format')!r}, expected {FORMAT}")
    optimizer = unflatten_optimizer(opt_tensors, state.pop("optimizer"))
    return Checkpoint(state=state, model=model, optimizer=optimizer)


def rng_state() -> dict[str, list[int]]:
    """The global torch generators that models draw from (dropout, stochastic depth)."""
    out = {"cpu": torch.get_rng_state().tolist()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state().tolist()
    return out


def set_rng_state(state: dict[str, list[int]]) -> None:
    torch.set_rng_state(torch.tensor(state["cpu"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))
