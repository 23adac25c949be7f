"""Outer-product gradients, kept as their two small factors and summed in one pass.

Routing uses u_hat (N, 1152, 10, 16) 2 * iterations - 1 times (each weighted sum and
each agreement but the last), and einsum's VJP sends each use's gradient back as an
outer product, 'nij,njd->nijd', as large as u_hat: 74 MB at batch 100 in float32.
Made one by one, the reverse pass writes five of them and adds them up in four more
passes over three such arrays each.

While the executor runs a reverse pass (``collecting()``), einsum's VJP returns such a
product unevaluated, as an ``Outer`` of its factors; the executor keeps a value's
contributions in a ``Pending`` sum and calls ``total`` when the value's own VJP (or the
caller) needs the gradient. ``total`` writes the sum once: on CuPy one kernel for up to
eight terms (cuda_kernels.outer_sum), on NumPy one batched GEMM over the stacked
factors, elsewhere term by term. The terms are added in the order they arrived, as the
executor would have added the arrays.

``disabled()`` turns collecting off (every product is made at once, as before), to
check this path against the plain one (tests/test_outer_grads.py);
CAPSFLOW_OUTER_GRADS=0 turns it off for a whole process (the GPU check's A/B row).
"""
from __future__ import annotations

import contextlib
import os
from math import prod
from dataclasses import dataclass, field
from typing import Any, Iterator

from capsflow.backends.cuda import kernels as cuda_kernels
from capsflow.backends import on_cpu
from capsflow.core.switch import Switch

_switch = Switch(os.environ.get("CAPSFLOW_OUTER_GRADS", "1") != "0")
#: ``with disabled():`` makes every outer-product gradient at once, as a plain array.
disabled = _switch.disabled
_collecting = Switch(False)


@contextlib.contextmanager
def collecting() -> Iterator[None]:
    """The block in which einsum's VJP may return ``Outer`` terms (the executor's
    reverse pass, which knows to ``total`` them); nothing changes when disabled."""
    previous, _collecting.on = _collecting.on, _switch.on
    try:
        yield
    finally:
        _collecting.on = previous


@dataclass(frozen=True)
class OuterLayout:
    """How einsum ``subs -> out`` is an outer product out = batch + left + j + right:
    operand ``a`` holds (batch, left, j), operand ``b`` (batch, j, right), in any axis
    order; ``j`` is the one index both share besides the batch."""
    a: int
    b: int
    batch: str
    left: str
    j: str
    right: str


def outer_layout(subs: list, out: str) -> OuterLayout | None:
    """The OuterLayout of a two-operand einsum, or None if it is not such a product."""
    if len(subs) != 2:
        return None
    for a, b in ((0, 1), (1, 0)):
        sa, sb = subs[a], subs[b]
        k = 0
        while k < len(out) and out[k] in sa and out[k] in sb:
            k += 1
        batch, rest = out[:k], out[k:]
        left = "".join(i for i in rest if i in sa and i not in sb)
        right = "".join(i for i in rest if i in sb and i not in sa)
        if len(rest) != len(left) + len(right) + 1:
            continue
        j = rest[len(left)]
        if (rest == left + j + right and j in sa and j in sb
                and set(sa) == set(batch + left + j) and set(sb) == set(batch + j + right)):
            return OuterLayout(a, b, batch, left, j, right)
    return None


def factors(subs: list, out: str, xs: tuple, layout: OuterLayout) -> tuple:
    """The operands as (nb, nl, nj) and (nb, nj, nr) arrays (views where the axes allow),
    and the sizes of ``out``."""
    sa, sb = subs[layout.a], subs[layout.b]
    x, y = xs[layout.a], xs[layout.b]
    size = {i: d for sub, v in ((sa, x), (sb, y)) for i, d in zip(sub, v.shape)}
    nb = prod(size[i] for i in layout.batch)
    nl, nj, nr = prod(size[i] for i in layout.left), size[layout.j], prod(size[i] for i in layout.right)
    left = x.transpose([sa.index(i) for i in layout.batch + layout.left + layout.j]).reshape(nb, nl, nj)
    right = y.transpose([sb.index(i) for i in layout.batch + layout.j + layout.right]).reshape(nb, nj, nr)
    return left, right, tuple(size[i] for i in out)


