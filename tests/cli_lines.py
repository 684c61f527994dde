"""Check `tiaoyu …` command lines against the CLI's own parser, without running anything.

Used by tests/test_docs.py (the code blocks of README.md and docs/*.md) and tests/test_help.py (the
examples at the end of every `--help`). A line is split as a shell would (backslash continuations
joined, comments dropped, pipes, `&&`, `;` and redirections cut away); each `tiaoyu …` (or
`python -m tiaoyu_cli …`) in it is walked down the click command tree and parsed by
`Command.make_context`, which runs no callback. Unknown commands, unknown options, an option without
its value, extra arguments and values of the wrong type fail; a missing argument (a line that shows
only some of the arguments, e.g. `tiaoyu chat ckpt/sft`) is fine.
"""

from __future__ import annotations

import re
import shlex
from functools import lru_cache

import typer
from typer import _click  # typer 0.29 vendors click as typer._click
from typer.core import TyperGroup

SHELL_OPS = {"|", "||", "&&", ";", "&", "(", ")"}
REDIRECTS = {">", ">>", "<", "<<", "<<<", ">&", "&>", "2>", "2>>", "1>"}


@lru_cache(maxsize=1)
def root_command():
    from tiaoyu_cli.cli.main import build_app

    return typer.main.get_command(build_app())


def logical_lines(text: str) -> list[str]:
    """Lines of a code block with backslash continuations joined."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.rstrip().endswith("\\"):
            cur += line.rstrip()[:-1] + " "
            continue
        out.append(cur + line)
        cur = ""
    if cur:
        out.append(cur)
    return out


def _tokens(line: str) -> list[str]:
    lex = shlex.shlex(line, posix=True, punctuation_chars=";&|<>()")
    lex.whitespace_split = True
    lex.commenters = "#"
    return list(lex)


def _segments(line: str) -> list[list[str]]:
    """The simple commands of a shell line, each without its redirections."""
    segs, cur, skip = [], [], False
    line = re.sub(r"(?<=\s)\d(?=>)", "", line)  # `2>err.log`, `2>&1`: the fd number goes with the redirection
    for tok in _tokens(line):
        if skip:
            skip = False
            continue
        if tok in SHELL_OPS:
            segs.append(cur)
            cur = []
        elif tok in REDIRECTS or re.fullmatch(r"\d?[<>]+&?", tok):
            skip = True  # its target
        else:
            cur.append(tok)
    segs.append(cur)
    return [s for s in segs if s]


def tiaoyu_invocations(line: str) -> list[list[str]]:
    """The argument lists of every `tiaoyu` in a shell line (`tiaoyu`, `.venv/bin/tiaoyu`,
    `python -m tiaoyu_cli`, `torchrun … -m tiaoyu_cli`) as the command word of a simple command."""
    out = []
    for seg in _segments(line):
        words = list(seg)
        while words and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", words[0]):  # VAR=value prefixes
            words.pop(0)
        if not words:
            continue
        if words[0] == "tiaoyu" or words[0].endswith("/tiaoyu"):
            out.append(words[1:])
        elif "-m" in words and words.index("-m") + 1 < len(words) and words[words.index("-m") + 1] == "tiaoyu_cli":
            out.append(words[words.index("-m") + 2:])
    return out


def parse_error(args: list[str]) -> str | None:
    """None when the CLI's parser accepts `tiaoyu ARGS` (a missing argument is accepted), else why not."""
    cmd, name, parent = root_command(), "tiaoyu", None
    args = list(args)
    while True:
        if not [a for a in args if a not in ("--help", "-h")]:
            return None  # `tiaoyu sft` or `tiaoyu sft --help`: a command's name alone (parsing would print help)
        try:
            ctx = cmd.make_context(name, list(args), parent=parent)
        except _click.exceptions.MissingParameter:
            return None
        except (typer.Exit, _click.exceptions.NoArgsIsHelpError):
            return None  # --help, or a bare group (prints its help)
        except _click.exceptions.UsageError as e:
            return f"{type(e).__name__}: {e.format_message()}"
        if not isinstance(cmd, TyperGroup):
            return None
        rest = [*ctx._protected_args, *ctx.args]
        if not rest:
            return None
        sub = cmd.get_command(ctx, rest[0])
        if sub is None:
            return f"unknown command {rest[0]!r} of {name!r}"
        cmd, name, parent, args = sub, f"{name} {rest[0]}", ctx, rest[1:]


def check_text(text: str) -> list[tuple[str, str]]:
    """(line, error) for every tiaoyu invocation in `text` (shell lines) that the parser refuses."""
    bad = []
    for line in logical_lines(text):
        try:
            invocations = tiaoyu_invocations(line)
        except ValueError as e:  # unbalanced quotes
            bad.append((line, f"not a shell line: {e}"))
            continue
        for args in invocations:
            err = parse_error(args)
            if err:
                bad.append((line.strip(), err))
    return bad


def run_main(args: list, capsys) -> tuple[int, str, str]:
    """The `tiaoyu` entry point in this process: (exit code, stdout, stderr)."""
    import pytest

    from tiaoyu_cli.cli.main import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err
