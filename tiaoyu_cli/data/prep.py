"""`tiaoyu prep`: raw files in, clean JSONL records of one of the five kinds out.

    tiaoyu prep raw/ > data.jsonl
    tiaoyu prep a.jsonl b.json.gz notes/*.md --near-dup --shuffle --split val=0.01 -o data/
    tiaoyu prep big/ --workers 8 -o data.jsonl                    # same bytes as --workers 1
    tiaoyu prep big/ --shard 3/16 -o part-03.jsonl                # one task of a cluster job array
    tiaoyu prep --merge part-*.jsonl --near-dup -o data.jsonl     # dedup across the shards

Pipeline, one record at a time (streaming):

    inputs ─▶ read (files, folders, globs, '-') ─▶ detect + convert (formats.py)
           ─▶ clean every string (clean.py) ─▶ drop empty / too short / too long
           ─▶ exact dedup, near-dup (dedup.py) ─▶ train/val split ─▶ (shuffle.py) ─▶ write

Inputs. Paths may be files, folders (walked recursively in sorted order; hidden files and
folders are skipped), glob patterns (`raw/**/*.txt`) and `-` for stdin. By file name (a
trailing `.gz` is decompressed first): `.jsonl`/`.ndjson` are JSON Lines; `.json` is a JSON
array of records, one record object, an object holding one list of records, or JSON Lines
misnamed `.json` (a .json file is parsed whole, so keep very large data in JSONL); everything
else (`.txt`, `.md`, no extension, ...) is plain text, split into documents at blank lines, or
at lines equal to `--separator` (e.g. `%`, fortune-file style) in which case blank lines stay
inside documents. Stdin is sniffed: JSON Lines if its first line is a JSON object, a JSON array
if it starts with `[`, plain text otherwise. A file whose first 8 KB hold a NUL byte or are
mostly non-text is binary: skipped and counted. `.parquet` and `.arrow` files and `datasets`'
save_to_disk folders are read in record batches with pyarrow, their rows as the records (prep_arrow.py).

Records. Everything is read as one of the kinds text / chat / preference / verifiable /
classification (see formats.py for the formats recognised); `--to KIND` forces one.

Memory. Constant in the input size: lines are streamed; exact dedup keeps 16 bytes per
distinct record (dedup.py); near-dup keeps about 16 bytes per band per kept record; the
shuffle holds one 32 MB run and spills the rest to temp files (shuffle.py); a plain-text
document stops growing past 4 × --max-chars raw characters (it is then dropped as too long).

Split. With `--split val=F`, a record goes to val when a hash of its content and `--seed`
falls below F: the same record always lands in the same split, whatever the input order.

Workers. `--workers N` runs the per-record work (parse, convert, clean, filter, serialise,
hash: prep_records.py) in N processes over blocks of input lines; the parent keeps everything
that depends on other records — exact dedup on the 64-bit hashes, near-dup decisions on the
band keys the workers computed, the split, the shuffle, the writes — and takes the blocks'
results in input order. The output is byte-identical to one worker's; dedup stays global.
`.json` files are parsed by the parent; plain-text documents are cut by the parent and cleaned
by the workers.

Shards and merge. `--shard I/N` reads only the I-th of N slices of the inputs (prep_io.py says
how they are cut). `--merge` reads files that prep wrote and passes their records through
unchanged except for dedup (exact, and near with --near-dup) across all of them, the split
and the shuffle; merging the N shard outputs in shard order gives the output of one run over
everything with exact dedup; with --near-dup it may drop a few more (a chain a ≈ b ≈ c whose
links straddle shards). Shuffle after merging.

Failure. A malformed line, a wrong field type, an unknown format, invalid UTF-8 (with
`--errors strict`), an empty input or a missing path raises a DataError naming the file, the
line and the field; output files are written atomically, so nothing partial is left behind
(when stdout is a regular file it is truncated back; a pipe has already passed the records
on). `--skip-bad` drops bad records and counts them instead. Invalid UTF-8 follows
`--errors`: strict (error), replace (U+FFFD), skip (drop the record or document).
"""

from __future__ import annotations

import contextlib
import gzip
import io
import itertools
import os
import sys
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np
import orjson

from tiaoyu_cli.data import formats
from tiaoyu_cli.data.dedup import MinHashDedup, U64Set
from tiaoyu_cli.data.prep_arrow import arrow_jobs, is_arrow_file
from tiaoyu_cli.data.prep_io import (JSONL_SUFFIXES, Source, StdoutSink, base_name, expand_inputs, is_binary,
                                     iter_blocks, locate_blocks, output_paths, plan_shard, seek_line_start)
