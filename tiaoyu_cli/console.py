"""The one stderr console every subcommand prints through (stdout is for data only)."""

from __future__ import annotations

from rich.console import Console

console = Console(stderr=True, highlight=False)


def info(msg: str) -> None:
    console.print(msg)


def warn(msg: str) -> None:
    console.print(f"[yellow]warning:[/] {msg}")


def say(msg: str) -> None:
    """One line of plain text on stderr (no rich markup: paths and data print as they are)."""
    console.print(msg, markup=False, highlight=False, soft_wrap=True)
