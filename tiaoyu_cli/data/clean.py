"""Text cleaning rules applied by `tiaoyu prep` to every string of every record.

In order:

1. Line ends: "\\r\\n" and lone "\\r" become "\\n".
2. ANSI escape sequences (colours, cursor moves, terminal titles: CSI `ESC [ ... letter`,
   OSC `ESC ] ... BEL|ESC \\`, charset switches `ESC ( B`, and two-character `ESC x`) are
   removed.
3. Unicode normalisation: NFC by default (composes "e" + "◌́" into "é", changes nothing
   else); `--nfkc` uses NFKC instead, which also folds compatibility forms — full-width
   "ＡＢＣ１２３" to "ABC123", "ﬁ" to "fi" — but also turns Chinese full-width punctuation
   "，：（）" into ASCII ",:()", which is why it is an option.
4. Control characters (Unicode category Cc: C0, DEL, C1) are removed, except "\\n" and "\\t";
   so are the zero-width space U+200B and the byte-order mark U+FEFF.
5. Whitespace (unless `--keep-whitespace`): every Unicode space separator (no-break space,
   U+3000 ideographic space, ...) becomes " "; runs of spaces after the first non-space
   character of a line become one space (indentation is kept, tabs are kept); trailing
   spaces and tabs on each line go; more than one blank line in a row becomes one blank line
   (paragraphs stay paragraphs); the string is stripped at both ends.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_ANSI = re.compile(r"\x1b(?:\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(?:\x07|\x1b\\)?|[ -/]+[0-~]|[@-Z\\-_])")
# Unicode category Cc is exactly C0 (U+0000-U+001F), DEL and C1 (U+0080-U+009F); keep \t and \n.
_CONTROL_RE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200b\ufeff]")
# Unicode category Zs except the ASCII space.
_SPACES_RE = re.compile("[\u00a0\u1680\u2000-\u200a\u202f\u205f\u3000]")
_INNER_SPACES = re.compile(r"(?<=[^ \t\n]) {2,}")
_TRAILING = re.compile(r"[ \t]+(?=\n)")
_BLANK_LINES = re.compile(r"\n{3,}")


@dataclass(frozen=True)
class CleanConfig:
    nfkc: bool = False
    collapse_whitespace: bool = True


def clean_text(s: str, cfg: CleanConfig = CleanConfig()) -> str:
    """Apply the rules of the module docstring to one string."""
    if "\r" in s:
        s = s.replace("\r\n", "\n").replace("\r", "\n")
    if "\x1b" in s:
        s = _ANSI.sub("", s)
    if not s.isascii():
        form = "NFKC" if cfg.nfkc else "NFC"
        if not unicodedata.is_normalized(form, s):
            s = unicodedata.normalize(form, s)
    # str.isprintable() is False for every control character, \n, \t, U+200B, U+FEFF and every
    # space but " ": one fast C scan that lets ordinary one-line text skip both regexes.
    printable = s.isprintable()
    if not printable and _CONTROL_RE.search(s):
        s = _CONTROL_RE.sub("", s)
    if cfg.collapse_whitespace:
        if not printable and not s.isascii():
            s = _SPACES_RE.sub(" ", s)
        if "  " in s:
            s = _INNER_SPACES.sub(" ", s)
        if " \n" in s or "\t\n" in s:
            s = _TRAILING.sub("", s)
        if "\n\n\n" in s:
            s = _BLANK_LINES.sub("\n\n", s)
        s = s.strip()
    return s
