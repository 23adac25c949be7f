"""matmul, linear and einsum on CuPy: their references, run on ``Contractions``, an
``xp`` whose ``matmul`` and ``einsum`` are this module's. Every GEMM goes through
capsflow's own cuBLAS call (gemm.py), so that a training step's products can be
captured in a CUDA graph.

A two-operand einsum takes, in this order: a routing kernel for the two contractions of
routing (kernels.routing_contraction); one broadcast multiply into a C-ordered result
for a product that sums over no index (an outer or element-wise product such as the
routing gradient 'nij,njd->nijd', faster than einsum's loop, and never following an
operand's odd strides); else one batched GEMM (``einsum_via_matmul``). Other einsums
are CuPy's. With ``Options.factored_grads`` the factored VJP registered by
capsflow/core/gradients.py comes first (``import capsflow`` registers it before this
package) and makes its other gradients through the einsum variant here.
"""
from __future__ import annotations

from math import prod
from typing import Any

import numpy as np

from capsflow.backends.cuda import kernels
from capsflow.backends.cuda.gemm import matmul_on, merged_stride
from capsflow.core.opdef import OpDef, Variant
from capsflow.ops.linalg import einsum, linear, matmul


class Contractions:
    """``be.xp`` with this module's ``matmul`` and ``einsum``: code written with
    ``xp.matmul`` and ``xp.einsum`` (the references of matmul, linear and einsum) runs
    on it unchanged."""

    def __init__(self, be: Any) -> None:
        self._be = be

    def matmul(self, a: Any, b: Any) -> Any:
        return matmul_on(self._be, a, b)

    def einsum(self, subscripts: str, *operands: Any, optimize: Any = False) -> Any:
        if len(operands) != 2:
            return self._be.xp.einsum(subscripts, *operands, optimize=optimize)
        lhs, out = subscripts.split("->")
        return contract(self._be, lhs.split(","), out, *operands)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._be.xp, name)


def _on_contractions(op: OpDef) -> Variant:
    """A CuPy variant of ``op`` that runs its reference on ``Contractions``."""
    found = op.variant("cupy")
    found.forward(lambda be, *args, **attrs: op.forward_fn(Contractions(be), *args, **attrs))
    found.vjp(lambda be, saved, g, needs, **attrs:
              op.vjp_fn(Contractions(be), saved, g, needs, **attrs))
    return found


gpu_matmul = _on_contractions(matmul)
gpu_einsum = _on_contractions(einsum)
gpu_linear = _on_contractions(linear)


@gpu_linear.vjp
def _(be, saved, g, needs):
    """The reference's GEMMs, and the bias gradient by kernels.column_sums (CuPy's
    generic reduction is slow for a tall array)."""
    gx, gw, _ = linear.vjp_fn(Contractions(be), saved, g, needs[:2])
    needs_gb = len(needs) > 2 and needs[2]
    gb = kernels.column_sums(be.xp, g.reshape(-1, g.shape[-1])) if needs_gb else None
    return gx, gw, gb


def contract(be: Any, subs: list, out: str, a: Any, b: Any) -> Any:
    """The einsum ``subs -> out`` of two operands (see the module docstring)."""
    xp = be.xp
    fused = kernels.routing_contraction(xp, subs, out, (a, b))
    if fused is not None:
        return fused
    if set(subs[0]) | set(subs[1]) == set(out):
        a, b = _aligned(a, subs[0], out), _aligned(b, subs[1], out)
        shape = np.broadcast_shapes(a.shape, b.shape)  # a size 0 against 1 is 0
        return xp.multiply(a, b, out=xp.empty(shape, dtype=xp.result_type(a, b)))
    return einsum_via_matmul(be, subs, out, a, b)


def _aligned(x: Any, sub: str, out: str) -> Any:
    """View of x with its axes in ``out``'s order and size-1 axes for indices it lacks."""
    order = sorted(range(len(sub)), key=lambda k: out.index(sub[k]))
    shape = [x.shape[sub.index(i)] if i in sub else 1 for i in out]
    return x.transpose(order).reshape(shape)


def einsum_via_matmul(be: Any, subs: list, out: str, a: Any, b: Any) -> Any:
    """Two-operand einsum as one batched GEMM into a new C-ordered array: indices in
    both operands and the output are the batch, those in both but not the output are
    contracted, the rest are the rows (from a) and columns (from b). Indices that one
    operand alone has and the output lacks are summed first. cuBLAS writes the product
    straight into the result, in ``out``'s order, whenever the result's axes group into
    the GEMM's batch, rows and columns (u_hat's 'ijdk,nik->nijd': batch i, rows jd,
    columns n)."""
    xp = be.xp
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
        matmul_on(be, a3, b3, out=target)
        return result
    order = batch + rows + cols
    product = matmul_on(be, a3, b3).reshape([size[i] for i in order])
    result[...] = product.transpose([order.index(i) for i in out])
    return result


def _grouped_view(xp: Any, result: Any, out: str, groups: tuple, size: dict) -> Any:
    """``result`` (C-ordered, axes ``out``) as a (len(groups),)-axis strided view, one
    axis per group of indices, or None where a group's indices do not step as one."""
    stride, step = {}, result.itemsize
    for i in reversed(out):
        stride[i] = step
        step *= size[i]
    shape, strides = [], []
    for group in groups:
        merged = merged_stride([size[i] for i in group], [stride[i] for i in group])
        if merged is None:
            return None
        shape.append(prod(size[i] for i in group))
        strides.append(merged)
    return xp.lib.stride_tricks.as_strided(result, shape=shape, strides=strides)


def _sum_private(x: Any, sub: str, other: str, out: str) -> tuple:
    """Sum x over the indices that neither the other operand nor the output has."""
    lone = tuple(k for k, i in enumerate(sub) if i not in other and i not in out)
    if not lone:
        return x, sub
    return x.sum(axis=lone), "".join(i for k, i in enumerate(sub) if k not in lone)
