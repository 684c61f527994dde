"""`tiaoyu prep`: raw files in, clean JSONL records of one of the five kinds out.

    tiaoyu prep raw/ > data.jsonl
    tiaoyu prep a.jsonl b.json.gz notes/*.md --near-dup --shuffle --split val=0.01 -o data/

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
mostly non-text is binary: skipped and counted.

Records. Everything is read as one of the kinds text / chat / preference / verifiable /
classification (see formats.py for the formats recognised); `--to KIND` forces one.

Memory. Constant in the input size: lines are streamed; exact dedup keeps 16 bytes per
distinct record (dedup.py); near-dup keeps about 16 bytes per band per kept record; the
shuffle holds one 32 MB run and spills the rest to temp files (shuffle.py); a plain-text
document stops growing past 4 × --max-chars raw characters (it is then dropped as too long).

Split. With `--split val=F`, a record goes to val when a hash of its content and `--seed`
falls below F: the same record always lands in the same split, whatever the input order.

Failure. A malformed line, a wrong field type, an unknown format, invalid UTF-8 (with
`--errors strict`), an empty input or a missing path raises a DataError naming the file, the
line and the field; output files are written atomically, so nothing partial is left behind
(when stdout is a regular file it is truncated back; a pipe has already passed the records
on). `--skip-bad` drops bad records and counts them instead. Invalid UTF-8 follows
`--errors`: strict (error), replace (U+FFFD), skip (drop the record or document).
"""

from __future__ import annotations

import contextlib
import glob as globlib
import gzip
import os
import stat
import sys
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Iterator

import orjson

from tiaoyu_cli.data import formats
from tiaoyu_cli.data.clean import CleanConfig, clean_text
from tiaoyu_cli.data.dedup import MinHashDedup, U64Set, hash64
from tiaoyu_cli.data.shuffle import ExternalShuffle
from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.io import atomic_open

JSONL_SUFFIXES = (".jsonl", ".ndjson")
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

    @property
    def kept(self) -> int:
        return self.kept_train + self.kept_val


# ----- inputs ---------------------------------------------------------------------------------


@dataclass
class Source:
    path: str  # '-' for stdin
    size: int | None  # bytes on disk (None for stdin)


def _walk(folder: Path) -> Iterator[Path]:
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                yield Path(root) / f


def expand_inputs(inputs: Iterable[str]) -> list[Source]:
    """Files, folders (recursive), globs and '-' → the list of sources, each once, in order."""
    out: list[Source] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = str(p.resolve())
        if key not in seen:
            seen.add(key)
            out.append(Source(str(p), p.stat().st_size))

    inputs = list(inputs)
    if not inputs:
        raise TiaoyuError("no input: give files, folders, globs or '-' for stdin")
    for arg in inputs:
        if arg == "-":
            if "-" in seen:
                raise TiaoyuError("'-' (stdin) given twice")
            seen.add("-")
            out.append(Source("-", None))
            continue
        p = Path(arg)
        if p.is_dir():
            for f in _walk(p):
                add(f)
        elif p.is_file():
            add(p)
        elif any(c in arg for c in "*?["):
            matches = sorted(globlib.glob(arg, recursive=True))
            if not matches:
                raise TiaoyuError(f"{arg}: no file matches this pattern")
            for m in matches:
                mp = Path(m)
                if mp.is_dir():
                    for f in _walk(mp):
                        add(f)
                elif mp.is_file():
                    add(mp)
        elif p.exists():
            raise TiaoyuError(f"{arg}: not a regular file or folder")
        else:
            raise TiaoyuError(f"{arg}: no such file or folder")
    return out


def is_binary(sample: bytes) -> bool:
    """NUL bytes, or more than 30% of the sample undecodable or control characters."""
    if not sample:
        return False
    if b"\x00" in sample:
        return True
    text = sample.decode("utf-8", errors="replace")
    bad = sum(1 for c in text if c == "\ufffd" or (c < " " and c not in "\t\n\r\f\b\x1b"))
    return bad > 0.3 * len(text)


def _base_name(path: str) -> str:
    name = path.lower()
    return name[:-3] if name.endswith(".gz") else name


# ----- the pipeline -------------------------------------------------------------------------


