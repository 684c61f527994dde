"""JSONL reading and writing (orjson). Errors name the file and line."""

from __future__ import annotations

import gzip
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, TypeVar

import orjson

from tiaoyu_cli.errors import DataError, TiaoyuError
from tiaoyu_cli.io import atomic_open


def _open_text(path: str, errors: str = "strict"):
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8", errors=errors)
    p = Path(path)
    if not p.exists():
        raise TiaoyuError(f"{path}: no such file")
    if p.is_dir():
        raise TiaoyuError(f"{path}: is a folder, expected a JSONL file")
    if path.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(p, "rb"), encoding="utf-8", errors=errors)
    return open(p, "r", encoding="utf-8", errors=errors)


def iter_jsonl(path: str | os.PathLike, skip_bad: bool = False, stats: dict | None = None) -> Iterator[tuple[int, dict]]:
    """Yield (line_number, object) for each non-blank line. A malformed line raises DataError
    naming file and line, unless `skip_bad` (then it is counted in stats['bad'])."""
    path = str(path)
    f = _open_text(path)
    try:
        lineno = 0
        while True:
            try:
                line = f.readline()
            except UnicodeDecodeError as e:
                raise DataError(f"invalid UTF-8 ({e.reason})", path, lineno + 1) from None
            if not line:
                break
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                if skip_bad:
                    if stats is not None:
                        stats["bad"] = stats.get("bad", 0) + 1
                    continue
                raise DataError(f"malformed JSON ({e})", path, lineno) from None
            if not isinstance(obj, dict):
                if skip_bad:
                    if stats is not None:
                        stats["bad"] = stats.get("bad", 0) + 1
                    continue
                raise DataError(f"expected a JSON object, got {type(obj).__name__}", path, lineno)
            yield lineno, obj
    finally:
        if path != "-":
            f.close()


@dataclass
class RecordCounts:
    """What a loader made of a file's records: how many it read and kept, and the ones it skipped
    (--skip-bad) by reason. A loader with more to say subclasses it: `what` names the kept items, `notes()`
    adds to the summary line."""

    what = "records kept"  # (a class attribute, not a field)
    records: int = 0  # records read (malformed lines are not records)
    kept: int = 0
    bad: int = 0  # skipped, all reasons together
    reasons: dict[str, int] = field(default_factory=dict)  # why records were skipped

    def skip(self, why: str, n: int = 1) -> None:
        self.bad += n
        self.reasons[why] = self.reasons.get(why, 0) + n

    def notes(self) -> list[str]:
        return []

    def summary(self) -> str:
        """"{kept} {what} from {records} records, {notes…}, {bad} skipped ({n reason}, …)"."""
        parts = [f"{self.kept:,} {self.what} from {self.records:,} records", *self.notes()]
        if self.bad:
            why = ", ".join(f"{n} {w}" for w, n in sorted(self.reasons.items(), key=lambda kv: -kv[1]))
            parts.append(f"{self.bad:,} skipped ({why})")
        return ", ".join(parts)


T = TypeVar("T")


def load_records(path: str | os.PathLike, read: Callable[[dict, str, int], T | None], skip_bad: bool = False,
                 counts: RecordCounts | None = None,
                 why: Callable[[DataError], str] = lambda e: "invalid") -> list[T]:
    """`read(record, name, line)` of every record of a JSONL file, in file order: the list of what it returns
    (None leaves a record out; `read` counts why). A DataError from `read`, or a malformed line, stops the load
    naming file:line; with `skip_bad` it is a skip counted in `counts` (reason `why(error)`, or "malformed JSON")."""
    counts = counts if counts is not None else RecordCounts()
    name = str(path)
    jstats: dict = {}
    out = []
    for line, rec in iter_jsonl(path, skip_bad=skip_bad, stats=jstats):
        counts.records += 1
        try:
            item = read(rec, name, line)
        except DataError as e:
            if not skip_bad:
                raise
            counts.skip(why(e))
            continue
        if item is not None:
            out.append(item)
            counts.kept += 1
    if jstats.get("bad"):
        counts.skip("malformed JSON", jstats["bad"])
    return out


def read_jsonl(path: str | os.PathLike, skip_bad: bool = False) -> list[dict]:
    return [obj for _, obj in iter_jsonl(path, skip_bad=skip_bad)]


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n"


def write_jsonl(path: str | os.PathLike | None, records: Iterable[dict]) -> int:
    """Write records atomically to `path`, or to stdout when path is None or '-'. Returns the count."""
    n = 0
    if path is None or str(path) == "-":
        out = sys.stdout.buffer
        for r in records:
            out.write(dumps(r))
            n += 1
        out.flush()
        return n
    with atomic_open(path, "wb") as f:
        for r in records:
            f.write(dumps(r))
            n += 1
    return n
