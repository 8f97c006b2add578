"""What the ``vitedge`` commands share: the typer app, the option types, JSON output and error handling.

Every command accepts ``--json`` and then prints exactly one JSON object on stdout; progress bars, tables and
logs go to stderr. Bad input ends with a one-line ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

app = typer.Typer(
    name="vitedge",
    help="Measure and accelerate the vision encoders of vision-language models on edge hardware.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])
DEBUG = {"on": False}  # set by --debug: show the traceback instead of a one-line error


@app.callback()
def _options(  # the options every command shares, given before it: vitedge --debug eval ...
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks, not one-line errors")] = False,
) -> None:
    DEBUG["on"] = debug


ModelArg = Annotated[
    str, typer.Argument(help="vit4mnist, cifar-vit, timm:<name>, hf:vit, hf:<dir>, or an optimised dir")
]
OptOpt = Annotated[
    list[str] | None, typer.Option("-O", "--opt", help="NAME[:key=value,...]; repeat to stack")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print one JSON object on stdout")]
ThreadsOpt = Annotated[int, typer.Option("--threads", help="torch threads", min=1)]
ImgOpt = Annotated[int | None, typer.Option("--img-size", help="input size (default: the model's)")]
PrecisionOpt = Annotated[
    float,
    typer.Option("--precision", help="time until each speed-up's 95 % interval is within this fraction"),
]
MaxSecondsOpt = Annotated[
    float, typer.Option("--max-seconds", help="stop timing a comparison after this long, precise or not")
]
WeightsOpt = Annotated[
    Path | None, typer.Option("--weights", help="local .safetensors weights for timm: models")
]
DataOpt = Annotated[
    str, typer.Option("--data", help="mnist, cifar10, imagenet-sample, or an ImageFolder dir")
]


def emit(obj: dict[str, Any], as_json: bool, render: Callable[[dict[str, Any]], None]) -> None:
    if as_json:
        sys.stdout.write(json.dumps(obj, default=float) + "\n")
    else:
        render(obj)


def user_errors(fn: F) -> F:
    """Turn the errors bad user input raises (``ValueError`` and missing or unreadable paths) into one line
    on stderr and exit status 2. Anything else is a bug and keeps its traceback, as everything does with
    ``--debug``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as e:
            if DEBUG["on"]:
                raise
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
