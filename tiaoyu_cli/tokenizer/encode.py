"""Encode JSONL corpora into token shards, in parallel: `tiaoyu tokenize encode`.

The main process only reads bytes: it cuts each input into ~1 MB blocks at line ends and hands
them to a pool of worker processes. Each worker has loaded the tokenizer once; it parses its
block's JSON lines, picks each record's document text, encodes it and returns one flat array
`<s> doc </s> <s> doc </s> …` per split — with tiaoyu's own tokenizer; an open model's tokenizer puts
around each document what it does itself (`document_affixes`: Llama 3 `<|begin_of_text|> doc
<|end_of_text|>`, Qwen `doc <|endoftext|>`). The main process takes the results back
in input order (a bounded window of blocks in flight, so memory stays constant) and appends them
to the shard writers. Train/val: the record on global line k (0-based, over all inputs) goes to
val when round((k+1)·r) > round(k·r) — an even, deterministic spread of a fraction r.
"""

from __future__ import annotations

import collections
import contextlib
import gzip
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import orjson

from tiaoyu_cli.data import shards as S
from tiaoyu_cli.errors import TiaoyuError
from tiaoyu_cli.tokenizer import open_tokenizer
from tiaoyu_cli.tokenizer.text import RecordError, document_text

BLOCK_BYTES = 1 << 20
DEFAULT_SHARD_TOKENS = 1 << 26  # 64 Mi tokens = 128 MiB of uint16 per shard


@dataclass
class Block:
    path: str  # as shown in errors
    first_line: int  # 1-based line number of the block's first line in its file
    global_line: int  # 0-based line index over all inputs of the same split source
    data: bytes
    val_ratio: float  # 0: all train; 1: all val (a --val file); else the spread above


@dataclass
class BlockResult:
    train: np.ndarray
    val: np.ndarray
    train_docs: int = 0
    val_docs: int = 0
    empty: int = 0
    bad: int = 0
    nbytes: int = 0
    error: str | None = None


@dataclass
class EncodeReport:
    out: str = ""
    seconds: float = 0.0
    bytes_read: int = 0
    records: int = 0
    empty: int = 0
    skipped_bad: int = 0
    splits: dict = field(default_factory=dict)  # split -> {num_tokens, num_documents, shards}
    meta: dict = field(default_factory=dict)

    @property
    def mb_per_s(self) -> float:
        return self.bytes_read / 1e6 / self.seconds if self.seconds else 0.0


# ---------------------------------------------------------------------------- reading blocks
def open_binary(path: str):
    """A binary stream for a JSONL input: '-' is stdin, .gz is decompressed."""
    if path == "-":
        return sys.stdin.buffer
    p = Path(path)
    if not p.exists():
        raise TiaoyuError(f"{path}: no such file")
    if p.is_dir():
        raise TiaoyuError(f"{path}: is a folder, expected a JSONL file")
    return gzip.open(p, "rb") if path.endswith(".gz") else open(p, "rb")


def iter_blocks(paths: list[str], val_ratio: float, block_bytes: int | None = None) -> Iterator[Block]:
    """Cut inputs into blocks of whole lines, about `block_bytes` (default BLOCK_BYTES) each."""
    block_bytes = block_bytes or BLOCK_BYTES
    global_line = 0
    for path in paths:
        f = open_binary(path)
        shown = "<stdin>" if path == "-" else path
        line = 1
        carry: list[bytes] = []  # the unfinished last line (a list: a huge line is not copied again and again)
        try:
            while True:
                chunk = f.read(block_bytes)
                if not chunk:
                    break
                cut = chunk.rfind(b"\n")
                if cut < 0:
                    carry.append(chunk)
                    continue
                block = b"".join(carry + [chunk[:cut + 1]]) if carry else chunk[:cut + 1]
                carry = [chunk[cut + 1:]] if cut + 1 < len(chunk) else []
                n = block.count(b"\n")
                yield Block(shown, line, global_line, block, val_ratio)
                line += n
                global_line += n
            if carry:
                yield Block(shown, line, global_line, b"".join(carry), val_ratio)
                global_line += 1
        finally:
            if f is not sys.stdin.buffer:
                f.close()