class _StdoutSink:
    """Writes to fd 1 through our own buffer, so a failed run can discard what is not yet written
    and, when stdout is a regular file (`> data.jsonl`), truncate it back to where it started."""

    def __init__(self, fd: int = 1):
        self.fd = fd
        self.buf: list[bytes] = []
        self.size = 0
        try:
            st = os.fstat(fd)
            self.start = os.lseek(fd, 0, os.SEEK_CUR) if stat.S_ISREG(st.st_mode) else None
        except OSError:
            self.start = None

    def write(self, b: bytes) -> None:
        self.buf.append(b)
        self.size += len(b)
        if self.size >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        data = b"".join(self.buf)
        self.buf, self.size = [], 0
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]

    def abort(self) -> None:
        self.buf, self.size = [], 0
        if self.start is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self.fd, self.start)


def output_paths(out: str | None, val_frac: float) -> tuple[str | None, str | None]:
    """(train path, val path); None means stdout. See `tiaoyu prep --help` for the naming."""
    if out is None or out == "-":
        if val_frac > 0:
            raise TiaoyuError("--split writes two files: give -o FILE.jsonl (→ FILE.train.jsonl, FILE.val.jsonl) or -o DIR/")
        return None, None
    p = Path(out)
    if p.is_dir() or out.endswith(("/", os.sep)):
        return (str(p / "train.jsonl"), str(p / "val.jsonl")) if val_frac > 0 else (str(p / "data.jsonl"), None)
    if val_frac > 0:
        stem = out[: -len(p.suffix)] if p.suffix in (".jsonl", ".json", ".ndjson") else out
        return f"{stem}.train.jsonl", f"{stem}.val.jsonl"
    return out, None


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


