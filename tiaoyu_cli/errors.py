"""User-facing errors.

Anything the user can fix (a bad path, a malformed record, a wrong option) raises `TiaoyuError`.
The CLI prints its message in one line on stderr and exits with status 2 — no traceback.
Engine code raises it; it never prints.
"""

from __future__ import annotations


class TiaoyuError(Exception):
    """An error caused by input or options, with a message that tells the user what to fix."""

    exit_code = 2


class DataError(TiaoyuError):
    """A bad record or file. `where` is 'file:line' (or just the file) and names the field when known."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        where = ""
        if path is not None:
            where = f"{path}:{line}" if line is not None else f"{path}"
        if field is not None:
            message = f"field '{field}': {message}"
        super().__init__(f"{where}: {message}" if where else message)
        self.path, self.line, self.field = path, line, field
