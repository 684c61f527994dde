"""The `calculator` tool: exact arithmetic by a small recursive-descent parser (no eval).

    calculate("123*456")      -> "56088"
    calculate("(1+2)/4")      -> "0.75"
    calculate("2 ** 0.5")     -> "1.414213562"
    calculate("1/0")          -> "error: division by zero"

Grammar (usual precedence; ** binds tighter than unary minus and is right-associative, as in Python):

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := ("-" | "+") unary | power
    power  := atom ("**" unary)?
    atom   := number | "(" expr ")"
    number := digits ["." digits] | "." digits

`×`, `÷`, `−`, `^` and full-width parentheses are read as `*`, `/`, `-`, `**`, `(`, `)`; `,` and `_` inside a
number are digit separators. Numbers are exact fractions, so integer results print as integers and
decimals print exactly when they terminate within 12 places, else rounded to 10 significant
digits. A fractional power falls back to floating point. Guards: expressions up to 1,000 characters
and 100 levels of nesting, results up to 10,000 digits (a huge exponent is an error, not a hang).
Every problem returns as text starting with "error: ".
"""

from __future__ import annotations

import math
from fractions import Fraction

MAX_CHARS = 1000
MAX_DEPTH = 100
MAX_DIGITS = 10_000
_ALIASES = {"×": "*", "÷": "/", "−": "-", "–": "-", "^": "**", "（": "(", "）": ")", "＋": "+", "＊": "*", "／": "/"}

Number = Fraction | float


class CalcError(Exception):
    pass


def _tokens(text: str) -> list[str]:
    for a, b in _ALIASES.items():
        text = text.replace(a, b)
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c.isdigit() or c == ".":
            j = i
            while j < n and (text[j].isdigit() or text[j] in "._," and j + 1 < n and text[j + 1].isdigit()):
                j += 1
            num = text[i:j].replace(",", "").replace("_", "")
            if j == i or num.count(".") > 1 or num == ".":
                raise CalcError(f"bad number {text[i:max(j, i + 1)]!r}")
            out.append(num)
            i = j
        elif text.startswith("**", i):
            out.append("**")
            i += 2
        elif c in "+-*/()":
            out.append(c)
            i += 1
        else:
            raise CalcError(f"unexpected {c!r} at position {i + 1}")
    return out


class _Parser:
    def __init__(self, tokens: list[str]):
        self.t, self.i, self.depth = tokens, 0, 0

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> str:
        tok = self.t[self.i]
        self.i += 1
        return tok

    def expr(self) -> Number:
        v = self.term()
        while self.peek() in ("+", "-"):
            op, w = self.take(), self.term()
            v = v + w if op == "+" else v - w
        return v

    def term(self) -> Number:
        v = self.unary()
        while self.peek() in ("*", "/"):
            op, w = self.take(), self.unary()
            if op == "*":
                v = v * w
            elif w == 0:
                raise CalcError("division by zero")
            else:
                v = v / w
        return v

    def unary(self) -> Number:
        if self.peek() in ("-", "+"):
            self._enter()
            op, v = self.take(), self.unary()
            self.depth -= 1
            return -v if op == "-" else v
        return self.power()

    def power(self) -> Number:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        self._enter()
        exp = self.unary()
        self.depth -= 1
        return _pow(base, exp)

    def atom(self) -> Number:
        tok = self.peek()
        if tok is None:
            raise CalcError("the expression ends too early")
        if tok == "(":
            self.take()
            self._enter()
            v = self.expr()
            self.depth -= 1
            if self.peek() != ")":
                raise CalcError("missing ')'")
            self.take()
            return v
        if tok[0].isdigit() or tok[0] == ".":
            self.take()
            return Fraction(tok)
        raise CalcError(f"unexpected {tok!r}")

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError(f"nested more than {MAX_DEPTH} levels deep")


def _digits(x: Fraction) -> float:
    """About how many decimal digits the numerator and denominator of x have."""
    return max(abs(x.numerator), 1).bit_length() * 0.30103 + x.denominator.bit_length() * 0.30103


def _pow(base: Number, exp: Number) -> Number:
    if isinstance(exp, Fraction) and exp.denominator == 1 and isinstance(base, Fraction):
        e = exp.numerator
        if base == 0 and e < 0:
            raise CalcError("division by zero")
        if base not in (0, 1, -1) and abs(e) * _digits(base) > MAX_DIGITS:
            raise CalcError(f"the result would have more than {MAX_DIGITS:,} digits")
        return base ** e
    b, e = float(base), float(exp)
    if b < 0:
        raise CalcError("a negative number to a fractional power is not a real number")
    if b == 0 and e < 0:
        raise CalcError("division by zero")
    try:
        r = b ** e
    except OverflowError:
        raise CalcError("the result is too large") from None
    if math.isinf(r):
        raise CalcError("the result is too large")
    return r


def format_number(v: Number) -> str:
    """An exact integer as an integer; a decimal exactly when it terminates within 12 places, else 10
    significant digits (scientific notation for very large or small magnitudes)."""
    if isinstance(v, Fraction):
        if v.denominator == 1:
            return str(v.numerator)
        d = v.denominator
        for p in (2, 5):
            while d % p == 0:
                d //= p
        if d == 1:  # terminating decimal
            places = 0
            while (v * 10 ** places).denominator != 1:
                places += 1
            if places <= 12:
                s = f"{(v * 10 ** places).numerator:+d}"
                sign, digits = s[0], s[1:].rjust(places + 1, "0")
                return ("-" if sign == "-" else "") + digits[:-places] + "." + digits[-places:]
        if _digits(v) > 300:
            return f"{float(v.numerator // v.denominator):.10g}"
        v = float(v)
    s = f"{v:.10g}"
    return s


def calculate(expression: str) -> str:
    """Evaluate `expression`; the result as text, or "error: …"."""
    if not isinstance(expression, str):
        return "error: the expression must be a string"
    if len(expression) > MAX_CHARS:
        return f"error: the expression is longer than {MAX_CHARS} characters"
    try:
        tokens = _tokens(expression)
        if not tokens:
            return "error: empty expression"
        p = _Parser(tokens)
        v = p.expr()
        if p.peek() is not None:
            raise CalcError(f"unexpected {p.peek()!r}")
        return format_number(v)
    except CalcError as e:
        return f"error: {e}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: + - * / ** and parentheses, integers and decimals.

    Args:
        expression: the expression, e.g. 123*456 or (2+3)/4
    """
    return calculate(expression)