class Prep:
    """One run of `tiaoyu prep`. Use `run_prep()`; this class holds the state of the stream."""

    def __init__(self, cfg: PrepConfig, on_progress: Callable[[int], None] | None = None):
        cfg.check()
        self.cfg = cfg
        self.stats = PrepStats()
        self.clean_cfg = CleanConfig(nfkc=cfg.nfkc, collapse_whitespace=cfg.collapse_whitespace)
        self.seen = U64Set() if cfg.dedup else None
        self.near = MinHashDedup(cfg.near_dup_threshold, seed=cfg.seed) if cfg.near_dup else None
        self.pending: list[tuple[str, bytes, int, str]] = []  # records waiting for the near-dup check
        self.val_cut = int(cfg.val_frac * (1 << 64))
        self.seed_mix = _splitmix64(cfg.seed & 0xFFFFFFFFFFFFFFFF)
        self.on_progress = on_progress
        self._done_bytes = 0
        self.write_train: Callable[[bytes], None] = lambda b: None
        self.write_val: Callable[[bytes], None] = lambda b: None

    # ----- errors and drops --------------------------------------------------------------

    def drop(self, reason: str) -> None:
        self.stats.dropped[reason] += 1

    def bad(self, message: str, path: str, line: int | None, fld: str | None = None) -> None:
        """A bad record: an error naming file, line and field, or (--skip-bad) a counted drop."""
        if not self.cfg.skip_bad:
            raise DataError(message, path, line, fld)
        self.stats.read += 1
        self.drop("bad record")

    # ----- records -----------------------------------------------------------------------

    def add_json(self, obj, path: str, line: int | None) -> None:
        try:
            kind, recs = formats.convert(obj, self.cfg.to)
        except formats.FormatError as e:
            self.bad(str(e), path, line, e.field)
            return
        for rec in recs:
            self.add_record(kind, rec)

    def add_text(self, text: str, path: str, line: int) -> None:
        if self.cfg.to not in (None, "text"):
            raise DataError(f"plain text becomes text records only, not {self.cfg.to} (drop --to or give JSON records)", path, line)
        self.add_record("text", {"text": text})

    def add_record(self, kind: str, rec: dict) -> None:
        st, cfg = self.stats, self.cfg
        st.read += 1
        if kind == "text":
            text = clean_text(rec["text"], self.clean_cfg)
            rec = {"text": text}
            if not text.strip():
                return self.drop("empty")
            n = len(text)
        else:
            rec = formats.map_strings(kind, rec, lambda s: clean_text(s, self.clean_cfg))
            if formats.empty_part(kind, rec):
                return self.drop("empty")
            text = formats.record_text(kind, rec)
            n = len(text)
            if kind == "preference" and rec["chosen"] == rec["rejected"]:
                return self.drop("chosen = rejected")
        if n < cfg.min_chars:
            return self.drop("too short")
        if cfg.max_chars and n > cfg.max_chars:
            return self.drop("too long")
        line = orjson.dumps(rec) + b"\n"
        h = hash64(line)
        if self.seen is not None and not self.seen.add(h):
            return self.drop("duplicate")
        if self.near is not None:  # decided in batches (numpy), in input order
            self.pending.append((kind, line, h, text))
            if len(self.pending) >= 256:
                self.flush_near()
            return
        self.emit(kind, line, h)

    def flush_near(self) -> None:
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        for (kind, line, h, _), dup in zip(batch, self.near.check([t for *_, t in batch])):  # type: ignore[union-attr]
            if dup:
                self.drop("near-duplicate")
            else:
                self.emit(kind, line, h)

    def emit(self, kind: str, line: bytes, h: int) -> None:
        st = self.stats
        st.kinds[kind] = st.kinds.get(kind, 0) + 1
        if self.val_cut and _splitmix64(h ^ self.seed_mix) < self.val_cut:
            st.kept_val += 1
            self.write_val(line)
        else:
            st.kept_train += 1
            self.write_train(line)

    # ----- reading -----------------------------------------------------------------------

    def _progress(self, n: int) -> None:
        if self.on_progress is not None:
            self.on_progress(self._done_bytes + n)

    def read_source(self, src: Source) -> None:
        st = self.stats
        st.files += 1
        if src.path == "-":
            stdin: BinaryIO = sys.stdin.buffer
            if stdin.peek(2)[:2] == b"\x1f\x8b":  # gzip magic: `zcat`-free pipes work too
                stdin = gzip.GzipFile(fileobj=stdin, mode="rb")  # type: ignore[assignment]
            try:
                self._read_stream(stdin, "-", "sniff", raw=None)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                raise DataError(f"not a valid gzip stream ({e})", "-") from None
            return
        name = _base_name(src.path)
        mode = "jsonl" if name.endswith(JSONL_SUFFIXES) else "json" if name.endswith(".json") else "text"
        with open(src.path, "rb") as raw:
            if src.path.lower().endswith(".gz"):
                f: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[assignment]
            else:
                f = raw
            try:
                self._read_stream(f, src.path, mode, raw=raw)
            except (gzip.BadGzipFile, EOFError, zlib.error) as e:
                raise DataError(f"not a valid gzip file ({e})", src.path) from None
        st.bytes_in += src.size or 0
        self._done_bytes += src.size or 0
        self._progress(0)

    def _read_stream(self, f: BinaryIO, path: str, mode: str, raw: BinaryIO | None) -> None:
        sample = f.peek(8192)[:8192] if hasattr(f, "peek") else b""
        if is_binary(sample):
            self.stats.binary.append(path)
            return
        lines: Iterator[bytes] = iter(f)
        if mode == "sniff":
            head: list[bytes] = []
            for b in lines:
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
            lines = _chain(head, lines)
        if mode == "jsonl":
            self._read_jsonl(lines, path, raw)
        elif mode == "json":
            self._read_json(b"".join(lines), path)
        else:
            self._read_text(lines, path, raw)

    def _decode_error(self, raw_line: bytes, e: UnicodeDecodeError, path: str, lineno: int) -> str | None:
        """Apply --errors to a line with invalid UTF-8: the replaced text, None (skip), or an error."""
        if self.cfg.errors == "replace":
            return raw_line.decode("utf-8", errors="replace")
        if self.cfg.errors == "skip":
            return None
        raise DataError(f"invalid UTF-8 at byte {e.start} of the line ({e.reason}); use --errors replace or skip",
                        path, lineno)

    def _read_jsonl(self, lines: Iterable[bytes], path: str, raw: BinaryIO | None) -> None:
        lineno = counted = 0
        count = raw is None and path == "-"  # stdin has no size on disk: count what passes
        for b in lines:
            lineno += 1
            if count:
                counted += len(b)
            if lineno % 8192 == 0:
                self._progress(raw.tell() if raw is not None else counted)
            if not b.strip():
                continue
            try:
                obj = orjson.loads(b)
            except orjson.JSONDecodeError as e:
                try:
                    b.decode("utf-8")
                except UnicodeDecodeError as ue:
                    text = self._decode_error(b, ue, path, lineno)
                    if text is None:
                        self.stats.read += 1
                        self.drop("invalid UTF-8")
                        continue
                    try:
                        obj = orjson.loads(text)
                    except orjson.JSONDecodeError as e2:
                        self.bad(f"malformed JSON ({e2})", path, lineno)
                        continue
                else:
                    self.bad(f"malformed JSON ({e})", path, lineno)
                    continue
            if not isinstance(obj, dict):
                self.bad(f"expected a JSON object, got {formats._type_name(obj)}", path, lineno)
                continue
            self.add_json(obj, path, lineno)
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
                    return self._read_jsonl(_chain([], iter(data.splitlines(keepends=True))), path, None)
        try:
            data.decode("utf-8")
        except UnicodeDecodeError as ue:
            if self.cfg.errors == "strict":
                line = data.count(b"\n", 0, ue.start) + 1
                raise DataError(f"invalid UTF-8 ({ue.reason}); use --errors replace or skip", path, line) from None
            if self.cfg.errors == "skip":  # a whole .json document is one unit
                self.stats.read += 1
                self.drop("invalid UTF-8")
                return
            data = data.decode("utf-8", errors="replace").encode("utf-8")
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError as e:
            raise DataError(f"malformed JSON ({e})", path, data.count(b"\n", 0, e.pos) + 1) from None
        if isinstance(obj, list):
            for i, item in enumerate(obj):
                where = f"{path}[{i}]"
                if not isinstance(item, dict):
                    self.bad(f"expected a JSON object, got {formats._type_name(item)}", where, None)
                    continue
                self.add_json(item, where, None)
            return
        if isinstance(obj, dict):
            try:
                formats.detect(obj)
            except formats.FormatError:
                lists = [(k, v) for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(x, dict) for x in v)]
                if len(lists) == 1:  # {"data": [records...]}
                    k, items = lists[0]
                    for i, item in enumerate(items):
                        self.add_json(item, f"{path}[{k}][{i}]", None)
                    return
            self.add_json(obj, path, None)
            return
        self.bad(f"expected a JSON array or object, got {formats._type_name(obj)}", path, None)

    def _read_text(self, lines: Iterable[bytes], path: str, raw: BinaryIO | None) -> None:
        sep = self.cfg.separator.strip() if self.cfg.separator is not None else None
        limit = 4 * self.cfg.max_chars if self.cfg.max_chars else 0
        doc: list[str] = []
        start = chars = 0
        too_long = bad_utf8 = False
        lineno = counted = 0
        count = raw is None and path == "-"

        def flush() -> None:
            nonlocal doc, chars, too_long, bad_utf8
            if too_long:
                self.stats.read += 1
                self.drop("too long")
            elif bad_utf8:
                self.stats.read += 1
                self.drop("invalid UTF-8")
            elif doc:
                self.add_text("\n".join(doc), path, start)
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
                t = self._decode_error(b, e, path, lineno)
                if t is None:
                    bad_utf8 = True
                    if not doc:
                        start = lineno
                        doc = [""]  # the document exists (to be dropped at its end)
                    continue
                s = t
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
        self.stats.bytes_in += counted


