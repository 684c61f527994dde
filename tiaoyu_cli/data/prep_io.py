"""Inputs and outputs of `tiaoyu prep`: expand paths, detect binary files, cut JSONL into blocks of
whole lines, plan `--shard I/N` slices, and write stdout so that a failed run can take it back.

Blocks. JSONL is handed to the record workers as blocks of whole lines (`iter_blocks`), each
with the number of its first line, so errors still name the exact line and the output keeps
the input order whatever the number of workers.

Shards (`--shard I/N`, I counted from 0). The inputs, in order, are seen as one byte stream of
their sizes on disk; shard I owns the bytes [I·T/N, (I+1)·T/N). A JSONL file is cut at line
boundaries: a shard takes the lines that *begin* in its range, so every line lands in exactly
one shard. Other files (.json, .gz, plain text) cannot be cut safely and go whole to the shard
that holds their first byte. Concatenating the shards' inputs in shard order gives the
original input order, which is why `tiaoyu prep --merge` of the shard outputs equals one run.

Datasets. A folder that `datasets`' save_to_disk wrote (prep_arrow.py) is one source, given or
met while walking a folder: its size is that of its Arrow files, and it is never walked into.
"""

from __future__ import annotations

import contextlib
import glob as globlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

from tiaoyu_cli.data.prep_arrow import dataset_files, is_dataset_folder
from tiaoyu_cli.errors import TiaoyuError

JSONL_SUFFIXES = (".jsonl", ".ndjson")


# ----- inputs ---------------------------------------------------------------------------------


@dataclass
class Source:
    path: str  # '-' for stdin
    size: int | None  # bytes on disk (None for stdin)
    start: int = 0  # with --shard: the lines of a JSONL file that begin in [start, end)
    end: int | None = None
    dataset: bool = False  # a datasets save_to_disk folder (path is the folder)

    @property
    def line_splittable(self) -> bool:
        return self.path != "-" and self.path.lower().endswith(JSONL_SUFFIXES)


def _walk(folder: Path) -> Iterator[Path]:
    """The files under `folder`, and the datasets folders as wholes."""
    if is_dataset_folder(folder):
        yield folder
        return
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for f in sorted(files):
            if not f.startswith("."):
                yield Path(root) / f
        for d in [d for d in dirs if is_dataset_folder(Path(root) / d)]:
            dirs.remove(d)
            yield Path(root) / d


def expand_inputs(inputs: Iterable[str]) -> list[Source]:
    """Files, folders (recursive), globs and '-' → the list of sources, each once, in order."""
    out: list[Source] = []
    seen: set[str] = set()

    def add(p: Path) -> None:
        key = str(p.resolve())
        if key in seen:
            return
        seen.add(key)
        if p.is_dir():  # a datasets folder (_walk): the size of the Arrow files it reads
            out.append(Source(str(p), sum(f.stat().st_size for f in dataset_files(p)), dataset=True))
        else:
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


def base_name(path: str) -> str:
    name = path.lower()
    return name[:-3] if name.endswith(".gz") else name


def stdout_start(fd: int = 1) -> int | None:
    """Where this run's output begins in `fd` when it is a regular file, else None (a pipe or a terminal).

    Opened for appending (`>> data.jsonl`) the position reads 0 until the first write, yet every write
    lands at the end: the start is the file's size. Opened read-write at some position (`1<> f`), writes
    overwrite from there: the start is never below the size, so taking the output back never cuts bytes
    that were there before."""
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return None
        pos = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        return None
    return max(pos, st.st_size)


class StdoutSink:
    """Writes to fd 1 through our own buffer, so a failed run can discard what is not yet written
    and, when stdout is a regular file (`> data.jsonl`, `>> data.jsonl`), truncate it back to where this
    run's output started (`stdout_start`): what was in the file before is kept byte for byte."""

    def __init__(self, fd: int = 1):
        self.fd = fd
        self.buf: list[bytes] = []
        self.size = 0
        self.start = stdout_start(fd)

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


def plan_shard(sources: list[Source], index: int, count: int) -> list[Source]:
    """The part of `sources` that shard `index` of `count` reads (see the module docstring)."""
    if count < 1 or not 0 <= index < count:
        raise TiaoyuError(f"--shard I/N needs 0 <= I < N, got {index}/{count}")
    if any(s.path == "-" for s in sources):
        raise TiaoyuError("--shard cannot slice stdin: give files")
    total = sum(s.size or 0 for s in sources)
    lo, hi = total * index // count, total * (index + 1) // count
    out, offset = [], 0
    for s in sources:
        a, b = offset, offset + (s.size or 0)
        offset = b
        if s.line_splittable:
            start, end = max(lo, a) - a, min(hi, b) - a
            if start < end:
                out.append(Source(s.path, s.size, start, end))
        elif lo <= a < hi or (index == count - 1 and a == total):
            out.append(s)
    return out


def seek_line_start(f: BinaryIO, start: int) -> tuple[int, int]:
    """Move `f` to the first line that begins at or after byte `start`; return (position, number of
    that line) — the newlines before it are counted so errors still name the right line."""
    if start <= 0:
        return 0, 1
    newlines, left = 0, start - 1
    while left > 0:
        chunk = f.read(min(left, 1 << 22))
        if not chunk:
            break
        newlines += chunk.count(b"\n")
        left -= len(chunk)
    pos = start - 1
    c = f.read(1)
    if c and c != b"\n":
        rest = f.readline()
        pos += 1 + len(rest)
        newlines += rest.endswith(b"\n")
    elif c:
        pos += 1
    newlines += c == b"\n"
    return pos, newlines + 1


def iter_blocks(f: BinaryIO, size: int, head: bytes = b"", lineno: int = 1, pos: int = 0,
                end: int | None = None) -> Iterator[tuple[bytes, int]]:
    """(block, number of its first line): about `size` bytes of whole lines at a time, starting with
    `head` (already read). With `end`, stop after the line that holds byte end − 1 (lines that
    begin before `end`); `pos` is the byte offset of `head`'s start."""
    carry = head
    while True:
        if end is not None and pos >= end:
            return
        chunk = f.read(size)
        if not chunk:
            if carry:
                yield carry, lineno
            return
        data = carry + chunk if carry else chunk
        cut = data.rfind(b"\n") + 1
        if cut == 0:
            carry = data
            continue
        if end is not None and pos + cut > end:
            cut = data.find(b"\n", max(end - 1 - pos, 0)) + 1
            yield data[:cut], lineno
            return
        block, carry = data[:cut], data[cut:]
        yield block, lineno
        lineno += block.count(b"\n")
        pos += cut


def locate_blocks(f: BinaryIO, size: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(offset, length) of blocks of whole lines, about `size` bytes each, from `start` (a line start) to
    the end of the line that holds byte end − 1 (lines that begin before `end`) — found by seeking to
    each cut and reading on to the next newline, never reading the blocks themselves (`--workers`:
    each worker reads its own block, so the bytes cross no pipe and the parent reads nothing twice)."""
    pos = start
    while pos < end:
        cut = min(pos + size, end)
        f.seek(cut - 1)
        if f.read(1) != b"\n":  # byte cut − 1 is inside a line: the block runs to that line's end
            cut += len(f.readline())
        yield pos, cut - pos
        pos = cut
