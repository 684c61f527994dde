"""The `calculator` tool: exact arithmetic by a small recursive-descent parser (no eval).

    calculate("123*456")      -> "56088"
    calculate("(1+2)/4")      -> "0.75"
    calculate("2 ** 0.5")     -> "1.414213562"
    calculate("2**-8000")     -> "5.75485901e-2409"
    calculate("1/0")          -> "error: division by zero"

Grammar (usual precedence; ** binds tighter than unary minus and is right-associative, as in Python):

    expr   := term (("+" | "-") term)*
    term   := unary (("*" | "/") unary)*
    unary  := ("-" | "+") unary | power
    power  := atom ("**" unary)?
    atom   := number | "(" expr ")"
    number := digits ["." digits] | "." digits

`×`, `÷`, `−`, `^` and full-width parentheses are read as `*`, `/`, `-`, `**`, `(`, `)`; superscript
digits are powers (`3²` is `3**2`, `10⁻³` is `10**-3`); `,` and `_` inside a number are digit separators.

Numbers are exact fractions. An exact result prints exactly when it is an integer of up to 1,000 digits
or a decimal that terminates within 12 places; anything else prints rounded to 10 significant digits,
in scientific notation when very large or very small (`1e+5000`, `5.804926471e-2409`), as does any
result that went through an approximation. A fractional power is computed in floating point; an exact
intermediate result whose numerator and denominator together would pass 10,000 digits is rounded to
64 significant bits, and a magnitude beyond about 10^±10,000 is an error.

Cost is bounded before it is spent: every number held has at most 10,000 digits (an integer power is
checked before it is computed), an expression has at most 1,000 characters and 100 levels of nesting,
and printing takes the decimal places from the denominator instead of searching for them. Every problem,
including anything unexpected, returns as text starting with "error: "; `calculate` never raises.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

MAX_CHARS = 1000
MAX_DEPTH = 100
MAX_DIGITS = 10_000  # numerator and denominator together, of any number held
MAX_EXACT_DIGITS = 1000  # integers up to this long print in full
MAX_PLACES = 12  # terminating decimals up to this many places print in full
SIG_DIGITS = 10
MANTISSA_BITS = 64  # what an approximated number keeps
_LOG10_2 = math.log10(2)
MAX_BITS = int(MAX_DIGITS / _LOG10_2)
_ALIASES = {"×": "*", "÷": "/", "−": "-", "–": "-", "^": "**", "（": "(", "）": ")", "＋": "+", "＊": "*", "／": "/"}
_SUPERSCRIPT = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
_POWER = re.compile(r"⁻?[⁰¹²³⁴⁵⁶⁷⁸⁹]+")
_DIGITS = "0123456789"
_TOO_BIG = f"the result would have more than {MAX_DIGITS:,} digits"


class CalcError(Exception):
    pass


def _tokens(text: str) -> list[str]:
    for a, b in _ALIASES.items():
        text = text.replace(a, b)
    text = _POWER.sub(lambda m: "**" + m.group().translate(_SUPERSCRIPT), text)
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c.isspace():
            i += 1
        elif c in _DIGITS or c == ".":
            j = i
            while j < n and (text[j] in _DIGITS or text[j] in "._," and j + 1 < n and text[j + 1] in _DIGITS):
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


def _bits(x: Fraction) -> int:
    return x.numerator.bit_length() + x.denominator.bit_length()


class _Parser:
    def __init__(self, tokens: list[str]):
        self.t, self.i, self.depth = tokens, 0, 0
        self.inexact = False  # a fractional power or a rounded intermediate result: print 10 digits

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> str:
        tok = self.t[self.i]
        self.i += 1
        return tok

    def held(self, x: Fraction) -> Fraction:
        """`x` if it is small enough to keep exactly, else rounded to MANTISSA_BITS significant bits."""
        if _bits(x) <= MAX_BITS:
            return x
        self.inexact = True
        return _round_bits(x)

    def expr(self) -> Fraction:
        v = self.term()
        while self.peek() in ("+", "-"):
            op, w = self.take(), self.term()
            v = self.held(v + w if op == "+" else v - w)
        return v

    def term(self) -> Fraction:
        v = self.unary()
        while self.peek() in ("*", "/"):
            op, w = self.take(), self.unary()
            if op == "*":
                v = self.held(v * w)
            elif w == 0:
                raise CalcError("division by zero")
            else:
                v = self.held(v / w)
        return v

    def unary(self) -> Fraction:
        if self.peek() in ("-", "+"):
            self._enter()
            op, v = self.take(), self.unary()
            self.depth -= 1
            return -v if op == "-" else v
        return self.power()

    def power(self) -> Fraction:
        base = self.atom()
        if self.peek() != "**":
            return base
        self.take()
        self._enter()
        exp = self.unary()
        self.depth -= 1
        return self.pow(base, exp)

    def atom(self) -> Fraction:
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
        if tok[0] in _DIGITS or tok[0] == ".":
            self.take()
            return self.held(Fraction(tok))
        raise CalcError(f"unexpected {tok!r}")

    def _enter(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise CalcError(f"nested more than {MAX_DEPTH} levels deep")

    def pow(self, base: Fraction, exp: Fraction) -> Fraction:
        if base == 0:
            if exp < 0:
                raise CalcError("division by zero")
            return Fraction(0) if exp > 0 else Fraction(1)
        if exp.denominator == 1:
            e = exp.numerator
            if base in (1, -1):
                return base ** (e % 2)
            # the result's size, checked before it is computed: |e|·log2 of numerator and denominator
            if abs(e) <= MAX_BITS and abs(e) * (math.log2(abs(base.numerator)) + math.log2(base.denominator)) \
                    < MAX_BITS - 2:
                return base ** e
        elif base < 0:
            raise CalcError("a negative number to a fractional power is not a real number")
        # floating point through the logarithm, so that neither the base nor the result need fit a float
        sign = -1 if base < 0 and exp.numerator % 2 else 1  # (only an integer exponent has a negative base)
        try:
            log2 = float(exp) * (math.log2(abs(base.numerator)) - math.log2(base.denominator))
        except OverflowError:
            log2 = math.inf if (exp > 0) == (abs(base) > 1) else -math.inf
        self.inexact = True
        return sign * _from_log2(log2)


def _from_log2(log2: float) -> Fraction:
    """2**log2 as a fraction with a float's precision; an error beyond the magnitudes a number may hold."""
    if not math.isfinite(log2) or abs(log2) > MAX_BITS - 64:
        raise CalcError(_TOO_BIG)
    k = math.floor(log2)
    m = Fraction(2.0 ** (log2 - k))  # in [1, 2), exact
    return m * 2 ** k if k >= 0 else m / 2 ** -k


