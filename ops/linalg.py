"""Contractions: matmul, linear (fully connected) and two-operand einsum."""
from math import prod

from capsflow.backends.cuda import kernels as cuda_kernels

from capsflow.backends.cuda import gemm

from capsflow.core import gradients as outer_grads
from capsflow.backends import on_cpu
from capsflow.core.opdef import Attr, defop
from capsflow.core.shapes import ShapeError, broadcast, fmt

from .parallel import single_threaded_blas

matmul = defop("matmul", inputs=("a", "b"), saves=("a", "b"),
               doc="batched matrix product a @ b (batch axes broadcast)")


@matmul.shape
def _(a, b):
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"matmul needs inputs of 2 or more axes, got {fmt(a)} and {fmt(b)}")
    if a[-1] != b[-2]:
        raise ShapeError(f"matmul inner sizes differ: {fmt(a)} @ {fmt(b)}")
    return broadcast(a[:-2], b[:-2]) + (a[-2], b[-1])


@matmul.forward
def _(xp, a, b):
    return gemm.matmul(xp, a, b)


@matmul.vjp
def _(xp, saved, g, needs):
    a, b = saved["a"], saved["b"]
    ga = gemm.matmul(xp, g, xp.swapaxes(b, -1, -2)) if needs[0] else None
    gb = gemm.matmul(xp, xp.swapaxes(a, -1, -2), g) if needs[1] else None
    return ga, gb


linear = defop("linear", inputs=("x", "w", "b?"), saves=("x", "w"),
               doc="x @ w + b with w of shape (in, out): a fully connected layer")


@linear.shape
def _(x, w, b=None):
    if len(w) != 2 or x[-1] != w[0]:
        raise ShapeError(f"linear: input {fmt(x)} does not fit weight {fmt(w)} (in, out)")
    if b is not None and tuple(b) != (w[1],):
        raise ShapeError(f"linear: bias {fmt(b)} should be ({w[1]},)")
    return tuple(x[:-1]) + (w[1],)


@linear.forward
def _(xp, x, w, b=None):
    out = gemm.matmul(xp, x, w)
    if b is not None:
        out += b
    return out


@linear.vjp
def _(xp, saved, g, needs):
    x, w = saved["x"], saved["w"]
    g2 = g.reshape(-1, g.shape[-1])
    gx = gemm.matmul(xp, g, w.T) if needs[0] else None
    gw = gemm.matmul(xp, x.reshape(-1, x.shape[-1]).T, g2) if needs[1] else None
    gb = cuda_kernels.column_sums(xp, g2) if len(needs) > 2 and needs[2] else None
    return gx, gw, gb


def parse_equation(eq: str, count: int) -> tuple[list[str], str]:
    """'ijdk,nik->nijd' -> (['ijdk', 'nik'], 'nijd'), validated."""
    if "->" not in eq or "." in eq:
        raise ShapeError(f"einsum equation '{eq}' needs an explicit '->' output and no '...'")
    lhs, out = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    if len(subs) != count:
        raise ShapeError(f"einsum equation '{eq}' names {len(subs)} operands, the node passes {count}")
    for s in subs + [out]:
        if len(set(s)) != len(s) or not s.isalpha() and s:
            raise ShapeError(f"einsum term '{s}' in '{eq}' repeats an index or uses non-letters")
    if set(out) - set("".join(subs)):
        raise ShapeError(f"einsum output '{out}' has indices that no operand has")
    return subs, out


einsum = defop("einsum", inputs=("x*",), attrs={"eq": Attr(str)}, saves=("operands",),
               doc="Einstein summation, e.g. eq: 'ijdk,nik->nijd' (explicit output, no '...')")