from tiaoyu_cli.data.prep_records import BlockResult, RecordCleaner, Stop, Workers
from tiaoyu_cli.data.shuffle import ExternalShuffle
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.io import atomic_files

__all__ = ["PrepConfig", "PrepStats", "Prep", "run_prep", "output_paths", "expand_inputs"]

DROP_REASONS = ("empty", "too short", "too long", "chosen = rejected", "duplicate", "near-duplicate",
                "bad record", "invalid UTF-8")


@dataclass
class PrepConfig:
    to: str | None = None  # force this kind (formats.KINDS)
    nfkc: bool = False
    collapse_whitespace: bool = True
    min_chars: int = 1  # records with fewer characters (all strings together) are dropped
    max_chars: int = 1_000_000  # 0 = no limit
    separator: str | None = None  # plain text: a line equal to this (stripped) separates documents
    dedup: bool = True
    near_dup: bool = False
    near_dup_threshold: float = 0.8
    shuffle: bool = False
    seed: int = 0
    val_frac: float = 0.0
    errors: str = "strict"  # strict | replace | skip
    skip_bad: bool = False
    shuffle_budget_mb: float = 32.0
    workers: int = 1  # processes for the per-record work (0 = one per core)
    shard: tuple[int, int] | None = None  # (I, N): read only the I-th of N slices of the inputs
    merge: bool = False  # inputs are prep outputs: dedup / split / shuffle them, nothing else
    block_bytes: int = 1 << 20  # JSONL bytes per job

    def check(self) -> None:
        if self.to is not None and self.to not in formats.KINDS:
            raise TiaoyuError(f"--to must be one of {', '.join(formats.KINDS)}, not {self.to!r}")
        if self.errors not in ("strict", "replace", "skip"):
            raise TiaoyuError(f"--errors must be strict, replace or skip, not {self.errors!r}")
        if not 0.0 <= self.val_frac < 1.0:
            raise TiaoyuError(f"--split val fraction must be in [0, 1), not {self.val_frac}")
        if self.min_chars < 0 or self.max_chars < 0 or (self.max_chars and self.max_chars < self.min_chars):
            raise TiaoyuError("--min-chars/--max-chars: need 0 <= min <= max (max 0 = no limit)")
        if not 0.0 < self.near_dup_threshold < 1.0:
            raise TiaoyuError("--near-dup-threshold must be between 0 and 1")
        if self.separator is not None and not self.separator.strip():
            raise TiaoyuError("--separator must be a non-blank line such as '%' (blank lines split by default)")
        if self.workers < 0:
            raise TiaoyuError(f"--workers must be 0 (one per core) or more, not {self.workers}")
        if self.shard is not None and not (self.shard[1] >= 1 and 0 <= self.shard[0] < self.shard[1]):
            raise TiaoyuError(f"--shard I/N needs 0 <= I < N, got {self.shard[0]}/{self.shard[1]}")
        if self.merge and self.to is not None:
            raise TiaoyuError("--merge passes prep's records through as they are: --to does not apply")
        if self.block_bytes < 1:
            raise TiaoyuError("block_bytes must be positive")


@dataclass
class PrepStats:
    files: int = 0
    binary: list[str] = field(default_factory=list)
    bytes_in: int = 0
    read: int = 0
    kept_train: int = 0
    kept_val: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: {r: 0 for r in DROP_REASONS})
    kinds: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    outputs: list[str] = field(default_factory=list)
    workers: int = 1

    @property
    def kept(self) -> int:
        return self.kept_train + self.kept_val


class _Done:
    """A result computed in this process, queued like a worker's so that the order holds."""

    def __init__(self, res: BlockResult):
        self.res = res

    def get(self) -> BlockResult:
        return self.res

    def ready(self) -> bool:
        return True


