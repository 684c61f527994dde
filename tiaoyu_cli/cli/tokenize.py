"""`tiaoyu tokenize train|encode|show`: train a SentencePiece tokenizer, encode a corpus into
token shards, and show how a tokenizer cuts a text. The work is done in tiaoyu_cli.tokenizer."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from tiaoyu_cli.cli.common import sub_app
from tiaoyu_cli.console import console
from tiaoyu_cli.errors import TiaoyuError

EXAMPLES = """
Examples:

  tiaoyu tokenize train data.jsonl -o tok/ --vocab-size 4096
  tiaoyu tokenize encode data.jsonl --tokenizer tok/ -o tokens/ --workers 2
  tiaoyu tokenize encode data.jsonl --tokenizer models/qwen -o tokens-qwen/   # an open model's tokenizer
  tiaoyu tokenize show tok/ "文本 text 12345 😀"
"""
TRAIN_EXAMPLES = """
Examples:

  tiaoyu tokenize train data.jsonl -o tok/ --vocab-size 4096
  tiaoyu prep raw/ | tiaoyu tokenize train - -o tok/ --algo unigram --vocab-size 8000
"""
ENCODE_EXAMPLES = """
Examples:

  tiaoyu tokenize encode data.jsonl --tokenizer tok/ -o tokens/ --workers 2
  tiaoyu tokenize encode train.jsonl --val val.jsonl -t tok/ -o tokens/
  tiaoyu tokenize encode data.jsonl --tokenizer models/qwen -o tokens-qwen/   # an open model's tokenizer
"""
SHOW_EXAMPLES = """
Examples:

  tiaoyu tokenize show tok/ "文本 text 12345 😀"
  tiaoyu tokenize show models/qwen "文本 text 12345"