@dataclass(frozen=True)
class Outer:
    """out[b, l, j, r] = left[b, l, j] * right[b, j, r], reshaped to ``shape``; unevaluated."""
    left: Any
    right: Any
    shape: tuple

    @property
    def dtype(self):
        return self.left.dtype

    def arrays(self) -> tuple:
        return self.left, self.right


def defer(xp: Any, subs: list, out: str, xs: tuple) -> Outer | None:
    """The einsum ``subs -> out`` of ``xs`` as an ``Outer``, when collecting and it is an
    outer product of two same-typed operands; None otherwise (compute it at once)."""
    if not _collecting.on or len(xs) != 2 or xs[0].dtype != xs[1].dtype:
        return None
    layout = outer_layout(subs, out)
    if layout is None:
        return None
    left, right, shape = factors(subs, out, xs, layout)
    return Outer(xp.ascontiguousarray(left), xp.ascontiguousarray(right), shape)


@dataclass
class Pending:
    """A gradient still being summed: ``Outer`` terms and at most one plain array."""
    terms: list = field(default_factory=list)
    dense: Any = None

    def arrays(self) -> list:
        found = [a for t in self.terms for a in t.arrays()]
        return found + ([self.dense] if self.dense is not None else [])


def is_deferred(g: Any) -> bool:
    return isinstance(g, (Outer, Pending))


def add(current: Any, new: Any) -> Pending:
    """``current + new`` where at least one is deferred, still unevaluated (a plain
    array is added to the plain part at once)."""
    pending = current if isinstance(current, Pending) else _pending(current)
    if isinstance(new, Outer):
        pending.terms.append(new)
    elif isinstance(new, Pending):
        pending.terms.extend(new.terms)
        if new.dense is not None:
            pending = add(pending, new.dense)
    elif pending.dense is None:
        pending.dense = new
    else:
        pending.dense = pending.dense + new  # never in place: either may be shared
    return pending


def _pending(g: Any) -> Pending:
    return Pending([g]) if isinstance(g, Outer) else Pending([], g)


def total(xp: Any, g: Any) -> Any:
    """The plain array of a gradient, evaluating it when it is deferred."""
    if not is_deferred(g):
        return g
    pending = _pending(g) if isinstance(g, Outer) else g
    result = _sum_terms(xp, pending.terms)
    if pending.dense is not None:
        result += pending.dense
    return result


#: Terms one outer_sum launch takes (the kernel has this many pointer pairs).
KERNEL_TERMS = 8


def _sum_terms(xp: Any, terms: list) -> Any:
    """A fresh array: the sum of the ``Outer`` terms, in their order."""
    shape = terms[0].shape
    lefts, rights = [t.left for t in terms], [t.right for t in terms]
    out = xp.empty((lefts[0].shape[0], lefts[0].shape[1], lefts[0].shape[2], rights[0].shape[2]),
                   dtype=terms[0].dtype)
    if cuda_kernels.outer_sum(xp, lefts[:KERNEL_TERMS], rights[:KERNEL_TERMS], out, accumulate=False):
        for k in range(KERNEL_TERMS, len(terms), KERNEL_TERMS):
            cuda_kernels.outer_sum(xp, lefts[k:k + KERNEL_TERMS], rights[k:k + KERNEL_TERMS], out,
                                   accumulate=True)
    elif on_cpu(xp) and len(terms) > 1:
        _stacked_gemm(xp, lefts, rights, out)
    else:
        xp.multiply(lefts[0][:, :, :, None], rights[0][:, None, :, :], out=out)
        for t in terms[1:]:
            out += t.left[:, :, :, None] * t.right[:, None, :, :]
    return out.reshape(shape)


def _stacked_gemm(xp: Any, lefts: list, rights: list, out: Any) -> None:
    """out[b, l, j, r] = sum_k L_k[b, l, j] R_k[b, j, r] as a batched GEMM over (b, j):
    (nl, K) @ (K, nr), written straight into ``out`` through a transposed view."""
    lhs = xp.stack(lefts, axis=-1).transpose(0, 2, 1, 3)       # (nb, nj, nl, K)
    rhs = xp.stack(rights, axis=2)                             # (nb, nj, K, nr)
    from capsflow.ops.parallel import single_threaded_blas  # here: the ops package imports this module
    with single_threaded_blas(xp):  # many small GEMMs, whose BLAS threads would only spin
        xp.matmul(lhs, rhs, out=out.transpose(0, 2, 1, 3))
