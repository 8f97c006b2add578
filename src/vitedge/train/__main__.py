"""``python -m vitedge.train MODEL [options]``: ``vitedge train`` without typer (for bare GPU machines)."""

from __future__ import annotations

import json
import logging
import shlex
import sys

import torch
from rich.console import Console

from vitedge.train.run import build_parser, config_from_options, default_out, resume_config, run_train


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr, format="%(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    options = {
        k: v
        for k, v in vars(args).items()
        if k not in ("model", "resume", "install", "threads", "as_json", "exit_heads")
    }
    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    try:
        if args.exit_heads is not None:
            from vitedge.cli_train import run_exit_heads

            result = run_exit_heads(
                args.model,
                args.exit_heads,
                options,
                resume=args.resume,
                install=args.install,
                console=console,
            )
        else:
            if args.resume:
                config = resume_config(args.model, options.get("out") or default_out(args.model), options)
            else:
                config = config_from_options(args.model, options)
            command = shlex.join(["vitedge", "train", *(sys.argv[1:] if argv is None else argv)])
            result = run_train(
                config, resume=args.resume, install_weights=args.install, console=console, command=command
            )
    except (ValueError, TypeError, FileNotFoundError) as e:
        console.print(
            f"[bold red]error:[/] {str(e).splitlines()[0] if str(e) else type(e).__name__}", highlight=False
        )
        return 2
    if args.as_json:
        sys.stdout.write(json.dumps(result, default=float) + "\n")
    else:
        console.print(result, highlight=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