# ---------------------------------------------------------------------------- worker side
_TOK = None  # the worker's tokenizer (either back-end)
_SKIP_BAD = False


def _init_worker(tokenizer_path: str, skip_bad: bool) -> None:
    global _TOK, _SKIP_BAD
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already: no thread pool in each
    _TOK = open_tokenizer(tokenizer_path)
    _SKIP_BAD = skip_bad
    try:  # a worker must not fight the main process over the terminal's Ctrl-C
        import signal

        signal.signal(signal.SIGINT, signal.SIG_IGN)
    except (ValueError, OSError):
        pass


def is_val(k: int, ratio: float) -> bool:
    """Whether global record line k goes to the validation split (even spread of `ratio`)."""
    if ratio <= 0:
        return False
    if ratio >= 1:
        return True
    return int((k + 1) * ratio + 0.5) > int(k * ratio + 0.5)


def join_docs(docs: list[list[int]], prefix: list[int], suffix: list[int], dtype) -> np.ndarray:
    """prefix doc suffix prefix doc suffix … as one array (prefix/suffix: `document_affixes()`)."""
    a, b = len(prefix), len(suffix)
    out = np.empty(sum(len(d) for d in docs) + (a + b) * len(docs), dtype=dtype)
    pos = 0
    for d in docs:
        out[pos:pos + a] = prefix
        n = len(d)
        out[pos + a:pos + a + n] = d
        out[pos + a + n:pos + a + n + b] = suffix
        pos += a + n + b
    return out


def encode_block(block: Block, tok=None, skip_bad: bool | None = None) -> BlockResult:
    """Parse, pick the text and encode one block. Errors come back as a message (not raised) so
    that they cross the process boundary intact."""
    tok = tok or _TOK
    skip_bad = _SKIP_BAD if skip_bad is None else skip_bad
    assert tok is not None, "worker not initialised"
    dtype = S.token_dtype(tok.vocab_size)
    texts: list[str] = []
    where: list[bool] = []  # True = val
    empty = bad = 0
    for i, line in enumerate(block.data.split(b"\n")):
        if not line.strip():
            continue
        lineno = block.first_line + i
        try:
            rec = orjson.loads(line)
            if not isinstance(rec, dict):
                raise RecordError(None, f"expected a JSON object, got {type(rec).__name__}")
            text = document_text(rec)
        except orjson.JSONDecodeError as e:
            if skip_bad:
                bad += 1
                continue
            msg = str(e)
            kind = "invalid UTF-8" if "utf-8" in msg.lower() else "malformed JSON"
            return BlockResult(np.empty(0, dtype), np.empty(0, dtype), error=f"{block.path}:{lineno}: {kind} ({msg})")
        except RecordError as e:
            if skip_bad:
                bad += 1
                continue
            fld = f"field '{e.field}': " if e.field else ""
            return BlockResult(np.empty(0, dtype), np.empty(0, dtype), error=f"{block.path}:{lineno}: {fld}{e.message}")
        if not text:
            empty += 1
            continue
        texts.append(text)
        where.append(is_val(block.global_line + i, block.val_ratio))
    ids = tok.encode_batch(texts, num_threads=1) if texts else []
    train = [d for d, v in zip(ids, where) if not v]
    val = [d for d, v in zip(ids, where) if v]
    prefix, suffix = tok.document_affixes()
    return BlockResult(
        join_docs(train, prefix, suffix, dtype),
        join_docs(val, prefix, suffix, dtype),
        train_docs=len(train), val_docs=len(val), empty=empty, bad=bad, nbytes=len(block.data),
    )


# ---------------------------------------------------------------------------- main side
def _results_in_order(blocks: Iterator[Block], tokenizer_path: str, workers: int, skip_bad: bool,
                      tok) -> Iterator[BlockResult]:
    if workers <= 1:
        for b in blocks:
            yield encode_block(b, tok, skip_bad)
        return
    import multiprocessing as mp

    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    pool = ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer_path, skip_bad))
    pending: collections.deque = collections.deque()
    try:
        for b in blocks:
            pending.append(pool.apply_async(encode_block, (b,)))
            if len(pending) >= 2 * workers:  # bounded window: constant memory, order kept
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


