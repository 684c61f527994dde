"""JSONL reading and writing (orjson). Errors name the file and line."""

from __future__ import annotations

import gzip
import io
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Iterator

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
