"""`tiaoyu report RUN_DIR… [--bench RESULT.json…] -o report/`: one report card (Markdown + HTML)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

EXAMPLES = """
Examples:

  tiaoyu report runs/demo/base runs/demo/sft runs/demo/grpo -o report/
  tiaoyu report runs/demo/base runs/demo/sft --bench runs/demo/bench/base.json --bench runs/demo/bench/sft.json
"""


def register(app: typer.Typer) -> None:
    app.command("report", epilog=EXAMPLES, no_args_is_help=True)(report)


def report(
    runs: Annotated[list[Path], typer.Argument(help="run folders (metrics.jsonl, trainer.json), in pipeline order")],
    bench: Annotated[Optional[list[Path]], typer.Option(help="`tiaoyu eval bench` JSON results to tabulate per "
                                                             "checkpoint (repeat the option)")] = None,
    out: Annotated[Path, typer.Option("-o", "--out", help="folder for report.md, report.html, curves-*.svg")] =
        Path("report"),
) -> None:
    """Write one report card: every stage's metrics before → after, loss curves, benchmark scores per
    checkpoint, and a flag wherever a later stage lowers an earlier score beyond its standard error."""
    from tiaoyu_cli.console import console
    from tiaoyu_cli.evals.report import write_report

    summary = write_report([str(r) for r in runs], [str(b) for b in bench or []], out)
    for f in summary["flags"]:
        console.print(f"[yellow]flag:[/] {f}")
    console.print(f"wrote {summary['markdown']} and {summary['html']} ({summary['runs']} runs, "
                  f"{summary['benchmarks']} benchmark results)")