class Prep:
    """One run of `tiaoyu prep`. Use `run_prep()`; this class holds the state of the stream: it reads
    the inputs into jobs, sends them to the workers (or runs them here), and consumes the results
    in input order — global dedup, near-dup, split, writes."""

    def __init__(self, cfg: PrepConfig, on_progress: Callable[[int], None] | None = None, pool=None):
        cfg.check()
        self.cfg = cfg
        self.stats = PrepStats()
        self.cleaner = RecordCleaner(cfg)
        self.seen = U64Set() if cfg.dedup else None
        self.near = MinHashDedup(cfg.near_dup_threshold, seed=cfg.seed) if cfg.near_dup else None
        self.on_progress = on_progress
        self._done_bytes = 0
        self.pool = pool
        self.pending: deque = deque()  # results (or promises of them) in input order
        self._next_line: dict[int, int] = {}  # input number → the number of the next line to consume
        self.max_pending = 2 * pool.n + 8 if pool is not None else 0  # results held at most (~1–2 MB each)
        self.write_train: Callable[[list[bytes]], None] = lambda lines: None  # lines in output order
        self.write_val: Callable[[list[bytes]], None] = lambda lines: None

    # ----- jobs and results, in input order ---------------------------------------------

    def submit(self, job: tuple) -> None:
        if self.pool is None:
            self.pending.append(_Done(self.cleaner.run(job)))
        else:
            self.pending.append(self.pool.submit(job))
        self._bound()

    def local(self, fn: Callable[[BlockResult], None]) -> None:
        """Run `fn(result)` with this process's cleaner (for .json files) and queue the result."""
        res = BlockResult()
        try:
            fn(res)
        except Stop:
            pass
        self.pending.append(_Done(self.cleaner.finish(res)))
        self._bound()

    def _bound(self) -> None:
        """Consume what is ready, in order. Without workers, at once; with workers, block only while
        every worker has its next job queued (or too many results wait for an earlier one), so that a
        worker whose jobs are done never waits for the slowest worker's oldest block."""
        pending, pool = self.pending, self.pool
        if pool is None:
            while pending:
                self.consume(pending.popleft().get())
            return
        while True:
            while pending and pending[0].ready():
                self.consume(pending.popleft().get())
            if not pending or (len(pending) <= self.max_pending and pool.has_room()):
                return
            pool.wait_any()

    def drain(self) -> None:
        while self.pending:
            self.consume(self.pending.popleft().get())

    def fail(self, message: str, path: str, line: int | None = None, fld: str | None = None):
        """An error found by the parent: earlier records (and their errors) come first."""
        self.drain()
        raise DataError(message, path, line, fld)

    def consume(self, res: BlockResult) -> None:
        """Decide a block's records in input order: global exact dedup (one numpy pass over the
        hashes), near-dup on the band keys, then the split the worker worked out; write."""
        st = self.stats
        if res.source is not None:  # a block a worker read itself: number its lines here
            base = self._next_line[res.source] - 1
            self._next_line[res.source] += res.newlines
            if res.error is not None and res.error[2] is not None:
                msg, path, line, fld = res.error
                res.error = (msg, path, line + base, fld)
        st.read += res.read
        for reason, n in res.drops.items():
            st.dropped[reason] += n
        n = len(res.hashes)
        if n:
            keep = self.seen.add_many(res.hashes) if self.seen is not None else np.ones(n, dtype=bool)
            st.dropped["duplicate"] += n - int(keep.sum())
            if self.near is not None:
                dup = self.near.check_keys(res.band_keys[keep].tolist())  # type: ignore[index]
                idx = np.nonzero(keep)[0]
                keep[idx[np.array(dup, dtype=bool)]] = False
                st.dropped["near-duplicate"] += sum(dup)
            for code, c in enumerate(np.bincount(np.frombuffer(res.kinds, dtype=np.uint8)[keep],
                                                 minlength=len(formats.KINDS)).tolist()):
                if c:
                    st.kinds[formats.KINDS[code]] = st.kinds.get(formats.KINDS[code], 0) + c
            val = np.frombuffer(res.val, dtype=bool) if res.val is not None else None
            train = keep & ~val if val is not None else keep
            st.kept_train += int(train.sum())
            self.write_train(_pieces(res, train))
            if val is not None and (keep & val).any():
                st.kept_val += int((keep & val).sum())
                self.write_val(_pieces(res, keep & val))
        if res.error is not None:
            raise DataError(*res.error)

    def drop(self, reason: str) -> None:
        self.stats.read += 1
        self.stats.dropped[reason] += 1

    # ----- reading -----------------------------------------------------------------------

    def _progress(self, n: int) -> None:
        if self.on_progress is not None:
            self.on_progress(self._done_bytes + n)

    def read_source(self, src: Source) -> None:
        st = self.stats
        st.files += 1
        first = "jsonl" if self.cfg.merge else "sniff"
        if src.path == "-":
            stdin: BinaryIO = sys.stdin.buffer
            if stdin.peek(2)[:2] == b"\x1f\x8b":  # gzip magic: `zcat`-free pipes work too
                stdin = gzip.GzipFile(fileobj=stdin, mode="rb")  # type: ignore[assignment]
            try:
                self._read_stream(stdin, "-", first, raw=None)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                self.fail(f"not a valid gzip stream ({e})", "-")
            return
        if src.dataset or is_arrow_file(src.path):
            return self._read_arrow(src)
        name = base_name(src.path)
        mode = "jsonl" if self.cfg.merge or name.endswith(JSONL_SUFFIXES) else "json" if name.endswith(".json") else "text"
        size = (src.end - src.start) if src.end is not None else (src.size or 0)
        with open(src.path, "rb") as raw:
            if src.end is not None:  # a slice of a JSONL file (--shard)
                if is_binary(raw.peek(8192)[:8192]):
                    st.binary.append(src.path)
                else:
                    pos, lineno = seek_line_start(raw, src.start)
                    if self.pool is not None:
                        self._read_ranges(raw, src.path, pos, src.end, lineno)
                        return self._finish_source(size)
                    self._read_jsonl(iter_blocks(raw, self.cfg.block_bytes, b"", lineno, pos, src.end), src.path, raw)
            else:
                if src.path.lower().endswith(".gz"):
                    f: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
                else:
                    f = raw
                try:
                    self._read_stream(f, src.path, mode, raw=raw)
                except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                    self.fail(f"not a valid gzip file ({e})", src.path)
        self._finish_source(size)

    def _finish_source(self, size: int) -> None:
        self.stats.bytes_in += size
        self._done_bytes += size
        self._progress(0)

    def _read_arrow(self, src: Source) -> None:
        """Parquet, Arrow or a datasets folder: batches of rows as jobs (prep_arrow.py)."""
        if self.cfg.merge:
            raise TiaoyuError(f"{src.path}: --merge reads the JSONL files prep wrote, not parquet or Arrow data")
        try:
            for job, done in arrow_jobs(src.path, src.dataset, pack=self.pool is not None):
                self.submit(job)
                self._progress(int(done * (src.size or 0)))
        except DataError:
            self.drain()  # the errors of earlier rows come first
            raise
        self._finish_source(src.size or 0)

    def _read_stream(self, f: BinaryIO, path: str, mode: str, raw: BinaryIO | None) -> None:
        sample = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
        if is_binary(sample):
            self.stats.binary.append(path)
            return
        head: list[bytes] = []
        if mode == "sniff":
            for b in f:
                head.append(b)
                if b.strip():
                    break
            first = head[-1].lstrip() if head else b""
            if first.startswith(b"["):
                mode = "json"
            elif first.startswith(b"{"):
                try:
                    orjson.loads(first)
                    mode = "jsonl"
                except orjson.JSONDecodeError:
                    mode = "json"
            else:
                mode = "text"
        if mode == "jsonl" and raw is not None and f is raw and self.pool is not None:
            self._read_ranges(raw, path, 0, os.fstat(raw.fileno()).st_size, 1)
        elif mode == "jsonl":
            self._read_jsonl(iter_blocks(f, self.cfg.block_bytes, b"".join(head)), path, raw)
        elif mode == "json":
            self._read_json(b"".join(head) + f.read(), path)
        else:
            self._read_text(itertools.chain(head, f), path, raw)

    def _read_ranges(self, raw: BinaryIO, path: str, start: int, end: int, lineno: int) -> None:
        """A plain JSONL file with workers: the parent only finds where blocks of whole lines end
        (prep_io.locate_blocks); each worker reads its block and counts its lines, and `consume`
        numbers them — so the parent reads no byte of the data and sends none through a pipe."""
        job = "merge" if self.cfg.merge else "jsonl"
        key = len(self._next_line)
        self._next_line[key] = lineno
        for off, length in locate_blocks(raw, self.cfg.block_bytes, start, end):
            self.submit((job, (off, length), path, None, key))
            self._progress(off + length - start)

    def _read_jsonl(self, blocks: Iterable[tuple[bytes, int]], path: str, raw: BinaryIO | None) -> None:
        """Blocks → jobs (bytes and the number of the block's first line)."""
        job = "merge" if self.cfg.merge else "jsonl"
        counted = 0
        for block, lineno in blocks:
            self.submit((job, block, path, lineno))
            counted += len(block)
            self._progress(raw.tell() if raw is not None else counted)
        if raw is None and path == "-":  # stdin has no size on disk: count what passed
            self.stats.bytes_in += counted

    def _read_json(self, data: bytes, path: str) -> None:
        stripped = data.lstrip()
        if not stripped:
            return
        if stripped.startswith(b"{"):  # one object — or JSON Lines named .json
            first, _, rest = stripped.partition(b"\n")
            if rest.strip():
                try:
                    obj = orjson.loads(first)
                except orjson.JSONDecodeError:
                    obj = None
                if isinstance(obj, dict):
                    return self._read_jsonl(iter_blocks(io.BytesIO(data), self.cfg.block_bytes), path, None)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as ue:
            if self.cfg.errors == "strict":
                line = data.count(b"\n", 0, ue.start) + 1
                self.fail(f"invalid UTF-8 ({ue.reason}); use --errors replace or skip", path, line)
            if self.cfg.errors == "skip":  # a whole .json document is one unit
                self.drop("invalid UTF-8")
                return
            data = data.decode("utf-8", errors="replace").encode("utf-8")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            self.fail(f"malformed JSON ({e})", path, data.count(b"\n", 0, e.pos) + 1)
        c = self.cleaner
        if isinstance(obj, list):
            def items(res: BlockResult) -> None:
                for i, item in enumerate(obj):
                    where = f"{path}[{i}]"
                    if not isinstance(item, dict):
                        c.bad(res, f"expected a JSON object, got {formats._type_name(item)}", where, None)
                        continue
                    c.add_json(item, where, None, res)
            return self.local(items)
        if isinstance(obj, dict):
            try:
                formats.detect(obj)
            except formats.FormatError:
                lists = [(k, v) for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
                if len(lists) == 1:  # {"data": [records...]}
                    k, inner = lists[0]

                    def inner_items(res: BlockResult) -> None:
                        for i, item in enumerate(inner):
                            c.add_json(item, f"{path}[{k}][{i}]", None, res)
                    return self.local(inner_items)
            return self.local(lambda res: c.add_json(obj, path, None, res))
        self.local(lambda res: c.bad(res, f"expected a JSON array or object, got {formats._type_name(obj)}", path, None))

    def _read_text(self, lines: Iterable[bytes], path: str, raw: BinaryIO | None) -> None:
        cfg = self.cfg
        sep = cfg.separator.strip() if cfg.separator is not None else None
        limit = 4 * cfg.max_chars if cfg.max_chars else 0
        doc: list[str] = []
        docs: list[str] = []  # finished documents, sent to the cleaner in batches
        batch_chars = 0
        start = chars = 0
        too_long = bad_utf8 = False
        lineno = counted = 0
        count = raw is None and path == "-"

        def flush() -> None:
            nonlocal doc, chars, too_long, bad_utf8, docs, batch_chars
            if too_long:
                self.drop("too long")
            elif bad_utf8:
                self.drop("invalid UTF-8")
            elif doc:
                if cfg.to not in (None, "text"):
                    self.fail(f"plain text becomes text records only, not {cfg.to} (drop --to or give JSON records)",
                              path, start)
                docs.append("\n".join(doc))
                batch_chars += chars
                if batch_chars >= cfg.block_bytes or len(docs) >= 4096:
                    self.submit(("text", docs))
                    docs, batch_chars = [], 0
            doc, chars, too_long, bad_utf8 = [], 0, False, False

        for b in lines:
            lineno += 1
            if count:
                counted += len(b)
            if lineno % 8192 == 0:
                self._progress(raw.tell() if raw is not None else counted)
            try:
                s = b.decode("utf-8")
            except UnicodeDecodeError as e:
                if cfg.errors == "strict":
                    self.fail(f"invalid UTF-8 at byte {e.start} of the line ({e.reason}); use --errors replace or skip",
                              path, lineno)
                if cfg.errors == "skip":
                    bad_utf8 = True
                    if not doc:
                        start = lineno
                        doc = [""]  # the document exists (to be dropped at its end)
                    continue
                s = b.decode("utf-8", errors="replace")
            s = s.rstrip("\r\n")
            if (sep is None and not s.strip()) or (sep is not None and s.strip() == sep):
                flush()
                continue
            if not doc:
                start = lineno
            if too_long:
                continue
            doc.append(s)
            chars += len(s) + 1
            if limit and chars > limit:
                too_long, doc = True, [""]
        flush()
        if docs:
            self.submit(("text", docs))
        self.stats.bytes_in += counted


def _pieces(res: BlockResult, mask: np.ndarray) -> list[memoryview]:
    """The lines where `mask` holds, as few slices of the blob as possible (runs of kept lines)."""
    edges = np.diff(np.concatenate(([0], mask.view(np.int8), [0])))
    starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
    off, blob = res.offsets, memoryview(res.blob)
    return [blob[off[a]:off[b]] for a, b in zip(starts.tolist(), ends.tolist())]


def _joined(write: Callable[[bytes], object]) -> Callable[[list[bytes]], None]:
    def put(lines: list[bytes]) -> None:
        if lines:
            write(b"".join(lines))
    return put


def _each(add: Callable[[bytes], None]) -> Callable[[list[memoryview]], None]:
    """For the shuffle: one line at a time, out of the pieces."""
    def put(pieces: list[memoryview]) -> None:
        for piece in pieces:
            for line in bytes(piece).splitlines(keepends=True):
                add(line)
    return put


def run_prep(inputs: list[str], out: str | None, cfg: PrepConfig,
             on_progress: Callable[[int], None] | None = None,
             on_start: Callable[[int], None] | None = None) -> PrepStats:
    """Read `inputs`, write records to `out` (None or '-' = stdout; see output_paths for --split),
    return the statistics. Raises TiaoyuError/DataError; then no output file is left behind."""
    t0 = time.perf_counter()
    cfg.check()
    sources = expand_inputs(inputs)
    if cfg.shard is not None:
        sources = plan_shard(sources, *cfg.shard)
    train_path, val_path = output_paths(out, cfg.val_frac)
    workers = cfg.workers or os.cpu_count() or 1
    stdout = StdoutSink() if train_path is None else None
    tmp_parent = str(Path(train_path).parent) if train_path else None
    budget = int(cfg.shuffle_budget_mb * (1 << 20))
    try:
        with contextlib.ExitStack() as stack:
            pool = None
            if workers > 1:
                pool = Workers(cfg, workers)  # before any progress-bar thread exists (fork)
                stack.callback(pool.close)
            if on_start is not None:
                on_start(sum((s.end - s.start) if s.end is not None else (s.size or 0) for s in sources))
            prep = Prep(cfg, on_progress, pool)
            st = prep.stats
            st.workers = workers
            outs = stack.enter_context(atomic_files([p for p in (train_path, val_path) if p])) if train_path else []
            train_f = outs[0] if outs else None
            val_f = outs[1] if len(outs) > 1 else None
            write_train = stdout.write if stdout is not None else train_f.write  # type: ignore[union-attr]
            write_val = val_f.write if val_f is not None else write_train
            if cfg.shuffle:
                if tmp_parent:
                    Path(tmp_parent).mkdir(parents=True, exist_ok=True)
                sh_train = ExternalShuffle(cfg.seed, budget, tmp_parent)
                stack.callback(sh_train.close)
                sh_val = ExternalShuffle(cfg.seed + 1, max(budget // 8, 1 << 20), tmp_parent)
                stack.callback(sh_val.close)
                prep.write_train, prep.write_val = _each(sh_train.add), _each(sh_val.add)
            else:
                prep.write_train, prep.write_val = _joined(write_train), _joined(write_val)
            for src in sources:
                prep.read_source(src)
            prep.drain()
            if cfg.shard is None and st.read == 0:  # a shard of a small input may well be empty
                names = ", ".join(s.path for s in sources[:3]) + (" …" if len(sources) > 3 else "")
                why = f" ({len(st.binary)} binary file(s) skipped)" if st.binary else ""
                raise DataError(f"empty input: no records found{why}", names)
            if cfg.shard is None and st.kept == 0:
                reasons = ", ".join(f"{k}: {v}" for k, v in st.dropped.items() if v)
                raise TiaoyuError(f"no records kept: all {st.read} dropped ({reasons})")
            if cfg.shuffle:
                for line in sh_train:
                    write_train(line)
                for line in sh_val:
                    write_val(line)
            if stdout is not None:
                stdout.flush()
    except BaseException:
        if stdout is not None:
            stdout.abort()
        raise
    st.outputs = [p for p in (train_path, val_path) if p] or ["<stdout>"]
    st.seconds = time.perf_counter() - t0
    return st