@einsum.shape
def _(*shapes, eq):
    subs, out = parse_equation(eq, len(shapes))
    sizes: dict = {}
    for s, shape in zip(subs, shapes):
        if len(s) != len(shape):
            raise ShapeError(f"einsum term '{s}' has {len(s)} indices, its operand is {fmt(shape)}")
        for index, dim in zip(s, shape):
            if sizes.setdefault(index, dim) != dim:
                raise ShapeError(f"einsum index '{index}' is {sizes[index]} in one operand "
                                 f"and {dim} in another")
    return tuple(sizes[i] for i in out)


def contract(xp, subs: list, out: str, *xs):
    """einsum of ``xs`` with index strings ``subs`` -> ``out``.

    A product that sums over no index (an outer or element-wise product, such as the
    routing gradients 'nij,njd->nijd') runs as one broadcast multiply into a C-ordered
    result, which is faster than einsum's own loop (and, left to itself, the ufunc may
    follow an operand's odd strides); everything else goes to ``xp.einsum`` with path
    optimisation. On CuPy the routing contractions run as one kernel each
    (cuda_kernels.routing_contraction).
    """
    fused = cuda_kernels.routing_contraction(xp, subs, out, xs)
    if fused is not None:
        return fused
    if len(xs) == 2 and set(subs[0]) | set(subs[1]) == set(out):
        product = _outer_as_matmul(xp, subs, out, xs) if on_cpu(xp) else None
        if product is not None:
            return product
        a, b = (_aligned(x, sub, out) for x, sub in zip(xs, subs))
        shape = tuple(max(da, db) for da, db in zip(a.shape, b.shape))
        return xp.multiply(a, b, out=xp.empty(shape, dtype=xp.result_type(a, b)))
    if len(xs) == 2 and not on_cpu(xp):
        return einsum_via_matmul(xp, subs, out, *xs)
    return xp.einsum(f"{','.join(subs)}->{out}", *xs, optimize=len(xs) > 1)


def einsum_via_matmul(xp, subs: list, out: str, a, b):
    """Two-operand einsum as one batched GEMM (gemm.matmul) into a new C-ordered array:
    indices in both operands and the output are the batch, those in both but not the
    output are contracted, the rest are the rows (from a) and columns (from b). Indices
    that one operand alone has and the output lacks are summed first. Off NumPy every
    einsum GEMM goes this way, so that it runs through capsflow's own cuBLAS call
    (capturable in a CUDA graph). cuBLAS writes the product straight into the result,
    in ``out``'s order, whenever the result's axes group into the GEMM's batch, rows
    and columns (u_hat's 'ijdk,nik->nijd': batch i, rows jd, columns n)."""
    sa, sb = subs
    a, sa = _sum_private(a, sa, sb, out)
    b, sb = _sum_private(b, sb, sa, out)
    batch = [i for i in out if i in sa and i in sb]
    summed = [i for i in sa if i in sb and i not in out]
    rows = [i for i in out if i in sa and i not in sb]
    cols = [i for i in out if i in sb and i not in sa]
    size = dict(zip(sa, a.shape))
    size.update(zip(sb, b.shape))
    nb, ns = prod(size[i] for i in batch), prod(size[i] for i in summed)
    nr, nc = prod(size[i] for i in rows), prod(size[i] for i in cols)
    a3 = a.transpose([sa.index(i) for i in batch + rows + summed]).reshape(nb, nr, ns)
    b3 = b.transpose([sb.index(i) for i in batch + summed + cols]).reshape(nb, ns, nc)
    result = xp.empty([size[i] for i in out], dtype=xp.result_type(a, b))
    target = _grouped_view(xp, result, out, (batch, rows, cols), size)
    if target is not None:
        gemm.matmul(xp, a3, b3, out=target)
        return result
    order = batch + rows + cols
    product = gemm.matmul(xp, a3, b3).reshape([size[i] for i in order])
    result[...] = product.transpose([order.index(i) for i in out])
    return result


