"""The per-record half of `tiaoyu prep`: parse, convert, clean, filter, serialise and hash — work that
needs nothing but the record itself, so it runs in worker processes (`--workers N`).

A *job* is a block of JSONL lines (the bytes with the number of its first line, or — from a plain
file with workers — where the block lies, numbered from 1 and renumbered by the parent), a list of plain-text documents, a batch of
parquet/Arrow rows (prep_arrow.py: the batch, its file and the number of its first row), or a block of `--merge` lines. `RecordCleaner.run(job)` turns it into a `BlockResult`:
the kept records in input order (kind, JSON line, 64-bit hash and, with --near-dup, the MinHash
band keys), the counts of what was dropped and why, and the first error, if any, after which the
block stops. Everything that depends on *other* records — exact and near dedup, the train/val
split, shuffling, writing — stays in the parent (prep.py), which consumes results in input order.
So the output is the same bytes for any number of workers, and dedup stays global and exact.

Profile of one worker (cProfile, 30 MB of bench_prep.py's corpus): per record ~85 µs, spread over
many small Python calls — format detection and conversion (~20 %), `clean_text` (~25 %), the
record bookkeeping itself, the BLAKE2b hash (~8 %), orjson parse + dump (~6 % together: the floor
the orjson round trip measures). No single hot spot: hence processes.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
from array import array
from collections import deque
from dataclasses import dataclass, field

import numpy as np
import orjson

from tiaoyu_cli.data import formats
from tiaoyu_cli.data.clean import CleanConfig, clean_text
from tiaoyu_cli.data.dedup import MinHashDedup, hash64
from tiaoyu_cli.data.prep_arrow import RowsError, arrow_rows

_DUMP = orjson.OPT_APPEND_NEWLINE
# canonical kinds by formats.detect's name of a prep output record (--merge reads only those)
_MERGE_KINDS = {k: k for k in formats.KINDS}
_KIND_CODE = {k: i for i, k in enumerate(formats.KINDS)}


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class Stop(Exception):
    """The block hit an error: stop it there (the parent raises it in input order)."""


@dataclass
class BlockResult:
    """What a job gives back. Built as lists; `RecordCleaner.finish` packs the kept records into a
    few flat buffers (one blob of lines, offsets, hashes, kind codes), which cross the process
    boundary at memcpy speed instead of one object per record."""

    kinds: list[str] | bytes = field(default_factory=list)  # packed: one byte per record, index in KINDS
    lines: list[bytes] = field(default_factory=list)  # emptied by finish (see blob)
    hashes: list[int] | array = field(default_factory=list)  # packed: array('Q')
    blob: bytes = b""  # the kept lines, joined
    offsets: array = field(default_factory=lambda: array("Q"))  # line i is blob[offsets[i]:offsets[i + 1]]
    band_keys: np.ndarray | None = None  # (records, bands) uint64, with --near-dup
    val: bytes | None = None  # with --split: 1 where the record goes to val (hash and --seed decide)
    read: int = 0  # records seen (kept here, dropped here, or bad)
    drops: dict[str, int] = field(default_factory=dict)
    error: tuple | None = None  # DataError(*error): message, path, line, field
    texts: list[str] = field(default_factory=list)  # for near-dup; emptied by finish
    # a block the worker read itself knows its lines only from 1: the parent adds the lines before it
    source: int | None = None  # the parent's number for the input (set when the line numbers are relative)
    newlines: int = 0  # lines in the block (relative blocks only)


class RecordCleaner:
    """Stateless per record (no dedup here): the same input gives the same BlockResult anywhere."""

    def __init__(self, cfg):
        self.cfg = cfg
        self.clean_cfg = CleanConfig(nfkc=cfg.nfkc, collapse_whitespace=cfg.collapse_whitespace)
        self.minhash = MinHashDedup(cfg.near_dup_threshold, seed=cfg.seed) if cfg.near_dup else None
        self.text_fast = cfg.to in (None, "text")
        self.val_cut = int(cfg.val_frac * (1 << 64))
        self.seed_mix = splitmix64(cfg.seed & 0xFFFFFFFFFFFFFFFF)

    # ----- jobs ------------------------------------------------------------------------------

    def run(self, job: tuple) -> BlockResult:
        kind = job[0]
        res = BlockResult()
        try:
            if kind in ("jsonl", "merge"):
                block = job[1] if isinstance(job[1], bytes) else read_range(job[2], *job[1])
                lineno = job[3]
                if lineno is None:  # (kind, (offset, length), path, None, source): numbered by the parent
                    res.source, res.newlines, lineno = job[4], block.count(b"\n"), 1
                (self.jsonl_block if kind == "jsonl" else self.merge_block)(block, job[2], lineno, res)
            elif kind == "arrow":  # (kind, batch or its IPC bytes, file, first row, rows)
                self.arrow_batch(job[1], job[2], job[3], job[4], res)
            else:  # "text": documents already cut by the parent
                for doc in job[1]:
                    self.add_record("text", {"text": doc}, res)
        except Stop:
            pass
        return self.finish(res)

    def finish(self, res: BlockResult) -> BlockResult:
        if self.minhash is not None:
            res.band_keys = self.minhash.band_keys(self.minhash.signatures(res.texts)) if res.texts else None
        res.texts = []
        if self.val_cut:
            mix, cut = self.seed_mix, self.val_cut
            res.val = bytes(splitmix64(h ^ mix) < cut for h in res.hashes)
        res.hashes = array("Q", res.hashes)
        res.kinds = bytes(_KIND_CODE[k] for k in res.kinds)
        res.offsets = array("Q", [0])
        total = 0
        for line in res.lines:
            total += len(line)
            res.offsets.append(total)
        res.blob, res.lines = b"".join(res.lines), []
        return res

    def fail(self, res: BlockResult, message: str, path: str, line: int | None, fld: str | None = None):
        res.error = (message, path, line, fld)
        raise Stop

    def bad(self, res: BlockResult, message: str, path: str, line: int | None, fld: str | None = None) -> None:
        """A bad record: an error naming file, line and field, or (--skip-bad) a counted drop."""
        if not self.cfg.skip_bad:
            self.fail(res, message, path, line, fld)
        self.drop(res, "bad record")

    @staticmethod
    def drop(res: BlockResult, reason: str) -> None:
        res.read += 1
        res.drops[reason] = res.drops.get(reason, 0) + 1

    def decode_error(self, res: BlockResult, raw: bytes, e: UnicodeDecodeError, path: str, lineno: int) -> str | None:
        """Apply --errors to a line with invalid UTF-8: the replaced text, None (skip), or an error."""
        if self.cfg.errors == "replace":
            return raw.decode("utf-8", errors="replace")
        if self.cfg.errors == "skip":
            return None
        self.fail(res, f"invalid UTF-8 at byte {e.start} of the line ({e.reason}); use --errors replace or skip",
                  path, lineno)
        return None

    def parse_line(self, res: BlockResult, b: bytes, path: str, lineno: int):
        """The JSON object of one line, or None when it was dropped (counted) or skipped as bad."""
        try:
            obj = orjson.loads(b)
        except orjson.JSONDecodeError as e:
            try:
                b.decode("utf-8")
            except UnicodeDecodeError as ue:
                text = self.decode_error(res, b, ue, path, lineno)
                if text is None:
                    self.drop(res, "invalid UTF-8")
                    return None
                try:
                    obj = orjson.loads(text)
                except orjson.JSONDecodeError as e2:
                    self.bad(res, f"malformed JSON ({e2})", path, lineno)
                    return None
            else:
                self.bad(res, f"malformed JSON ({e})", path, lineno)
                return None
        if not isinstance(obj, dict):
            self.bad(res, f"expected a JSON object, got {formats._type_name(obj)}", path, lineno)
            return None
        return obj

    def jsonl_block(self, block: bytes, path: str, lineno: int, res: BlockResult) -> None:
        for i, b in enumerate(block.split(b"\n")):
            if not b.strip():
                continue
            obj = self.parse_line(res, b, path, lineno + i)
            if obj is not None:
                self.add_json(obj, path, lineno + i, res)

    def arrow_batch(self, batch, path: str, first: int, n: int, res: BlockResult) -> None:
        """Rows of a parquet/Arrow file, read like JSONL records; errors name the row (from 0)."""
        try:
            rows = arrow_rows(batch)
        except RowsError as e:
            self.fail(res, str(e), f"{path}: rows {first}–{first + n - 1}", None)
        for i, obj in enumerate(rows):
            self.add_json(obj, f"{path}: row {first + i}", None, res)

    def merge_block(self, block: bytes, path: str, lineno: int, res: BlockResult) -> None:
        """--merge: lines that prep wrote (any canonical kind) pass unchanged but re-serialised, so
        that equal records hash equally; nothing is cleaned or filtered again."""
        for i, b in enumerate(block.split(b"\n")):
            if not b.strip():
                continue
            obj = self.parse_line(res, b, path, lineno + i)
            if obj is None:
                continue
            try:
                kind = _MERGE_KINDS.get(formats.detect(obj))
            except formats.FormatError as e:
                kind, msg = None, str(e)
            else:
                msg = "not a record that tiaoyu prep writes (run tiaoyu prep on this file first)"
            if kind is None:
                self.bad(res, msg, path, lineno + i)
                continue
            res.read += 1
            self.keep(res, kind, orjson.dumps(obj, option=_DUMP),
                      formats.record_text(kind, obj) if self.minhash is not None else "")

    # ----- records ---------------------------------------------------------------------------

    def add_json(self, obj: dict, path: str, line: int | None, res: BlockResult) -> None:
        if self.text_fast and len(obj) == 1:  # the bulk of pretraining data: {"text": "…"}
            t = obj.get("text")
            if type(t) is str and not ("<s>" in t and "</s>" in t):
                return self.add_record("text", obj, res)
        try:
            kind, recs = formats.convert(obj, self.cfg.to)
        except formats.FormatError as e:
            return self.bad(res, str(e), path, line, e.field)
        for rec in recs:
            self.add_record(kind, rec, res)

    def add_record(self, kind: str, rec: dict, res: BlockResult) -> None:
        cfg = self.cfg
        if kind == "text":
            text = clean_text(rec["text"], self.clean_cfg)
            rec = {"text": text}
            if not text.strip():
                return self.drop(res, "empty")
        else:
            rec = formats.map_strings(kind, rec, lambda s: clean_text(s, self.clean_cfg))
            if formats.empty_part(kind, rec):
                return self.drop(res, "empty")
            text = formats.record_text(kind, rec)
            if kind == "preference" and rec["chosen"] == rec["rejected"]:
                return self.drop(res, "chosen = rejected")
        n = len(text)
        if n < cfg.min_chars:
            return self.drop(res, "too short")
        if cfg.max_chars and n > cfg.max_chars:
            return self.drop(res, "too long")
        res.read += 1
        self.keep(res, kind, orjson.dumps(rec, option=_DUMP), text)

    def keep(self, res: BlockResult, kind: str, line: bytes, text: str) -> None:
        res.kinds.append(kind)
        res.lines.append(line)
        res.hashes.append(hash64(line))
        if self.minhash is not None:
            res.texts.append(text)


# ----- worker processes ------------------------------------------------------------------------


def read_range(path: str, offset: int, length: int) -> bytes:
    """The bytes [offset, offset + length) of a file (a block the parent located)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        data = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    if len(data) != length:
        raise OSError(f"{path}: the file changed while prep was reading it")
    return data

