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

MAX_NDIM = 32           # NumPy's (and CuPy's) most axes
MAX_DIM = 2 ** 63 - 1   # the largest size an array axis can have
MAX_SYMBOLS = 8         # symbols in one dimension: N*N is fine, N*N*...*N (2**20 times) is not


class ShapeError(ValueError):
    """A shape rule failed; the compiler adds file, line and node to the message."""


class AttrValueError(ShapeError):
    """A shape rule refused an attribute's value, whatever the shapes: the compiler says
    so without calling it a shape mismatch."""


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


def at_batch(shape: Sequence[Dim], batch: int) -> tuple:
    """A graph input's declared shape with its batch symbol (``N``) set to ``batch``."""
    return tuple(batch if isinstance(d, str) else d for d in shape)


def fmt(shape: Sequence[Dim]) -> str:
    """(N, 10) style; a 1-tuple keeps its comma like Python's: (N,)."""
    inner = ", ".join(str(d) for d in shape)
    return f"({inner},)" if len(shape) == 1 else f"({inner})"


def norm_axis(axis: int, ndim: int) -> int:
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise ShapeError(f"an axis must be a whole number, got {axis!r:.40}")
    if not -ndim <= axis < ndim:
        raise ShapeError(f"axis {axis} is out of range for a {ndim}-D input")
    return axis % ndim


def non_negative_eps(op_name: str, eps: float) -> None:
    """An ``eps`` added under a square root: a negative one makes NaN of small inputs."""
    if eps < 0:
        raise AttrValueError(f"{op_name}: attribute 'eps' must be >= 0 (it is added under a "
                             f"square root), got {eps}")


def axis_list(values: Sequence, ndim: int, what: str) -> list[int]:
    """``values`` (an attribute list of axes) normalised; one line if one is not an axis.
    The length is checked first, so a hostile list costs nothing per node."""
    if len(values) > MAX_NDIM:
        raise ShapeError(f"{what} lists {len(values)} axes; an array has at most {MAX_NDIM}")
    return [norm_axis(a, ndim) for a in values]


def check_dims(shape: Sequence) -> None:
    """What a shape rule returned must be a shape NumPy can hold: at most MAX_NDIM
    dimensions, each a size 1..MAX_DIM or a batch symbol of at most MAX_SYMBOLS factors."""
    if len(shape) > MAX_NDIM:
        raise ShapeError(f"the result would have {len(shape)} axes; NumPy allows {MAX_NDIM}")
    for d in shape:
        if not isinstance(d, (int, str)) or isinstance(d, bool):
            raise ShapeError(f"the result would have a dimension {d!r:.40}, not a size")
        symbols, factor = split_dim(d)
        if not 0 < factor <= MAX_DIM:
            raise ShapeError(f"the result would have a dimension of size {d!r:.40}")
        if sum(symbols.values()) > MAX_SYMBOLS:
            raise ShapeError(f"the result's dimension {d!r:.40} multiplies more than "
                             f"{MAX_SYMBOLS} batch symbols")


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
    if any(d == 0 or (isinstance(d, int) and d < -1) for d in target):
        raise ShapeError(f"reshape target {fmt(target)} may hold sizes >= 1 and one -1, no 0 "
                         "or other negative number")
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