def _chain(head: list[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    yield from head
    yield from rest


def run_prep(inputs: list[str], out: str | None, cfg: PrepConfig,
             on_progress: Callable[[int], None] | None = None,
             on_start: Callable[[int], None] | None = None) -> PrepStats:
    """Read `inputs`, write records to `out` (None or '-' = stdout; see output_paths for --split),
    return the statistics. Raises TiaoyuError/DataError; then no output file is left behind."""
    t0 = time.perf_counter()
    cfg.check()
    sources = expand_inputs(inputs)
    train_path, val_path = output_paths(out, cfg.val_frac)
    if on_start is not None:
        on_start(sum(s.size or 0 for s in sources))
    prep = Prep(cfg, on_progress)
    st = prep.stats
    stdout = _StdoutSink() if train_path is None else None
    tmp_parent = str(Path(train_path).parent) if train_path else None
    budget = int(cfg.shuffle_budget_mb * (1 << 20))
    try:
        with contextlib.ExitStack() as stack:
            train_f = stack.enter_context(atomic_open(train_path, "wb")) if train_path else None
            val_f = stack.enter_context(atomic_open(val_path, "wb")) if val_path else None
            write_train = stdout.write if stdout is not None else train_f.write  # type: ignore[union-attr]
            write_val = val_f.write if val_f is not None else write_train
            if cfg.shuffle:
                if tmp_parent:
                    Path(tmp_parent).mkdir(parents=True, exist_ok=True)
                sh_train = ExternalShuffle(cfg.seed, budget, tmp_parent)
                stack.callback(sh_train.close)
                sh_val = ExternalShuffle(cfg.seed + 1, max(budget // 8, 1 << 20), tmp_parent)
                stack.callback(sh_val.close)
                prep.write_train, prep.write_val = sh_train.add, sh_val.add
            else:
                prep.write_train, prep.write_val = write_train, write_val
            for src in sources:
                prep.read_source(src)
            prep.flush_near()
            if st.read == 0:
                names = ", ".join(s.path for s in sources[:3]) + (" …" if len(sources) > 3 else "")
                why = f" ({len(st.binary)} binary file(s) skipped)" if st.binary else ""
                raise DataError(f"empty input: no records found{why}", names)
            if st.kept == 0:
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
