"""`tiaoyu` entry point: one typer app, one thin module per subcommand.

Each module in COMMANDS lives at tiaoyu_cli/cli/<name>.py and defines `register(app)`, which adds
its command (or sub-app) to the root app. A subcommand is listed here only once it is real.
"""

from __future__ import annotations

import importlib
import sys

import typer

from tiaoyu_cli.errors import TiaoyuError

COMMANDS: list[str] = [
    "synth",
    "prep",
    "tokenize",
    "pretrain",
    "chat",
    "eval",
    "export",
    "serve",
    "sft",
    "lora",
    "distill",
    "rlhf",
    "reason",
    "report",
    "index",
    "tools",
]

app = typer.Typer(
    name="tiaoyu",
    help="Train a small language model through its whole life: prep → tokenize → pretrain → sft → "
    "rlhf / lora / distill / reason → chat. Every stage reads and writes JSONL and safetensors.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _register_all() -> None:
    for name in COMMANDS:
        mod = importlib.import_module(f"tiaoyu_cli.cli.{name.replace('-', '_')}")
        mod.register(app)


_register_all()


@app.callback()
def _root() -> None:
    """Train a small language model through its whole life."""


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, prog_name="tiaoyu")
    except TiaoyuError as e:
        from rich.markup import escape

        from tiaoyu_cli.console import console

        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(e.exit_code)
    except BrokenPipeError:
        # downstream closed the pipe (e.g. `| head`): not an error for a Unix filter
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(0)
