"""`tiaoyu prep`: clean and convert raw files into JSONL records (engine: tiaoyu_cli/data/prep.py)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from tiaoyu_cli.errors import TiaoyuError


EXAMPLES = """
Examples:

  tiaoyu prep raw/ > data.jsonl
  tiaoyu prep 'corpus/**/*.txt' --separator % --near-dup -o text.jsonl
  tiaoyu prep alpaca.json sharegpt.jsonl.gz --to chat --shuffle --split val=0.01 -o sft/
  tiaoyu prep data/train-00000-of-00001.parquet --split val=0.01 -o sft/
  tiaoyu prep hf_saved/ -o data.jsonl   # datasets save_to_disk folder (a DatasetDict: train; hf_saved/test for test)
  tiaoyu prep raw/ | tiaoyu tokenize train - -o tok/
  tiaoyu prep big/ --workers 8 -o data.jsonl
  tiaoyu prep big/ --shard $SLURM_ARRAY_TASK_ID/16 -o parts/$SLURM_ARRAY_TASK_ID.jsonl
  tiaoyu prep --merge parts/*.jsonl --near-dup -o data.jsonl
"""


def register(app: typer.Typer) -> None:
    app.command("prep", epilog=EXAMPLES, no_args_is_help=True)(prep)


def parse_split(spec: str | None) -> float:
    """'val=0.01' or '0.01' → 0.01."""
    if not spec:
        return 0.0
    s = spec.strip()
    if "=" in s:
        name, _, s = s.partition("=")
        if name.strip() != "val":
            raise TiaoyuError(f"--split: expected val=FRACTION (e.g. val=0.01), got {spec!r}")
    try:
        v = float(s)
    except ValueError:
        raise TiaoyuError(f"--split: expected val=FRACTION (e.g. val=0.01), got {spec!r}") from None
    if not 0.0 <= v < 1.0:
        raise TiaoyuError(f"--split: the val fraction must be in [0, 1), got {v}")
    return v


def parse_shard(spec: str | None) -> tuple[int, int] | None:
    """'3/16' → (3, 16): slice 3 of 16, counted from 0."""
    if spec is None:
        return None
    i, sep, n = spec.strip().partition("/")
    try:
        index, count = int(i), int(n)
    except ValueError:
        raise TiaoyuError(f"--shard: expected I/N (e.g. 0/4 … 3/4), got {spec!r}") from None
    if not sep or count < 1 or not 0 <= index < count:
        raise TiaoyuError(f"--shard: expected I/N with 0 <= I < N (e.g. 0/4 … 3/4), got {spec!r}")
    return index, count


def prep(
    inputs: Annotated[list[str], typer.Argument(help="Files, folders (recursive), glob patterns, '-' for stdin. A datasets save_to_disk folder is read as a dataset; a DatasetDict folder gives its train split (name the split's folder, e.g. hf_saved/test, for another).", show_default=False)],
    out: Annotated[Optional[str], typer.Option("-o", "--out", help="Output file (default stdout). With --split: FILE.jsonl → FILE.train.jsonl + FILE.val.jsonl, or DIR/ → DIR/train.jsonl + DIR/val.jsonl.")] = None,
    to: Annotated[Optional[str], typer.Option("--to", help="Force the record kind: text | chat | preference | verifiable | classification.")] = None,
    nfkc: Annotated[bool, typer.Option("--nfkc", help="NFKC normalisation (full-width → ASCII, also Chinese punctuation); default NFC.")] = False,
    keep_whitespace: Annotated[bool, typer.Option("--keep-whitespace", help="Do not collapse spaces, trailing blanks and blank-line runs.")] = False,
    min_chars: Annotated[int, typer.Option("--min-chars", help="Drop records with fewer characters (all strings together).")] = 1,
    max_chars: Annotated[int, typer.Option("--max-chars", help="Drop records with more characters (0 = no limit).")] = 1_000_000,
    separator: Annotated[Optional[str], typer.Option("--separator", help="Plain text: a line equal to this separates documents (e.g. '%'); default blank lines.")] = None,
    no_dedup: Annotated[bool, typer.Option("--no-dedup", help="Keep exact duplicates.")] = False,
    near_dup: Annotated[bool, typer.Option("--near-dup", help="Also drop near-duplicates (MinHash on character 5-grams).")] = False,
    near_dup_threshold: Annotated[float, typer.Option("--near-dup-threshold", help="Jaccard similarity counted as near-duplicate.")] = 0.8,
    shuffle: Annotated[bool, typer.Option("--shuffle", help="Uniform shuffle in bounded memory (temp files beside the output).")] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of --shuffle and --split.")] = 0,
    split: Annotated[Optional[str], typer.Option("--split", help="Hold out a val split, e.g. val=0.01.")] = None,
    errors: Annotated[str, typer.Option("--errors", help="Invalid UTF-8: strict (error) | replace (U+FFFD) | skip (drop the record).")] = "strict",
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed records (bad JSON, wrong field types, unknown format) and count them.")] = False,
    workers: Annotated[int, typer.Option("--workers", "-j", help="Processes for parsing and cleaning (0 = one per core); the output is the same bytes for any number.")] = 1,
    shard: Annotated[Optional[str], typer.Option("--shard", help="Process only slice I of N of the inputs, I counted from 0 (e.g. 3/16, for cluster job arrays); combine the outputs with --merge.")] = None,
    merge: Annotated[bool, typer.Option("--merge", help="The inputs are prep outputs (e.g. shards): dedup across them (exact; near with --near-dup), split, shuffle; records pass unchanged.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary table.")] = False,
) -> None:
    """Clean raw files into JSONL records: text, chat, preference, verifiable or classification.

    Reads .txt/.md/.jsonl/.json (and .gz of them; anything else as plain text, binary files are skipped), .parquet and .arrow files and datasets' save_to_disk folders (their rows as records; needs pyarrow: pip install 'tiaoyu\\[parquet]'), auto-detects the record format (Alpaca, ShareGPT, messages, prompt/completion, prompt/response, reasoning records, preference pairs, seed-style <s>…</s> text), normalises Unicode, strips control characters and ANSI escapes, collapses whitespace, filters by length and removes duplicates. Data goes to stdout (or -o, written atomically); the summary goes to stderr.
    """
    from tiaoyu_cli.console import console, warn
    from tiaoyu_cli.data.prep import PrepConfig, run_prep

    cfg = PrepConfig(
        to=to, nfkc=nfkc, collapse_whitespace=not keep_whitespace, min_chars=min_chars, max_chars=max_chars,
        separator=separator, dedup=not no_dedup, near_dup=near_dup, near_dup_threshold=near_dup_threshold,
        shuffle=shuffle, seed=seed, val_frac=parse_split(split), errors=errors, skip_bad=skip_bad,
        workers=workers, shard=parse_shard(shard), merge=merge,
    )
    progress = None
    task = None

    def on_start(total: int) -> None:
        nonlocal progress, task
        if quiet or not console.is_terminal or total < (16 << 20):
            return
        from rich.progress import BarColumn, DownloadColumn, Progress, TimeRemainingColumn, TransferSpeedColumn

        progress = Progress("[bold]prep[/]", BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                            TimeRemainingColumn(), console=console, transient=True)
        progress.start()
        task = progress.add_task("prep", total=total)

    def on_progress(done: int) -> None:
        if progress is not None:
            progress.update(task, completed=done)

    try:
        stats = run_prep(inputs, out, cfg, on_progress=on_progress, on_start=on_start)
    finally:
        if progress is not None:
            progress.stop()
    if stats.binary:
        names = ", ".join(stats.binary[:5]) + (" …" if len(stats.binary) > 5 else "")
        warn(f"skipped {len(stats.binary)} binary file(s): {names}")
    if cfg.val_frac > 0 and stats.kept_val == 0:
        warn("the val split is empty: too few records for --split " + str(cfg.val_frac))
    if len(stats.kinds) > 1:
        warn("the output mixes record kinds (" + ", ".join(sorted(stats.kinds)) + "); "
             "later stages read one kind — use --to or separate runs")
    if not quiet:
        console.print(summary_table(stats, cfg.val_frac > 0))


def summary_table(stats, split: bool):
    from rich.table import Table

    mb = stats.bytes_in / 1e6
    t = Table(title="tiaoyu prep", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("output", ", ".join(stats.outputs))
    t.add_row("input files", f"{stats.files:,}" + (f" ({len(stats.binary)} binary skipped)" if stats.binary else ""))
    t.add_row("input MB", f"{mb:,.{1 if mb >= 10 else 3}f}  ({mb / max(stats.seconds, 1e-9):,.1f} MB/s, {stats.seconds:.1f} s"
              + (f", {stats.workers} workers" if stats.workers > 1 else "") + ")")
    t.add_row("records read", f"{stats.read:,}")
    kept = f"{stats.kept:,}"
    if split:
        kept += f"  (train {stats.kept_train:,}, val {stats.kept_val:,})"
    t.add_row("[green]kept[/]", kept)
    for kind, n in sorted(stats.kinds.items()):
        t.add_row(f"  {kind}", f"{n:,}")
    for reason, n in stats.dropped.items():
        if n:
            t.add_row(f"[yellow]dropped: {reason}[/]", f"{n:,}")
    if not any(stats.dropped.values()):
        t.add_row("dropped", "0")
    return t