def _round_bits(x: Fraction) -> Fraction:
    """x rounded to MANTISSA_BITS significant bits (m·2^s); an error when even that is too big to hold."""
    n, d = abs(x.numerator), x.denominator
    shift = n.bit_length() - d.bit_length() - MANTISSA_BITS
    if abs(shift) > MAX_BITS - MANTISSA_BITS:
        raise CalcError(_TOO_BIG)
    m = n // (d << shift) if shift >= 0 else (n << -shift) // d
    v = Fraction(m << shift) if shift >= 0 else Fraction(m, 1 << -shift)
    return -v if x < 0 else v


def _significant(n: int, d: int, sig: int) -> tuple[str, int]:
    """(the first `sig` digits of n/d rounded half to even, the decimal exponent of the first), n, d > 0."""
    e = math.floor((n.bit_length() - d.bit_length()) * _LOG10_2)  # floor(log10(n/d)), or one off
    while True:
        if e >= 0:
            lo, hi = n >= d * 10 ** e, n < d * 10 ** (e + 1)
        else:
            lo, hi = n * 10 ** -e >= d, n * 10 ** (-e - 1) < d
        if lo and hi:
            break
        e += 1 if lo else -1
    shift = sig - 1 - e
    num, den = (n * 10 ** shift, d) if shift >= 0 else (n, d * 10 ** -shift)
    q, r = divmod(num, den)
    if 2 * r > den or (2 * r == den and q % 2):
        q += 1
    if q == 10 ** sig:
        q, e = q // 10, e + 1
    return str(q), e


def _general(v: Fraction, sig: int = SIG_DIGITS) -> str:
    """v to `sig` significant digits the way Python's format(float, ".10g") writes it, for any magnitude."""
    if v == 0:
        return "0"
    digits, e = _significant(abs(v.numerator), v.denominator, sig)
    sign = "-" if v < 0 else ""
    if -4 <= e < sig:  # positional
        whole, frac = (digits[:e + 1], digits[e + 1:]) if e >= 0 else ("0", "0" * (-e - 1) + digits)
        frac = frac.rstrip("0")
        return sign + whole + ("." + frac if frac else "")
    rest = digits[1:].rstrip("0")
    return f"{sign}{digits[0]}{'.' + rest if rest else ''}e{'+' if e >= 0 else '-'}{abs(e):02d}"


def format_number(v: Fraction | float, exact: bool = True) -> str:
    """An exact integer of up to 1,000 digits in full; an exact decimal in full when it terminates within
    12 places; anything else 10 significant digits (scientific notation for very large or small magnitudes)."""
    if isinstance(v, float):
        if not math.isfinite(v):
            raise CalcError("the result is not a finite number")
        v = Fraction(v)
        exact = False
    if exact:
        n, d = v.numerator, v.denominator
        if d == 1:
            if n.bit_length() * _LOG10_2 < MAX_EXACT_DIGITS:
                return str(n)
        elif 10 ** MAX_PLACES % d == 0 and abs(n).bit_length() * _LOG10_2 < MAX_EXACT_DIGITS:
            places = next(p for p in range(1, MAX_PLACES + 1) if 10 ** p % d == 0)
            s = str(abs(n) * (10 ** places // d)).rjust(places + 1, "0")
            return ("-" if n < 0 else "") + s[:-places] + "." + s[-places:]
    return _general(v)


def calculate(expression: str) -> str:
    """Evaluate `expression`; the result as text, or "error: …". Never raises."""
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
        return format_number(v, exact=not p.inexact)
    except CalcError as e:
        return f"error: {e}"
    except (OverflowError, MemoryError):
        return "error: the result is too large"
    except RecursionError:
        return "error: the expression is nested too deeply"
    except Exception as e:  # a bug here must still reach the model as a result, not crash its caller
        return f"error: {type(e).__name__}: {e}"


def calculator(expression: str) -> str:
    """Evaluate an arithmetic expression exactly: + - * / ** and parentheses, integers and decimals.

    Args:
        expression: the expression, e.g. 123*456 or (2+3)/4
    """
    return calculate(expression)
