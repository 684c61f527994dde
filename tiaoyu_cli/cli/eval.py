"""`tiaoyu eval CKPT DATA` (metrics as JSON on stdout, a table on stderr), `tiaoyu eval plot RUN… -o PNG`
and `tiaoyu eval bench CKPT PATH --task …` (standard benchmarks, see tiaoyu_cli/evals/).

`tiaoyu eval CKPT DATA` needs no subcommand word: the group falls back to its default command
`run` when the first argument is not `plot` or `bench` (see `DefaultCommandGroup`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tiaoyu_cli.cli.common import sub_app

EXAMPLES = """
Examples:

  tiaoyu eval ckpt/base synth/text.val.jsonl                    # loss, perplexity, bits per byte
  tiaoyu eval ckpt/base tokens/                                 # the val split of token shards
  tiaoyu eval ckpt/sft synth/verifiable.val.jsonl --limit 100   # answer accuracy (greedy)
  tiaoyu eval ckpt/rm synth/preference.val.jsonl                # pairwise accuracy of a reward model
  tiaoyu eval ckpt/dpo synth/preference.val.jsonl --ref ckpt/sft   # DPO implicit-reward accuracy
  tiaoyu eval ckpt/base synth/text.val.jsonl --quantize int8    # the quality cost of int8 weights
  tiaoyu eval plot runs/base runs/sft -o curves.png             # training curves, runs overlaid
  tiaoyu eval bench ckpt/base data/mmlu --task mmlu --shots 5   # C-Eval, CMMLU, MMLU, ARC, HellaSwag, GSM8K
"""


eval_app = sub_app("eval", "Evaluate a checkpoint on data (tiaoyu eval CKPT DATA), on a standard benchmark "
                           "(tiaoyu eval bench), or plot training curves (tiaoyu eval plot).",
                   default="run", epilog=EXAMPLES)


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
    from tiaoyu_cli.evals.evaluate import EvalConfig, evaluate, iter_metric_rows

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


PLOT_EXAMPLES = """
Examples:

  tiaoyu eval plot runs/demo/base runs/demo/sft -o curves.png      # loss, val loss, lr, tokens/s; runs overlaid
  tiaoyu eval plot ckpt/sft --metrics val_loss,answer_acc --log-loss -o sft.svg
"""


@eval_app.command("plot", epilog=PLOT_EXAMPLES)
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
    from tiaoyu_cli.evals.plots import plot_runs

    keys = tuple(k.strip() for k in metrics.split(",") if k.strip())
    if not keys:
        raise TiaoyuError("--metrics: give at least one metric name")
    summary = plot_runs([str(r) for r in runs], out, keys, log_loss=log_loss)
    for label, counts in summary["runs"].items():
        console.print(f"{label}: " + ", ".join(f"{k} {n} points" for k, n in counts.items()))
    console.print(f"wrote {out}")


BENCH_EXAMPLES = """
Examples:

  tiaoyu eval bench ckpt/base data/mmlu --task mmlu --shots 5            # folder with dev/ val/ test/
  tiaoyu eval bench ckpt/base data/ceval --task ceval --limit 200 -o ceval.json
  tiaoyu eval bench ckpt/sft data/gsm8k/test.jsonl --task gsm8k --shots 0
  tiaoyu eval bench ckpt/base synth/bench --task mmlu --style cloze --shots 3   # held-out facts (tiaoyu synth)
  tiaoyu eval bench ckpt/base data/arc --task arc --contamination synth/text.train.jsonl