"""

tokenize_app = sub_app("tokenize", "Train a tokenizer, encode a corpus into token shards, show how text is cut.",
                       epilog=EXAMPLES)


def register(app: typer.Typer) -> None:
    app.add_typer(tokenize_app, name="tokenize")


@tokenize_app.command("train", epilog=TRAIN_EXAMPLES)
def train_cmd(
    data: Annotated[list[str], typer.Argument(help="JSONL files ('-' for stdin, .gz works); any record kind.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Tokenizer folder to write (new, empty, or an old tokenizer).")],
    algo: Annotated[str, typer.Option("--algo", help="bpe | unigram | char | word")] = "bpe",
    vocab_size: Annotated[int, typer.Option("--vocab-size", help="Number of tokens, incl. 8 special + 256 byte tokens.")] = 4096,
    sample_size: Annotated[int, typer.Option("--sample-size", help="Text pieces sampled uniformly from the input to train on.")] = 200_000,
    character_coverage: Annotated[float, typer.Option("--character-coverage", help="Share of characters that get their own token; the rarest fall back to bytes.")] = 0.9995,
    max_length: Annotated[int, typer.Option("--max-length", help="model_max_length written to tokenizer_config.json.")] = 2048,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sampling.")] = 0,
    threads: Annotated[int, typer.Option("--threads", help="Training threads (0 = all cores).")] = 0,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed records instead of stopping.")] = False,
) -> None:
    """Train a SentencePiece tokenizer (byte fallback, split digits, ChatML special tokens).
    """
    from rich.table import Table

    from tiaoyu_cli.tokenizer import train_tokenizer

    with console.status(f"sampling {', '.join(data)} and training ({algo}, vocab {vocab_size}) …"):
        tok = train_tokenizer(data, out, algo=algo, vocab_size=vocab_size, sample_size=sample_size,
                              character_coverage=character_coverage, seed=seed, num_threads=threads,
                              model_max_length=max_length, skip_bad=skip_bad)
    r = tok.report
    t = Table(title=f"tokenizer → {out}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column(justify="right")
    t.add_row("algorithm", algo)
    t.add_row("vocab size", f"{r.vocab_size:,}")
    t.add_row("records read", f"{r.records:,}" + (f" ({r.skipped_bad} bad skipped)" if r.skipped_bad else ""))
    t.add_row("training sample", f"{r.sample_pieces:,} pieces, {r.sample_chars:,} chars")
    t.add_row("training time", f"{r.seconds:.2f} s")
    held = "training sample" if r.heldout_is_training_sample else "held-out sample"
    t.add_row(f"chars/token ({held})", f"{r.chars_per_token:.3f}")
    if r.heldout_tokens:
        t.add_row("byte-fallback tokens", f"{100 * r.heldout_byte_tokens / r.heldout_tokens:.2f} %")
    t.add_row("fingerprint", r.fingerprint)
    console.print(t)


@tokenize_app.command("encode", epilog=ENCODE_EXAMPLES)
def encode_cmd(
    data: Annotated[list[str], typer.Argument(help="JSONL files ('-' for stdin, .gz works).")],
    tokenizer: Annotated[Path, typer.Option("-t", "--tokenizer", help="Tokenizer folder, checkpoint folder, or a Hugging Face model folder (its tokenizer.json).")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Token folder to write: OUT/train, OUT/val, OUT/meta.json.")],
    workers: Annotated[int, typer.Option("--workers", "-j", help="Encoding processes (0 = all cores).")] = 0,
    val_ratio: Annotated[Optional[float], typer.Option("--val-ratio", help="Share of records for OUT/val (default 0.01).")] = None,
    val: Annotated[Optional[list[str]], typer.Option("--val", help="A JSONL file encoded as the val split instead (repeatable).")] = None,
    shard_tokens: Annotated[int, typer.Option("--shard-tokens", help="Tokens per shard file.")] = 1 << 26,
    skip_bad: Annotated[bool, typer.Option("--skip-bad", help="Skip malformed records instead of stopping.")] = False,
) -> None:
    """Encode JSONL into memory-mappable safetensors shards: <s> doc </s> <s> doc </s> … (an open model's
    tokenizer puts its own BOS/end-of-text around each document, as it does itself).
    """
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn, TransferSpeedColumn
    from rich.table import Table

    from tiaoyu_cli.tokenizer.encode import encode_corpus

    if val and val_ratio is not None:
        raise TiaoyuError("give either --val-ratio or --val FILE, not both")
    sizes = [os.path.getsize(p) if p != "-" and not p.endswith(".gz") and os.path.isfile(p) else None
             for p in list(data) + list(val or [])]
    total = None if None in sizes else sum(sizes)
    # auto_refresh=False: no refresh thread, so the worker processes are forked from a single-threaded parent
    progress = Progress(TextColumn("encoding"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeElapsedColumn(), console=console, transient=True, auto_refresh=False,
                        disable=not console.is_terminal)

    def advance(nbytes: int) -> None:
        progress.advance(task, nbytes)
        progress.refresh()

    with progress:
        task = progress.add_task("encode", total=total)
        report = encode_corpus(list(data), tokenizer, out, workers=workers,
                               val_ratio=0.01 if val_ratio is None else val_ratio, val_inputs=val,
                               shard_tokens=shard_tokens, skip_bad=skip_bad, on_progress=advance)
    t = Table(title=f"tokens → {out}  ({report.bytes_read / 1e6:.1f} MB in {report.seconds:.2f} s, "
                    f"{report.mb_per_s:.1f} MB/s)", title_justify="left")
    for col in ("split", "documents", "tokens", "tokens/doc", "shards"):
        t.add_column(col, justify="right" if col != "split" else "left")
    for split, s in report.splits.items():
        docs = s["num_documents"]
        t.add_row(split, f"{docs:,}", f"{s['num_tokens']:,}", f"{s['num_tokens'] / max(docs, 1):.1f}", str(len(s["shards"])))
    console.print(t)
    notes = []
    if report.empty:
        notes.append(f"{report.empty} empty records skipped")
    if report.skipped_bad:
        notes.append(f"{report.skipped_bad} bad records skipped")
    if "val" not in report.splits:
        notes.append("no val split (too few records for --val-ratio)")
    if notes:
        console.print("[yellow]note:[/] " + "; ".join(notes))


def _printable(piece: str) -> str:
    return piece.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")


@tokenize_app.command("show", epilog=SHOW_EXAMPLES)
def show_cmd(
    tokenizer: Annotated[Path, typer.Argument(help="Tokenizer folder, checkpoint folder, or Hugging Face model folder.")],
    text: Annotated[list[str], typer.Argument(help="Text to cut ('-' reads stdin). Several arguments are joined by spaces.")],
) -> None:
    """Show how a tokenizer cuts text: one row per token (a table on stderr, `id<TAB>piece` on stdout).
    """
    from rich.markup import escape
    from rich.table import Table

    from tiaoyu_cli.tokenizer import open_tokenizer

    tok = open_tokenizer(tokenizer)
    s = sys.stdin.read() if text == ["-"] else " ".join(text)
    ids = tok.encode(s)
    t = Table(title=f"{len(s)} chars → {len(ids)} tokens ({tok.path}, vocab {tok.vocab_size})", title_justify="left")
    t.add_column("#", justify="right", style="dim")
    t.add_column("id", justify="right")
    t.add_column("piece")
    t.add_column("kind", style="dim")
    lines = []
    for k, i in enumerate(ids):
        piece = tok.id_to_piece(i)
        kind = ("special" if tok.is_special(i) else "byte" if tok.is_byte(i)
                else "space" if piece.strip("\u2581\u0120\u010a") == "" else "")  # ▁ (SentencePiece), Ġ Ċ (byte BPE)
        t.add_row(str(k), str(i), escape(_printable(piece)), kind)
        lines.append(f"{i}\t{_printable(piece)}\n")
    console.print(t)
    sys.stdout.write("".join(lines))
    sys.stdout.flush()
