"""einsum on NumPy: outer products as GEMMs or broadcast multiplies, and the sum of
factored outer-product gradients as one batched GEMM.

A product that sums over no index (an outer or element-wise product, such as the
routing gradient 'nij,njd->nijd') runs as one GEMM against a block-diagonal matrix
where its shape allows, else as one broadcast multiply into a C-ordered result; both
beat einsum's own loop. Everything else goes to ``np.einsum`` with path optimisation,
as in the reference.
"""
import numpy as np

from capsflow.backends.cpu.parallel import single_threaded_blas
from capsflow.core.gradients import factors, outer_layout, sum_outer_terms
from capsflow.core.opdef import DECLINED
from capsflow.ops.linalg import einsum, parse_equation

#: Largest shared index that _outer_as_matmul expands into a block-diagonal matrix.
DIAGONAL_MAX = 32


@einsum.variant("numpy").forward
def _(be, *xs, eq):
    subs, out = parse_equation(eq, len(xs))
    if len(xs) != 2 or set(subs[0]) | set(subs[1]) != set(out):
        return DECLINED
    product = _outer_as_matmul(subs, out, xs)
    if product is None:
        a, b = (_aligned(x, sub, out) for x, sub in zip(xs, subs))
        shape = tuple(max(da, db) for da, db in zip(a.shape, b.shape))
        product = np.multiply(a, b, out=np.empty(shape, dtype=np.result_type(a, b)))
    return product, {"operands": xs}


def _outer_as_matmul(subs: list, out: str, xs):
    """An outer product shaped ``out = batch + left + j + right`` (the routing gradient
    'nij,njd->nijd': batch n, left i, shared j, right d) as one batched GEMM,
    (batch, left, j) @ (batch, j, j*right), the second operand block-diagonal in j. The
    products with zeros add exact zeros, and BLAS writes the large result about 1.6
    times faster than a broadcast multiply whose inner loop is only ``right`` long.
    The GEMMs are small, so BLAS runs on one thread (more would only spin). None when
    ``out`` is not so shaped, or when the block-diagonal matrix (nj/nl times the output)
    would be larger than the output: CapsNet's (nl 1152, nj 10) is a hundredth of it,
    but 'nij,njd->nijd' with i of 1 would take up to DIAGONAL_MAX times its memory."""
    layout = outer_layout(subs, out)
    if layout is None:
        return None
    lhs, rhs, shape = factors(subs, out, xs, layout)   # (nb, nl, nj), (nb, nj, nr)
    nb, nj, nr = rhs.shape
    if nj > DIAGONAL_MAX or nj > lhs.shape[1]:  # diagonal nb*nj*nj*nr vs out nb*nl*nj*nr
        return None
    diag = np.zeros((nb, nj, nj, nr), dtype=np.result_type(lhs, rhs))
    ks = np.arange(nj)
    diag[:, ks, ks, :] = rhs
    result = np.empty(shape, dtype=diag.dtype)
    with single_threaded_blas():
        np.matmul(lhs, diag.reshape(nb, nj, nj * nr), out=result.reshape(nb, lhs.shape[1], nj * nr))
    return result


def _aligned(x, sub: str, out: str):
    """View of x with its axes in ``out``'s order and size-1 axes for indices it lacks."""
    order = sorted(range(len(sub)), key=lambda k: out.index(sub[k]))
    shape = [x.shape[sub.index(i)] if i in sub else 1 for i in out]
    return x.transpose(order).reshape(shape)


@sum_outer_terms.variant("numpy")
def _(be, terms: list):
    """out[b, l, j, r] = sum_k L_k[b, l, j] R_k[b, j, r] as a batched GEMM over (b, j):
    (nl, K) @ (K, nr), written straight into ``out`` through a transposed view."""
    if len(terms) < 2:
        return DECLINED
    lefts, rights = [t.left for t in terms], [t.right for t in terms]
    nb, nl, nj = lefts[0].shape
    out = np.empty((nb, nl, nj, rights[0].shape[2]), dtype=terms[0].dtype)
    lhs = np.stack(lefts, axis=-1).transpose(0, 2, 1, 3)       # (nb, nj, nl, K)
    rhs = np.stack(rights, axis=2)                             # (nb, nj, K, nr)
    with single_threaded_blas():  # many small GEMMs, whose BLAS threads would only spin
        np.matmul(lhs, rhs, out=out.transpose(0, 2, 1, 3))
    return out.reshape(terms[0].shape)
