"""Static shapes with a symbolic batch dimension.

A dimension is an ``int`` or a symbolic string such as ``"N"`` or ``"N*36"`` (a symbol
times a known factor, what reshaping a batched tensor produces). Shape rules of ops
use these helpers so that ``capsflow check`` can print shapes like ``(N, 1152, 8)``.
"""
from __future__ import annotations

from collections import Counter
from typing import Sequence, Union

Dim = Union[int, str]
Shape = tuple


class ShapeError(ValueError):
    """A shape rule failed; the compiler adds file, line and node to the message."""


def split_dim(d: Dim) -> tuple[Counter, int]:
    """``"N*36"`` -> (Counter({"N": 1}), 36); ``5`` -> (Counter(), 5)."""
    if isinstance(d, int):
        return Counter(), d
    symbols: Counter = Counter()
    factor = 1
    for part in str(d).split("*"):
        part = part.strip()
        if part.lstrip("-").isdigit():
            factor *= int(part)
        else:
            symbols[part] += 1
    return symbols, factor


def join_dim(symbols: Counter, factor: int) -> Dim:
    names = sorted(symbols.elements())
    if not names:
        return factor
    return "*".join(names + ([str(factor)] if factor != 1 else []))


def prod(dims: Sequence[Dim]) -> Dim:
    symbols: Counter = Counter()
    factor = 1
    for d in dims:
        s, f = split_dim(d)
        symbols += s
        factor *= f
    return join_dim(symbols, factor)


def fmt(shape: Sequence[Dim]) -> str:
    """(N, 10) style; a 1-tuple keeps its comma like Python's: (N,)."""
    inner = ", ".join(str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def broadcast(*shapes: Sequence[Dim]) -> Shape:
    """NumPy broadcasting of possibly symbolic shapes."""
    ndim = max(len(s) for s in shapes)
    out = []
    for k in range(ndim):
        dims = {s[len(s) - ndim + k] for s in shapes if len(s) - ndim + k >= 0}
        dims.discard(1)
        if len(dims) > 1:
            raise ShapeError("shapes " + " and ".join(fmt(s) for s in shapes)
                             + " do not broadcast")
        out.append(dims.pop() if dims else 1)
    return tuple(out)


def reshape(shape: Sequence[Dim], target: Sequence[Dim]) -> Shape:
    """Result of reshaping ``shape`` to ``target`` (which may hold one -1)."""
    if list(target).count(-1) > 1:
        raise ShapeError(f"reshape target {fmt(target)} has more than one -1")
    total_s, total_f = split_dim(prod(shape))
    known = [d for d in target if d != -1]
    known_s, known_f = split_dim(prod(known))
    if known_s - total_s:
        raise ShapeError(f"cannot reshape {fmt(shape)} to {fmt(target)}")
    rest_s = total_s - known_s
    if total_f % known_f:
        raise ShapeError(f"cannot reshape {fmt(shape)} ({prod(shape)} elements) to {fmt(target)}")
    rest = join_dim(rest_s, total_f // known_f)
    if -1 not in target:
        if rest != 1:
            raise ShapeError(f"cannot reshape {fmt(shape)} ({prod(shape)} elements) "
                             f"to {fmt(target)} ({prod(target)} elements)")
        return tuple(target)
    return tuple(rest if d == -1 else d for d in target)


def same(a: Sequence[Dim], b: Sequence[Dim], what: str) -> None:
    if tuple(a) != tuple(b):
        raise ShapeError(f"{what}: {fmt(a)} vs {fmt(b)}")
