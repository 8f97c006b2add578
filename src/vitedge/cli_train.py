"""``vitedge train MODEL --exit-heads BLOCKS``: the options that apply, a progress bar, the summary."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

# train options -> ExitTrainConfig fields; any other option given with --exit-heads is refused by name
EXIT_OPTIONS = {
    "data": "data",
    "epochs": "epochs",
    "batch": "batch_size",
    "lr": "lr",
    "weight_decay": "weight_decay",
    "temperature": "temperature",
    "seed": "seed",
    "limit": "limit",
    "eval_limit": "eval_limit",
    "out": "out",
}


def exit_config(model: str, blocks: str, options: dict[str, Any]) -> Any:
    """The ExitTrainConfig the command line asks for.

    Raises:
        ValueError: a training option that does not apply to exit heads, or bad blocks.
    """
    from vitedge.train.exits import ExitTrainConfig, parse_blocks

    defaults = {"hard_distill": False, "resume": False}
    stray = sorted(
        k for k, v in options.items() if k not in EXIT_OPTIONS and v not in (None, defaults.get(k), [])
    )
    if stray:
        names = ", ".join("--" + k.replace("_", "-") for k in stray)
        raise ValueError(
            f"--exit-heads trains heads on the frozen model; {names} do not apply (it takes "
            f"{', '.join('--' + k.replace('_', '-') for k in EXIT_OPTIONS)})"
        )
    fields = {EXIT_OPTIONS[k]: v for k, v in options.items() if k in EXIT_OPTIONS and v is not None}
    return ExitTrainConfig(model=model, blocks=parse_blocks(blocks), **fields)


def run_exit_heads(
    model: str, blocks: str, options: dict[str, Any], *, resume: bool, install: bool, console: Console
) -> dict[str, Any]:
    from vitedge.train.exits import check_installable, install_heads, train_exit_heads

    if resume:
        raise ValueError("--exit-heads runs take minutes and do not resume; run them again")
    config = exit_config(model, blocks, options)
    if install:
        check_installable(model)  # before minutes of training, not after
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    tasks: dict[str, Any] = {}

    def progress(stage: str, done: int, total: int) -> None:
        if stage not in tasks:
            tasks[stage] = bar.add_task(f"{model} exit heads: {stage}", total=total)
        bar.update(tasks[stage], completed=done)

    with bar:
        result = train_exit_heads(config, progress=progress)
    if install:
        result["installed"] = install_heads(model, result["heads"])
    return result
