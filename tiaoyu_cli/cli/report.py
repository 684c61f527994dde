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
    """Write one report card: per stage, the metric it exists for before → after ± standard error and
    whether the gain is beyond 2 SE, that metric's curve, benchmark scores per checkpoint with a flag
    wherever a later stage lowers an earlier score beyond its standard error, and every metric folded below."""
    from rich.markup import escape

    from tiaoyu_cli.console import console
    from tiaoyu_cli.evals.report import write_report

    summary = write_report([str(r) for r in runs], [str(b) for b in bench or []], out)
    colour = {"better": "green", "worse": "red", "noise": "dim"}
    for r in summary["lead"]:  # the headline of each stage, as the report leads with it
        flag = f"  [{colour[r['verdict']]}]{escape(r['flag'])}[/]" if r["verdict"] else ""
        console.print(f"{escape(r['run'])} ({escape(r['stage'])}): {escape(r['metric'])} {escape(r['before'])} → "
                      f"{escape(r['after'])}{flag}", soft_wrap=True)
    for f in summary["flags"]:
        console.print(f"[yellow]flag:[/] {f}")
    console.print(f"wrote {summary['markdown']} and {summary['html']} ({summary['runs']} runs, "
                  f"{summary['benchmarks']} benchmark results)")