class Workers:
    """N worker processes, each with its own socket pair. The parent sends a job to the worker with
    the fewest jobs not yet done (so a worker sharing its core with the parent, or with another
    program, gets fewer), and takes the results in submission order: each ticket knows its worker,
    and a worker's results come back in the order it got its jobs. multiprocessing.Pool does the
    same through shared queues, cross-process locks and three handler threads in the parent, whose
    GIL hand-offs and wake-ups cost the parent about a third of its CPU (benchmarks/RESULTS.md).

    A worker never stops reading jobs (a thread drains its socket into a queue), so a parent sending a
    large job (a block of a gzip file or of stdin) cannot block against a worker that is blocked
    sending its result back. A worker that raises sends the exception (raised again here, in input
    order); one that dies is reported with its exit code."""

    def __init__(self, cfg, n: int):
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        ctx = multiprocessing.get_context(method)
        self.n = n
        self.procs, self.conns = [], []
        self.waiting: list[deque] = [deque() for _ in range(n)]  # per worker: tickets without a result, in order
        for _ in range(n):
            mine, theirs = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=_worker_main, args=(theirs, cfg), daemon=True, name="tiaoyu-prep-worker")
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(mine)

    def collect(self) -> None:
        """Take the results that are ready, so that `waiting` counts jobs not yet done."""
        for i in range(self.n):
            while self.waiting[i] and self.conns[i].poll():
                self._receive(i)

    def submit(self, job: tuple) -> _Ticket:
        self.collect()
        i = min(range(self.n), key=lambda k: len(self.waiting[k]))
        ticket = _Ticket(self, i)
        self.waiting[i].append(ticket)
        try:
            self.conns[i].send(job)
        except OSError:
            pass  # the worker died: the ticket's get() says so
        return ticket

    def has_room(self, depth: int = 2) -> bool:
        """Is some worker left with fewer than `depth` jobs to do (so it could go idle)?"""
        self.collect()
        return min(len(w) for w in self.waiting) < depth

    def wait_any(self) -> None:
        """Block until some worker sends a result; take it (and any other that came)."""
        busy = [self.conns[i] for i in range(self.n) if self.waiting[i]]
        if not busy:
            return
        ready = multiprocessing.connection.wait(busy)
        for i, conn in enumerate(self.conns):
            if conn in ready:
                self._receive(i)

    def _receive(self, i: int) -> None:
        ticket = self.waiting[i].popleft()
        try:
            ticket.result = self.conns[i].recv()
        except (EOFError, OSError):
            proc = self.procs[i]
            proc.join(timeout=5)
            ticket.result = ("error", RuntimeError(
                f"a prep worker process died (exit code {proc.exitcode}); if it ran out of memory, use fewer --workers"))

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self.procs:
            proc.join(timeout=5)


