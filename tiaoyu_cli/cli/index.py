"""`tiaoyu index`: build a BM25 index over JSONL documents, or query one.

    tiaoyu index data/docs.jsonl -o index/                    # build (passages of ≤ 500 characters)
    tiaoyu index notes.jsonl --field body --chunk-chars 300 -o index/
    tiaoyu index --query "王丽住在哪里？" index/                # top passages with their scores
    tiaoyu index --query "Where does Kamiro live?" data/docs.jsonl -k 5   # JSONL: indexed in memory

The library is tiaoyu_cli/data/retrieval.py (analyzer, passages, folder layout); `chat --retrieve`
uses the same index.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import List, Optional

import typer

from tiaoyu_cli.errors import TiaoyuError

EXAMPLES = """
Examples:

  tiaoyu index data/docs.jsonl -o index/

  tiaoyu index a.jsonl b.jsonl --field body --chunk-chars 300 -o index/

  tiaoyu index --query "王丽住在哪里？" index/

  tiaoyu index --query "Where does Kamiro live?" index/ -k 5 --json
"""


def register(app: typer.Typer) -> None:
    @app.command("index", epilog=EXAMPLES,
                 help="Build a BM25 index (Chinese char uni/bigrams + lower-cased words) over JSONL documents, "
                 "or print the top passages for --query.")
    def index(
        sources: List[Path] = typer.Argument(..., help="JSONL documents (build), or an index folder / JSONL files (--query)"),
        out: Optional[Path] = typer.Option(None, "-o", "--out", help="index folder to write (replaced atomically)"),
        field: str = typer.Option("text", "--field", help="JSONL field holding the document text"),
        chunk_chars: int = typer.Option(500, "--chunk-chars", help="split longer documents into passages of at most this many characters"),
        query: Optional[str] = typer.Option(None, "--query", "-q", help="search instead of building: print the top passages"),
        k: int = typer.Option(3, "-k", "--top-k", help="passages to print with --query"),
        json_out: bool = typer.Option(False, "--json", help="with --query: one JSON line per passage {score, id, text}"),
    ) -> None:
        from tiaoyu_cli.console import console
        from tiaoyu_cli.data.retrieval import build_index, open_retriever

        if query is not None:
            if out is not None:
                raise TiaoyuError("--query searches an index; it writes nothing (drop -o)")
            if k < 1:
                raise TiaoyuError(f"-k must be >= 1, got {k}")
            r = open_retriever([str(s) for s in sources], field, chunk_chars)
            results = r.search(query, k)
            if json_out:
                from tiaoyu_cli.data.jsonl import dumps

                for score, doc, text in results:
                    sys.stdout.buffer.write(dumps({"score": round(score, 4), "id": doc, "text": text}))
                sys.stdout.flush()
                return
            if not results:
                console.print("no passage matches the query", highlight=False)
            for i, (score, doc, text) in enumerate(results, 1):
                print(f"{i}. [{score:.3f}] {doc}\n{text}\n")
            return
        if out is None:
            raise TiaoyuError("where to write the index? -o index/ (or --query TEXT to search one)")
        t0 = time.perf_counter()
        r = build_index([str(s) for s in sources], field, chunk_chars)
        r.save(out)
        docs = len({p.doc_id for p in r.passages})
        console.print(f"index → {out}: {len(r):,} passages from {docs:,} documents "
                      f"({time.perf_counter() - t0:.1f} s)", highlight=False)