def _grouped_view(xp, result, out: str, groups: tuple, size: dict):
    """``result`` (C-ordered, axes ``out``) as a (len(groups),)-axis strided view, one
    axis per group of indices, or None where a group's indices do not step as one."""
    stride, step = {}, result.itemsize
    for i in reversed(out):
        stride[i] = step
        step *= size[i]
    shape, strides = [], []
    for group in groups:
        merged = gemm.merged_stride([size[i] for i in group], [stride[i] for i in group])
        if merged is None:
            return None
        shape.append(prod(size[i] for i in group))
        strides.append(merged)
    return xp.lib.stride_tricks.as_strided(result, shape=shape, strides=strides)


def _sum_private(x, sub: str, other: str, out: str):
    """Sum x over the indices that neither the other operand nor the output has."""
    lone = tuple(k for k, i in enumerate(sub) if i not in other and i not in out)
    if not lone:
        return x, sub
    return x.sum(axis=lone), "".join(i for k, i in enumerate(sub) if k not in lone)


#: Largest shared index that _outer_as_matmul expands into a block-diagonal matrix.
DIAGONAL_MAX = 32


def _outer_as_matmul(xp, subs: list, out: str, xs):
    """An outer product shaped ``out = batch + left + j + right`` (the routing gradient
    'nij,njd->nijd': batch n, left i, shared j, right d) as one batched GEMM,
    (batch, left, j) @ (batch, j, j*right), the second operand block-diagonal in j. The
    products with zeros add exact zeros, and BLAS writes the large result about 1.6
    times faster than a broadcast multiply whose inner loop is only ``right`` long.
    The GEMMs are small, so BLAS runs on one thread (more would only spin). None when
    ``out`` is not so shaped."""
    layout = outer_grads.outer_layout(subs, out)
    if layout is None:
        return None
    lhs, rhs, shape = outer_grads.factors(subs, out, xs, layout)   # (nb, nl, nj), (nb, nj, nr)
    nb, nj, nr = rhs.shape
    if nj > DIAGONAL_MAX:
        return None
    diag = xp.zeros((nb, nj, nj, nr), dtype=xp.result_type(lhs, rhs))
    ks = xp.arange(nj)
    diag[:, ks, ks, :] = rhs
    result = xp.empty(shape, dtype=diag.dtype)
    with single_threaded_blas(xp):
        xp.matmul(lhs, diag.reshape(nb, nj, nj * nr), out=result.reshape(nb, lhs.shape[1], nj * nr))
    return result  # owns its memory, so the executor may sum into it in place


def _aligned(x, sub: str, out: str):
    """View of x with its axes in ``out``'s order and size-1 axes for indices it lacks."""
    order = sorted(range(len(sub)), key=lambda k: out.index(sub[k]))
    shape = [x.shape[sub.index(i)] if i in sub else 1 for i in out]
    return x.transpose(order).reshape(shape)


@einsum.forward
def _(xp, *xs, eq):
    subs, out = parse_equation(eq, len(xs))
    return contract(xp, subs, out, *xs), {"operands": xs}


@einsum.vjp
def _(xp, saved, g, needs, *, eq):
    xs = saved["operands"]
    subs, out = parse_equation(eq, len(xs))
    grads = []
    for k, (sub, x) in enumerate(zip(subs, xs)):
        if not needs[k]:
            grads.append(None)
            continue
        others = [s for j, s in enumerate(subs) if j != k]
        present = set(out).union(*others)
        kept = "".join(i for i in sub if i in present)  # indices only x has are broadcast back
        operands = (g, *[xs[j] for j in range(len(xs)) if j != k])
        deferred = outer_grads.defer(xp, [out] + others, kept, operands) if kept == sub else None
        if deferred is not None:  # an outer product, summed with its kind by the executor
            grads.append(deferred)
            continue
        gk = contract(xp, [out] + others, kept, *operands)
        if kept != sub:
            gk = xp.broadcast_to(gk.reshape([x.shape[sub.index(i)] if i in kept else 1
                                             for i in sub]), x.shape)
        grads.append(gk)
    return tuple(grads)
