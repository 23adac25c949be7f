"""The gradient accumulator: where the reverse pass sums the contributions that meet at
a value (a value read by several ops gets one per read), including outer products kept
as their two factors.

**Factored outer products.** Routing uses u_hat (N, 1152, 10, 16) 2 * iterations - 1
times, and einsum's VJP sends each use's gradient back as an outer product,
'nij,njd->nijd', as large as u_hat: 74 MB at batch 100 in float32. Made one by one,
the reverse pass writes five of them and adds them up in four more passes. With
``Options.factored_grads`` einsum's VJP runs ``factored_einsum_vjp`` (a variant
registered here, for every backend), which returns such a product unevaluated, as an
``Outer`` of its factors; the accumulator keeps a value's terms and writes their sum
once, when the value's own VJP needs the gradient (``sum_outer_terms``: a backend may
register a one-pass variant; the reference adds term by term, in arrival order), one
sum per way of factoring the value.

**In-place policy.** A contribution may be a view of another array, another value's
gradient, or an array an op saved: the accumulator never writes into one. The first
contribution is kept as it is; the second makes a new array, the sum, which the
accumulator owns; later ones are added into that sum in place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from math import prod
from typing import Any

from capsflow.core.opdef import DECLINED, get_op
from capsflow.core.routine import Routine
from capsflow.ops.linalg import gradient_equation, parse_equation


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


def _outer_operands(subs: list, out: str, xs) -> OuterLayout | None:
    """The OuterLayout of the einsum ``subs -> out`` of ``xs`` when it is an outer product
    of two same-typed operands; None otherwise."""
    if len(xs) != 2 or xs[0].dtype != xs[1].dtype:
        return None
    return outer_layout(subs, out)


def as_outer(xp: Any, subs: list, out: str, xs: tuple) -> Outer | None:
    """The einsum ``subs -> out`` of ``xs`` as an ``Outer`` when it is an outer product of
    two same-typed operands; None otherwise."""
    layout = _outer_operands(subs, out, xs)
    if layout is None:
        return None
    left, right, shape = factors(subs, out, xs, layout)
    return Outer(xp.ascontiguousarray(left), xp.ascontiguousarray(right), shape)


def _einsum_vjp_factored(be: Any, saved: dict, g: Any, needs: tuple, *, eq: str):
    """einsum's VJP with every outer-product gradient returned as an ``Outer``; the other
    operands' gradients are einsums too, run by einsum's own implementation on ``be``.
    Declines (the plain VJP runs) when no gradient is an outer product, or when an
    operand has an index of its own (its gradient is broadcast back)."""
    xs = saved["operands"]
    subs, out = parse_equation(eq, len(xs))
    # Decide before computing anything: a gradient made here and then declined would
    # be made again by the plain VJP (u_hat's 'ijdk,nik->nijd': two large GEMMs).
    wanted = []
    for k, sub in enumerate(subs):
        if not needs[k]:
            wanted.append(None)
            continue
        grad_subs, kept = gradient_equation(subs, out, k)
        if kept != sub:
            return DECLINED
        wanted.append((grad_subs, kept, [g] + [xs[j] for j in range(len(xs)) if j != k]))
    if not any(w is not None and _outer_operands(*w) is not None for w in wanted):
        return DECLINED
    grads = []
    for w in wanted:
        if w is None:
            grads.append(None)
            continue
        grad_subs, kept, operands = w
        term = as_outer(be.xp, grad_subs, kept, operands)
        if term is None:
            term = _EINSUM.compute(be, *operands, eq=f"{','.join(grad_subs)}->{kept}")
        grads.append(term)
    return tuple(grads)


_EINSUM = get_op("einsum")
_EINSUM.variant("*", option="factored_grads").vjp(_einsum_vjp_factored)


def _sum_outer_terms_reference(xp: Any, terms: list) -> Any:
    """A fresh array: the sum of the ``Outer`` terms, added in their order."""
    first = terms[0]
    out = xp.multiply(first.left[:, :, :, None], first.right[:, None, :, :])
    for t in terms[1:]:
        out += t.left[:, :, :, None] * t.right[:, None, :, :]
    return out.reshape(first.shape)


#: ``sum_outer_terms(be, terms)``: a fresh array holding the sum of the Outer terms.
sum_outer_terms = Routine("sum_outer_terms", _sum_outer_terms_reference)


def as_array(be: Any, g: Any) -> Any:
    """A VJP's contribution as a plain array (an ``Outer`` evaluated)."""
    return sum_outer_terms(be, [g]) if isinstance(g, Outer) else g


@dataclass
class _Sum:
    """One value's gradient while it is being summed."""
    terms: list = field(default_factory=list)   # Outer terms, in arrival order
    dense: Any = None                           # the sum of the plain contributions
    owned: bool = False                         # ``dense`` was made here: safe to add into


class GradientAccumulator:
    """Per value, the sum of its gradient contributions (see the module docstring)."""

    def __init__(self, be: Any, meter: Any = None) -> None:
        self.be = be
        self._sums: dict = {}
        self._meter = meter  # a LiveBytes: told of every array taken and let go

    def _held(self, add: Any = None, remove: Any = None) -> None:
        if self._meter is not None:
            self._meter.add(add)
            self._meter.remove(remove)

    def __contains__(self, name: str) -> bool:
        return name in self._sums

    def add(self, name: str, g: Any) -> None:
        """Add contribution ``g`` (an array, already of the value's shape, or an Outer)."""
        entry = self._sums.setdefault(name, _Sum())
        if isinstance(g, Outer):
            entry.terms.append(g)
            self._held(add=(g.left, g.right))
        elif entry.dense is None:
            entry.dense = g                      # not ours: may be shared, never written
            self._held(add=g)
        elif entry.owned:
            entry.dense += g
        else:
            old, entry.dense = entry.dense, entry.dense + g   # a new array, ours from now on
            entry.owned = True
            self._held(add=entry.dense, remove=old)

    def pop(self, name: str) -> Any:
        """The value's total gradient as one array (None if nothing arrived); forgets it."""
        entry = self._sums.pop(name, None)
        if entry is None:
            return None
        self._held(remove=([a for t in entry.terms for a in (t.left, t.right)], entry.dense))
        if not entry.terms:
            return entry.dense
        # Terms sum in one pass when their factors have the same shapes; two einsums may
        # factor one value differently ('abcd,acd->abc' and 'abcd,bcd->ab' split p at
        # different axes), and each such group is summed on its own.
        groups: dict = {}
        for t in entry.terms:
            groups.setdefault((t.left.shape, t.right.shape), []).append(t)
        parts = iter(groups.values())
        total = sum_outer_terms(self.be, next(parts))
        for group in parts:
            total += sum_outer_terms(self.be, group)
        if entry.dense is not None:
            total += entry.dense
        return total

    def arrays(self) -> list:
        """Every array held (for the live-bytes meter)."""
        found = []
        for entry in self._sums.values():
            found += [a for t in entry.terms for a in (t.left, t.right)]
            if entry.dense is not None:
                found.append(entry.dense)
        return found
