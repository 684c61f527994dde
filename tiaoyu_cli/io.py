"""Atomic file and folder writes: write to a temp name, fsync, rename.

A crash half-way leaves either the old file or no file — never a half-written one.

Also the guard for JSON text nobody vetted (a model's tool call, a request, a record): `check_json_nesting`
says when text is too long or too deeply nested to parse (Python's json recurses once per bracket, so a
long run of `[` is a RecursionError, not a JSONDecodeError), and `loads_limited` parses after that check
with every failure a `json.JSONDecodeError`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import IO, Any, Iterator

from tiaoyu_cli.errors import TiaoyuError

try:
    import fcntl
except ImportError:  # not on Windows: outputs are not locked there
    fcntl = None  # type: ignore[assignment]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_dir(path: str | os.PathLike) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on clean exit fsync and rename it over `path`; on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def output_lock(path: str | os.PathLike) -> Iterator[None]:
    """Hold the output `path` (a file or a folder) for this process while it is written: an flock on a hidden
    `.NAME.lock` beside it, released however the process ends. A second tiaoyu process writing the same
    output fails at once with a clear error instead of racing the first one's replace."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    lock = path.with_name(f".{path.name}.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise TiaoyuError(f"{path} is being written by another running tiaoyu process; wait for it to finish "
                              "or choose another output") from None
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                os.unlink(lock)
    finally:
        os.close(fd)


def _fsync_file(p: Path) -> None:
    with open(p, "rb") as f:
        os.fsync(f.fileno())


def _replace_dir(tmp: Path, path: Path) -> None:
    """Put the complete folder `tmp` at `path`; an old `path` moves to a unique name first, then goes."""
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
        os.replace(path, old)  # over the empty folder mkdtemp made: the name is this process's alone
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder beside `path`; on clean exit fsync its files and rename it to `path`.

    If `path` exists it is replaced only after the new folder is complete. The output is locked
    (`output_lock`) while it is written, and every temporary name is unique to this process.
    """
    path = Path(path)
    with output_lock(path):
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            yield tmp
            for p in tmp.rglob("*"):
                if p.is_file():
                    _fsync_file(p)
                    os.chmod(p, 0o666 & ~_umask())
            os.chmod(tmp, 0o777 & ~_umask())
            fsync_dir(tmp)
            _replace_dir(tmp, path)
            fsync_dir(path.parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


@contextlib.contextmanager
def atomic_files(paths: list[str | os.PathLike], mode: str = "wb") -> Iterator[list[IO]]:
    """`atomic_open` for a set of files that belong together (a train and a val split): each is written to
    a temp name and, only once every one of them is complete and fsynced, all are renamed into place, one
    after the other with nothing in between. On any error none of them is replaced."""
    paths = [Path(p) for p in paths]
    with contextlib.ExitStack() as stack:
        for p in paths:
            stack.enter_context(output_lock(p))
        tmps: list[str] = []
        files: list[IO] = []
        try:
            for p in paths:
                fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
                tmps.append(tmp)
                files.append(stack.enter_context(os.fdopen(fd, mode)))
            yield files
            for f, tmp in zip(files, tmps):
                f.flush()
                os.fsync(f.fileno())
                os.chmod(tmp, 0o666 & ~_umask())
            for p, tmp in zip(paths, tmps):
                os.replace(tmp, p)
            for parent in {p.parent for p in paths}:
                fsync_dir(parent)
        except BaseException:
            for tmp in tmps:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise


MAX_JSON_DEPTH = 64  # deeper than any tool call or record needs; far from Python's recursion limit
# a string (closed or running to the end: truncated text) or a bracket; everything else is skipped unseen
_JSON_SCAN = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[\[\]{}]', re.S)
_JSON_SCAN_BYTES = re.compile(_JSON_SCAN.pattern.encode(), re.S)


def check_json_nesting(text: str | bytes, max_depth: int = MAX_JSON_DEPTH, max_len: int | None = None) -> str | None:
    """What makes `text` too costly to parse as JSON, or None: more than `max_len` characters (bytes for
    bytes), or brackets nested deeper than `max_depth`, counted outside strings. One linear scan that
    looks only at strings and brackets; it does not check that `text` is JSON (the parser does)."""
    if max_len is not None and len(text) > max_len:
        return f"longer than {max_len:,} characters"
    opens = (b"[", b"{") if isinstance(text, bytes) else ("[", "{")
    closes = (b"]", b"}") if isinstance(text, bytes) else ("]", "}")
    depth = 0
    for m in (_JSON_SCAN_BYTES if isinstance(text, bytes) else _JSON_SCAN).finditer(text):
        tok = m.group()
        if tok in opens:
            depth += 1
            if depth > max_depth:
                return f"nested more than {max_depth} levels deep"
        elif tok in closes:
            depth = max(depth - 1, 0)
    return None


def loads_limited(text: str | bytes, max_depth: int = MAX_JSON_DEPTH, max_len: int | None = None) -> Any:
    """`json.loads` for text nobody vetted: too long, too deeply nested (`check_json_nesting`), an integer
    past Python's digit limit or anything else the parser chokes on is a `json.JSONDecodeError` (a ValueError)."""
    problem = check_json_nesting(text, max_depth, max_len)
    if problem is not None:
        raise json.JSONDecodeError(f"the JSON is {problem}", text if isinstance(text, str) else "", 0)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("the JSON is nested too deeply", text if isinstance(text, str) else "", 0) from None
    except (ValueError, TypeError) as e:  # e.g. an integer of more than 4,300 digits, bytes that are not UTF-8
        raise json.JSONDecodeError(str(e), text if isinstance(text, str) else "", 0) from None


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TiaoyuError(f"{path}: missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TiaoyuError(f"{path}: corrupt JSON ({e})") from None
    except RecursionError:
        raise TiaoyuError(f"{path}: corrupt JSON (nested too deeply)") from None


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str))


def load_tensors(path: Path) -> dict:
    """All tensors of a safetensors file (never pickle), or a clear error naming the file."""
    from safetensors import SafetensorError  # here, not at the top: plain-text tools need no torch
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise TiaoyuError(f"{path}: missing") from None
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise TiaoyuError(f"{path}: corrupt or unreadable safetensors file ({e})") from None
