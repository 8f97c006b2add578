"""scripts/finetunes.sh: every recipe is a command line `python -m vitedge.train` accepts, with -O options
that parse and that training accepts."""

from __future__ import annotations

import shlex
import subprocess
from pathlib import Path

import pytest

from vitedge.train.config import trainable_options
from vitedge.train.run import build_parser

SCRIPT = Path(__file__).parents[2] / "scripts" / "finetunes.sh"


def _recipes() -> dict[str, list[str]]:
    names = subprocess.run(["bash", str(SCRIPT), "--list"], check=True, capture_output=True, text=True)
    out = {}
    for name in names.stdout.split():
        # print the command instead of running it: PY=echo makes the script's exec an echo
        cmd = subprocess.run(
            ["bash", str(SCRIPT), name, "runs/x"],
            check=True,
            capture_output=True,
            text=True,
            env={"PY": "echo"},
        ).stdout
        out[name] = shlex.split(cmd)
    return out


RECIPES = _recipes()


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_parses(name: str) -> None:
    argv = RECIPES[name]
    assert argv[:2] == ["-m", "vitedge.train"]
    args = build_parser().parse_args(argv[2:])
    assert args.out == "runs/x"
    trainable_options(tuple(args.optimize or ()))  # every -O parses and training takes it


def test_unknown_recipe_is_refused() -> None:
    res = subprocess.run(["bash", str(SCRIPT), "nope"], capture_output=True, text=True)
    assert res.returncode == 2 and "unknown recipe" in res.stderr
