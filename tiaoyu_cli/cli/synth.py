"""`tiaoyu synth OUT/`: write the bundled synthetic corpus (see tiaoyu_cli/data/synth.py)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from tiaoyu_cli.console import console
from tiaoyu_cli.data.synth import SynthConfig, write_corpus
from tiaoyu_cli.data.synth_bench import write_fact_bench

EXAMPLES = """
Examples:

  tiaoyu synth data/                                   # ~6 MB, about a second
  tiaoyu synth data/ --seed 1 --text-mb 8 --records 8000 --val-records 500
  tiaoyu synth data-en/ --lang en                      # English only (or zh)
"""


def register(app: typer.Typer) -> None:
    app.command(
        "synth",
        help="Write the bundled synthetic corpus (Chinese + English): a small fictional world whose "
        "facts the text states, with chat, preference, verifiable, reasoning and classification "
        "records and a held-out val split of each.\n\n"
        "Writes OUT/<kind>.train.jsonl and OUT/<kind>.val.jsonl for kind in text, chat, preference, "
        "verifiable, reasoning, classification, plus OUT/docs.jsonl (the world's documents, for tiaoyu index), "
        "OUT/rag.train.jsonl / OUT/rag.val.jsonl (questions with a retrieved passage), OUT/facts.val.jsonl "
        "(the same held-out questions without), OUT/world.json and OUT/manifest.json, and "
        "OUT/bench/ (a 4-choice benchmark of the held-out facts in the C-Eval CSV layout, for "
        "`tiaoyu eval bench --task ceval --style cloze`). "
        "The same seed writes byte-identical files.",
        epilog=EXAMPLES,
        no_args_is_help=True,
    )(synth)


def synth(
    out: Path = typer.Argument(..., help="Output folder (created if missing)."),
    seed: int = typer.Option(0, "--seed", help="Random seed; the same seed gives byte-identical files."),
    text_mb: float = typer.Option(4.0, "--text-mb", help="Size of text.train.jsonl in MB (text.val: 5% of that)."),
    records: int = typer.Option(4000, "--records", help="Train records per chat-like kind."),
    val_records: int = typer.Option(0, "--val-records", help="Val records per kind (0: a tenth of --records)."),
    lang: str = typer.Option("both", "--lang", help="both, en or zh."),
) -> None:

    from rich.table import Table


    cfg = SynthConfig(seed=seed, text_mb=text_mb, records=records, val_records=val_records or None, lang=lang)
    t0 = time.perf_counter()
    with console.status("generating the synthetic corpus…"):
        manifest = write_corpus(out, cfg)
        bench = write_fact_bench(out, cfg)
    table = Table(title=f"tiaoyu synth → {out}  (seed {seed}, {time.perf_counter() - t0:.1f} s)")
    table.add_column("file")
    table.add_column("kind")
    table.add_column("records", justify="right")
    table.add_column("MB", justify="right")
    for name, f in manifest["files"].items():
        table.add_row(name, f["kind"], f"{f['records']:,}", f"{f['bytes'] / 1e6:.2f}")
    console.print(table)
    wld = manifest["world"]
    console.print(
        f"world: {wld['entities']} entities, {wld['entity_facts']} entity facts "
        f"({wld['val_entity_facts']} held out), {wld['arith_facts']} arithmetic facts "
        f"({wld['val_arith_facts']} held out)"
    )
    console.print("bench/: held-out facts as 4-choice items (C-Eval layout): "
                  + ", ".join(f"{k} {n}" for k, n in bench.items()))
