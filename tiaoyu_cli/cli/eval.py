"""`tiaoyu eval CKPT DATA` (metrics as JSON on stdout, a table on stderr) and `tiaoyu eval plot RUN… -o PNG`.

`tiaoyu eval CKPT DATA` needs no subcommand word: the group falls back to its default command
`run` when the first argument is not `plot` (see `DefaultCommandGroup`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperGroup

EXAMPLES = """
Examples:

  tiaoyu eval ckpt/base synth/text.val.jsonl                    # loss, perplexity, bits per byte
  tiaoyu eval ckpt/base tokens/                                 # the val split of token shards
  tiaoyu eval ckpt/sft synth/verifiable.val.jsonl --limit 100   # answer accuracy (greedy)
  tiaoyu eval ckpt/rm synth/preference.val.jsonl                # pairwise accuracy of a reward model
  tiaoyu eval ckpt/dpo synth/preference.val.jsonl --ref ckpt/sft   # DPO implicit-reward accuracy
  tiaoyu eval ckpt/base synth/text.val.jsonl --quantize int8    # the quality cost of int8 weights
  tiaoyu eval plot runs/base runs/sft -o curves.png             # training curves, runs overlaid
"""


class DefaultCommandGroup(TyperGroup):
    """A group whose first argument may be a subcommand or, when it is not one, the default command's arguments."""

    default_command = "run"

    def parse_args(self, ctx, args):
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


eval_app = typer.Typer(
    name="eval",
    cls=DefaultCommandGroup,
    help="Evaluate a checkpoint on data (tiaoyu eval CKPT DATA), or plot training curves (tiaoyu eval plot).",
    epilog=EXAMPLES,
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")


@eval_app.command("run", epilog=EXAMPLES)
def run_cmd(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder (step folder, run folder, or export)")],
    data: Annotated[Path, typer.Argument(help="JSONL of one record kind (text, chat, verifiable, preference, "
                                               "classification) or a tokens/ folder")],
    batch_size: Annotated[int, typer.Option(help="sequences per forward pass")] = 16,
    seq_len: Annotated[int, typer.Option(help="text: window length (0 = the model's context)")] = 0,
    limit: Annotated[int, typer.Option(help="only the first N records (tokens for a tokens/ folder); 0 = all")] = 0,
    max_new_tokens: Annotated[int, typer.Option(help="answer accuracy: most tokens per generated answer")] = 64,
    ref: Annotated[Optional[Path], typer.Option(help="preference pairs on a DPO policy: its reference checkpoint")] = None,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | auto (bf16 autocast where fast, like training)")] = "fp32",
    quantize: Annotated[str, typer.Option(help="none | int8 (weight-only int8 Linear layers, CPU)")] = "none",
) -> None:
    """Evaluate CKPT on DATA: the kind of data is detected; metrics go to stdout as one JSON object."""
    from rich.table import Table

    from tiaoyu_cli.console import console
    from tiaoyu_cli.train.evaluate import EvalConfig, evaluate, iter_metric_rows

    cfg = EvalConfig(batch_size=batch_size, seq_len=seq_len, limit=limit, max_new_tokens=max_new_tokens,
                     device=device, dtype=dtype, quantize=quantize)
    with console.status(f"evaluating {ckpt} on {data} …"):
        result = evaluate(ckpt, data, cfg, ref=ref)
    table = Table(title=f"eval: {result['kind']} data, {result['model']} checkpoint", title_justify="left",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column(justify="right", overflow="fold")
    table.add_row("checkpoint", result["checkpoint"])
    table.add_row("data", result["data"])
    for name, value in iter_metric_rows(result):
        table.add_row(name, value)
    console.print(table)
    sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")
    sys.stdout.flush()


@eval_app.command("plot")
def plot_cmd(
    runs: Annotated[list[Path], typer.Argument(help="run folders (with metrics.jsonl), overlaid in one figure")],
    out: Annotated[Path, typer.Option("-o", "--out", help="image to write (.png, .svg, .pdf)")] = Path("curves.png"),
    metrics: Annotated[str, typer.Option(help="comma-separated metrics.jsonl keys, one panel each")] =
        "loss,val_loss,lr,tokens_per_s",
    log_loss: Annotated[bool, typer.Option("--log-loss", help="log scale for the loss panels")] = False,
) -> None:
    """Plot loss, val loss, learning rate and tokens/s of one or more runs (needs matplotlib: pip install 'tiaoyu\\[plot]')."""
    from tiaoyu_cli.console import console
    from tiaoyu_cli.errors import TiaoyuError
    from tiaoyu_cli.train.plots import plot_runs

    keys = tuple(k.strip() for k in metrics.split(",") if k.strip())
    if not keys:
        raise TiaoyuError("--metrics: give at least one metric name")
    summary = plot_runs([str(r) for r in runs], out, keys, log_loss=log_loss)
    for label, counts in summary["runs"].items():
        console.print(f"{label}: " + ", ".join(f"{k} {n} points" for k, n in counts.items()))
    console.print(f"wrote {out}")
