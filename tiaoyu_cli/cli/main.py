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

def build_app(names: list[str] | None = None) -> typer.Typer:
    """The root app with the subcommands `names` (default: all). `tiaoyu prep …` registers only `prep`,
    so a command never pays for importing the others (torch alone takes ~2 s to import)."""
    root = typer.Typer(
        name="tiaoyu",
        help="Train a small language model through its whole life: prep → tokenize → pretrain → sft → "
        "rlhf / lora / distill / reason → chat. Every stage reads and writes JSONL and safetensors.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode="rich",
    )

    @root.callback()
    def _root() -> None:
        """Train a small language model through its whole life."""

    for name in COMMANDS if names is None else names:
        importlib.import_module(f"tiaoyu_cli.cli.{name.replace('-', '_')}").register(root)
    return root


_full_app: typer.Typer | None = None


def __getattr__(name: str):
    """`app`: the root app with every subcommand, built on first use (for typer's CliRunner)."""
    global _full_app
    if name == "app":
        if _full_app is None:
            _full_app = build_app()
        return _full_app
    raise AttributeError(name)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    wanted = [args[0]] if args and args[0] in COMMANDS else None  # root --help and typos: all commands
    try:
        build_app(wanted)(args=args, prog_name="tiaoyu")
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