def _check_out(out: Path) -> None:
    if out.exists():
        if not out.is_dir():
            raise TiaoyuError(f"{out} exists and is not a folder")
        entries = list(out.iterdir())
        if entries and not (out / S.META_FILE).is_file():
            raise TiaoyuError(f"{out} already exists and is not a token folder; give -o a new or empty folder")


def encode_corpus(inputs: list[str], tokenizer: str | os.PathLike, out: str | os.PathLike, workers: int = 0,
                  val_ratio: float = 0.01, val_inputs: list[str] | None = None,
                  shard_tokens: int = DEFAULT_SHARD_TOKENS, skip_bad: bool = False,
                  on_progress: Callable[[int], None] | None = None, input_bytes: int | None = None) -> EncodeReport:
    """Encode JSONL `inputs` into `out`/train and `out`/val shards (see module docstring).

    `val_inputs` (a --val file) replaces the `val_ratio` split. `on_progress(nbytes)` is called as
    input bytes are done. The output folder is written atomically.
    """
    from tiaoyu_cli.io import atomic_dir

    if not inputs:
        raise TiaoyuError("no input: give JSONL files (or - for stdin)")
    if not 0 <= val_ratio < 1:
        raise TiaoyuError(f"--val-ratio must be in [0, 1), got {val_ratio}")
    if shard_tokens < 1:
        raise TiaoyuError("--shard-tokens must be at least 1")
    tok = open_tokenizer(tokenizer)
    prefix, suffix = tok.document_affixes()  # an open tokenizer that cannot separate documents fails here
    out = Path(out)
    _check_out(out)
    workers = workers if workers > 0 else (os.cpu_count() or 1)
    dtype = S.token_dtype(tok.vocab_size)
    report = EncodeReport(out=str(out))
    t0 = time.perf_counter()

    def all_blocks() -> Iterator[Block]:
        if val_inputs:
            yield from iter_blocks(list(inputs), 0.0)
            yield from iter_blocks(list(val_inputs), 1.0)
        else:
            yield from iter_blocks(list(inputs), val_ratio)

    common = {"format": S.FORMAT, "version": S.FORMAT_VERSION, "tokenizer_fingerprint": tok.fingerprint,
              "tokenizer": str(tok.path), "tokenizer_backend": tok.backend, "vocab_size": tok.vocab_size,
              "bos_id": tok.bos_id, "eos_id": tok.eos_id, "doc_prefix": prefix, "doc_suffix": suffix}
    with atomic_dir(out) as tmp:
        writers = {s: S.ShardWriter(tmp / s, dtype, shard_tokens) for s in S.SPLITS}
        results = _results_in_order(all_blocks(), str(tok.path), workers, skip_bad, tok)
        with contextlib.closing(results):  # closing: an error stops the worker pool at once
            for r in results:
                if r.error:
                    raise TiaoyuError(r.error)
                writers["train"].add(r.train, r.train_docs)
                writers["val"].add(r.val, r.val_docs)
                report.records += r.train_docs + r.val_docs + r.empty
                report.empty += r.empty
                report.skipped_bad += r.bad
                report.bytes_read += r.nbytes
                if on_progress:
                    on_progress(r.nbytes)
        if writers["train"].num_documents == 0:
            raise TiaoyuError(f"empty input: no documents to encode in {', '.join(inputs)}"
                              + (" (all of them went to val; lower --val-ratio)" if writers["val"].num_documents else ""))
        metas = {}
        for s, w in writers.items():
            if s == "val" and w.num_documents == 0:
                continue  # no val split: nothing is written for it
            metas[s] = w.close({**common, "split": s})
        report.seconds = time.perf_counter() - t0
        top = {**common, "dtype": dtype.name,
               "splits": {s: {k: m[k] for k in ("num_tokens", "num_documents", "shards")} for s, m in metas.items()},
               "sources": {"train": [str(p) for p in inputs], "val": [str(p) for p in (val_inputs or [])]},
               "val_ratio": 0.0 if val_inputs else val_ratio,
               "records": report.records, "empty_records": report.empty, "skipped_bad": report.skipped_bad,
               "input_bytes": report.bytes_read}
        (tmp / S.META_FILE).write_text(json.dumps(top, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
        report.meta = top
        report.splits = top["splits"]
    return report

