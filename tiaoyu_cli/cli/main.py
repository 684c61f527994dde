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


def main(argv: list[str] | None = None) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except TiaoyuError as e:
        from tiaoyu_cli.cli.console import console

        from rich.markup import escape

        console.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        # downstream closed the pipe (e.g. `| head`): not an error for a Unix filter
        try:
            sys.stdout = None  # type: ignore[assignment]
        finally:
            sys.exit(0)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(130)
        raise
