"""Arithmetic inside ``${...}``: the numbers a graph derives from a few input vars.

    vars:
      height: 28
      grid: ${(height - 8 - 9) // 2 + 1}          # 6: conv1 9x9, then PrimaryCaps 9x9 stride 2
      capsules: ${32 * grid * grid}                # 1152

The grammar is Python's for numbers, and nothing else::

    expr  := term (('+' | '-') term)*
    term  := unary (('*' | '/' | '//' | '%') unary)*
    unary := ('+' | '-') unary | power
    power := atom ('**' unary)?
    atom  := NUMBER | NAME | FUNC '(' expr (',' expr)* ')' | '(' expr ')'

with the functions ``min`` and ``max``. A name is a variable; ``/`` always gives a float
(``//`` the whole-number quotient). The text is parsed here, never handed to Python's
``eval``, and every step is bounded: the length of the text, how deep it nests, and the
size of each number (integers within +-2**63, floats finite), so a hostile expression
cannot hang or exhaust memory.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable

MAX_TEXT = 2000        # characters inside one ${...}
MAX_NESTING = 64       # parentheses, unary signs and powers inside one another
MAX_INT = 2 ** 63      # integers beyond this are a mistake in a shape or a count
FUNCTIONS = {"min": min, "max": max}

_TOKEN = re.compile(r"""
    \s*(?:
      (?P<number>(?:\d[\d_]*\.?[\d_]*|\.\d[\d_]*)(?:[eE][-+]?\d+)?)
    | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
    | (?P<op>\*\*|//|[-+*/%(),])
    )""", re.VERBOSE)


class ExprError(ValueError):
    """What is wrong with an expression; the caller adds the file and line."""


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def names_in(text: str) -> set:
    """The variable names an expression mentions (functions excluded); empty if it
    does not tokenize (evaluate reports that)."""
    try:
        tokens = _tokenize(text)
    except ExprError:
        return set()
    return {value for (kind, value), after in zip(tokens, tokens[1:] + [("end", "")])
            if kind == "name" and after != ("op", "(")}


def evaluate(text: str, lookup: Callable[[str], Any]) -> Any:
    """The value of ``text`` (what is inside ``${}``). ``lookup(name)`` gives a
    variable's value or raises the caller's error for an unknown name. A lone name
    gives its value whatever its type; arithmetic needs numbers."""
    if len(text) > MAX_TEXT:
        raise ExprError(f"an expression longer than {MAX_TEXT:,} characters")
    parser = _Parser(_tokenize(text), lookup)
    value = parser.expression()
    if parser.peek() != ("end", ""):
        raise ExprError(f"unexpected '{parser.peek()[1]}'")
    return value


def _tokenize(text: str) -> list:
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match or match.end() == pos:
            bad = text[pos:].lstrip()[:1]
            raise ExprError(f"unexpected character {bad!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    if not tokens:
        raise ExprError("an empty expression")
    return tokens


class _Parser:
    """Recursive descent over the tokens, computing as it goes."""

    def __init__(self, tokens: list, lookup: Callable[[str], Any]):
        self.tokens, self.pos, self.lookup, self.depth = tokens, 0, lookup, 0

    def peek(self) -> tuple:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else ("end", "")

    def take(self) -> tuple:
        token = self.peek()
        self.pos += 1
        return token

    def expect(self, op: str) -> None:
        token = self.take()
        if token != ("op", op):
            found = f"'{token[1]}'" if token[1] else "the end"
            raise ExprError(f"expected '{op}', found {found}")

    def nested(self, parse: Callable[[], Any]) -> Any:
        self.depth += 1
        if self.depth > MAX_NESTING:
            raise ExprError(f"nested more than {MAX_NESTING} levels deep")
        try:
            return parse()
        finally:
            self.depth -= 1

    def expression(self) -> Any:
        value = self.term()
        while self.peek() in (("op", "+"), ("op", "-")):
            op = self.take()[1]
            value = _apply(op, value, self.term())
        return value

    def term(self) -> Any:
        value = self.unary()
        while self.peek()[0] == "op" and self.peek()[1] in ("*", "/", "//", "%"):
            op = self.take()[1]
            value = _apply(op, value, self.unary())
        return value

    def unary(self) -> Any:
        if self.peek() in (("op", "-"), ("op", "+")):
            op = self.take()[1]
            operand = self.nested(self.unary)
            _need_number(op, operand)
            return -operand if op == "-" else operand
        return self.power()

    def power(self) -> Any:
        base = self.atom()
        if self.peek() == ("op", "**"):
            self.take()
            return _apply("**", base, self.nested(self.unary))
        return base

    def atom(self) -> Any:
        kind, text = self.take()
        if kind == "number":
            return _number(text)
        if kind == "name":
            if self.peek() == ("op", "(") and text in FUNCTIONS:
                return self.call(text)
            if self.peek() == ("op", "("):
                raise ExprError(f"unknown function '{text}' (there are: "
                                f"{', '.join(sorted(FUNCTIONS))})")
            return self.lookup(text)
        if (kind, text) == ("op", "("):
            value = self.nested(self.expression)
            self.expect(")")
            return value
        raise ExprError(f"unexpected '{text}'" if text else "the expression ends too soon")

    def call(self, name: str) -> Any:
        self.expect("(")
        args = [self.nested(self.expression)]
        while self.peek() == ("op", ","):
            self.take()
            args.append(self.nested(self.expression))
        self.expect(")")
        for arg in args:
            _need_number(f"{name}()", arg)
        return FUNCTIONS[name](args)


def _number(text: str) -> int | float:
    digits = text.replace("_", "")
    if any(c in digits for c in ".eE"):
        value = float(digits)
        if not math.isfinite(value):
            raise ExprError(f"the number {text} is too large")
        return value
    if len(digits) > 19:
        raise ExprError(f"the number {text} is larger than 2**63")
    return _checked(int(digits))


def _need_number(op: str, value: Any) -> None:
    if not is_number(value):
        shown = repr(value) if isinstance(value, (str, bool)) or value is None else \
            f"a {type(value).__name__}"
        raise ExprError(f"'{op}' needs numbers, got {shown}")


def _checked(value: int | float) -> int | float:
    if isinstance(value, int) and abs(value) > MAX_INT:
        raise ExprError("a whole number larger than 2**63")
    if isinstance(value, float) and not math.isfinite(value):
        raise ExprError("a number too large for a float")
    return value


def _apply(op: str, a: Any, b: Any) -> int | float:
    _need_number(op, a)
    _need_number(op, b)
    if op in ("/", "//", "%") and b == 0:
        raise ExprError(f"division by zero ('{op}' by 0)")
    if op == "**":
        return _power(a, b)
    try:
        result = {"+": lambda: a + b, "-": lambda: a - b, "*": lambda: a * b,
                  "/": lambda: a / b, "//": lambda: a // b, "%": lambda: a % b}[op]()
    except OverflowError:
        raise ExprError("a number too large for a float") from None
    return _checked(result)


def _power(a: int | float, b: int | float) -> int | float:
    if a == 0 and b < 0:
        raise ExprError("division by zero (0 to a negative power)")
    if isinstance(a, int) and isinstance(b, int) and b > 0 and abs(a) > 1 and b > 64:
        raise ExprError("a whole number larger than 2**63")  # known before computing it
    try:
        result = a ** b
    except OverflowError:
        raise ExprError("a number too large for a float") from None
    if isinstance(result, complex):
        raise ExprError(f"{a} ** {b} is not a real number")
    return _checked(result)