class _Ticket:
    """The promise of one job's result."""

    __slots__ = ("i", "result", "workers")

    def __init__(self, workers: Workers, i: int):
        self.workers, self.i, self.result = workers, i, None

    def ready(self) -> bool:
        return self.result is not None

    def get(self) -> BlockResult:
        while self.result is None:
            self.workers._receive(self.i)
        status, value = self.result
        self.result = None  # let the result go once it is consumed
        if status == "error":
            raise value
        return value


def _worker_main(conn, cfg) -> None:
    """A worker: one thread reads jobs, one sends results, the main thread cleans. Neither direction
    waits for the other, and the cleaning never waits for the parent to read a result (a result is
    larger than a socket's buffer)."""
    import queue
    import signal
    import threading
    from multiprocessing.reduction import ForkingPickler

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle: it ends us
    cleaner = RecordCleaner(cfg)
    jobs: queue.SimpleQueue = queue.SimpleQueue()
    results: queue.SimpleQueue = queue.SimpleQueue()

    def reader() -> None:
        try:
            while True:
                jobs.put(conn.recv())
        except (EOFError, OSError):
            jobs.put(None)

    def sender() -> None:
        try:
            while (data := results.get()) is not None:
                conn.send_bytes(data)
        except (EOFError, OSError):  # the parent has gone
            jobs.put(None)

    threading.Thread(target=reader, daemon=True).start()
    out = threading.Thread(target=sender, daemon=True)
    out.start()
    while (job := jobs.get()) is not None:
        try:
            msg = ("ok", cleaner.run(job))
        except Exception as e:  # noqa: BLE001 - the parent raises it where the block's result was due
            try:
                pickle.loads(pickle.dumps(e))
            except Exception:  # an exception that does not survive pickling: its text does
                e = RuntimeError(f"{type(e).__name__}: {e}")
            msg = ("error", e)
        results.put(ForkingPickler.dumps(msg))
    results.put(None)
    out.join()