"""


@eval_app.command("bench", epilog=BENCH_EXAMPLES)
def bench_cmd(
    ckpt: Annotated[Path, typer.Argument(help="checkpoint folder (step folder, run folder, or export)")],
    path: Annotated[Path, typer.Argument(help="a benchmark file, or a folder of them in the published layout")],
    task: Annotated[str, typer.Option(help="ceval | cmmlu | mmlu | arc | hellaswag | gsm8k")] = "mmlu",
    shots: Annotated[int, typer.Option(help="few-shot examples: the first K of the subject's few-shot split")] = 0,
    split: Annotated[str, typer.Option(help="split to score ('' = ceval/hellaswag: val, others: test)")] = "",
    fewshot_split: Annotated[str, typer.Option(help="split of the few-shot examples ('' = dev for CSV, "
                                                    "train for JSONL layouts)")] = "",
    limit: Annotated[int, typer.Option(help="only the first N items (0 = all)")] = 0,
    style: Annotated[str, typer.Option(help="CSV layouts: letters (lm-eval's prompt, score A–D) | "
                                            "cloze (score the answer texts after the question)")] = "letters",
    contamination: Annotated[Optional[list[Path]], typer.Option(
        help="training JSONL files: share of items sharing a 13-gram with them, and the score on the rest")] = None,
    batch_size: Annotated[int, typer.Option(help="items per forward pass")] = 16,
    max_new_tokens: Annotated[int, typer.Option(help="gsm8k: most tokens per answer")] = 256,
    chat: Annotated[str, typer.Option(help="gsm8k: auto (chat template for sft/rlhf/reason checkpoints) | "
                                           "yes | no")] = "auto",
    tools: Annotated[str, typer.Option(help="gsm8k: tools the model may call while it answers, e.g. calculator "
                                            "(chat checkpoints; each item records its calls)")] = "",
    items: Annotated[bool, typer.Option("--items", help="keep per-item log-likelihoods/answers in the JSON")] = False,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda | mps")] = "auto",
    dtype: Annotated[str, typer.Option(help="fp32 | bf16 | auto")] = "fp32",
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="write the JSON result here, not stdout")] = None,
) -> None:
    """Score CKPT on a standard benchmark (C-Eval, CMMLU, MMLU, ARC, HellaSwag, GSM8K) from local files:
    a per-subject table on stderr, one JSON result (task, n, acc, acc_norm, stderr, per_subject)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
    from rich.table import Table

    from tiaoyu_cli.console import console
    from tiaoyu_cli.evals.bench import BenchConfig, run_bench
    from tiaoyu_cli.io import atomic_write_text

    cfg = BenchConfig(task=task, shots=shots, split=split, fewshot_split=fewshot_split, limit=limit, style=style,
                      batch_size=batch_size, max_new_tokens=max_new_tokens, chat=chat, device=device, dtype=dtype,
                      contamination=[str(p) for p in contamination or []], keep_items=items,
                      tools=[t.strip() for t in tools.split(",") if t.strip()] or None)
    with Progress(TextColumn(f"{task}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True) as bar:
        def progress(total: int):
            tid = bar.add_task(task, total=total)
            return lambda n: bar.advance(tid, n)

        result = run_bench(ckpt, path, cfg, progress)
    keys = [k for k in ("acc", "acc_norm", "acc_flexible") if k in result]
    table = Table(title=f"{task}: {result['n']} items, {shots}-shot, {result['checkpoint']}", title_justify="left")
    table.add_column("subject")
    table.add_column("n", justify="right")
    for k in keys:
        table.add_column(k, justify="right")
    for name, s in result["per_subject"].items():
        table.add_row(name, str(s["n"]), *(f"{s[k]:.4f}" for k in keys))
    table.add_row("[bold]all", f"[bold]{result['n']}",
                  *(f"[bold]{result[k]:.4f} ± {result['stderr'][k]:.4f}" for k in keys))
    console.print(table)
    if "contamination" in result:
        c = result["contamination"]
        clean = c["clean"]
        console.print(f"contamination: {c['dirty']}/{result['n']} items ({c['dirty_share']:.1%}) share a 13-gram "
                      f"with {c['train_records']} training records; clean items: {clean['n']}"
                      + (f", acc {clean['acc']:.4f}" if clean["n"] else ""))
    text = json.dumps(result, ensure_ascii=False)
    if out is not None:
        atomic_write_text(out, text + "\n")
        console.print(f"wrote {out}")
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()
