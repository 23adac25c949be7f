"""softmax and squash on NumPy, with reductions over short axes folded slice by slice.

NumPy reduces a short inner axis (the 10 digit capsules of the routing logits, a
capsule's 8 or 16 dimensions) several times slower than it combines whole slices, so
over an axis of at most ``SHORT_AXIS`` the max and sum are a loop of element-wise ops.
The arithmetic is the reference's (ops/caps.py); only the order of the reductions'
additions may differ.
"""
import numpy as np

from capsflow.ops.caps import softmax, squash, squash_factor, squash_grad

#: Reductions over axes this short run as a loop of element-wise ops.
SHORT_AXIS = 16


def reduce_axis(kind: str, x, axis):
    """``x.max`` or ``x.sum`` ("max", "sum") over ``axis``, keepdims."""
    n = x.shape[axis]
    if n > SHORT_AXIS:
        return getattr(x, kind)(axis=axis, keepdims=True)
    combine = np.maximum if kind == "max" else np.add
    take = [slice(None)] * x.ndim
    take[axis] = slice(0, 1)
    acc = x[tuple(take)].copy()
    for k in range(1, n):
        take[axis] = slice(k, k + 1)
        combine(acc, x[tuple(take)], out=acc)
    return acc


short_softmax = softmax.variant("numpy")


@short_softmax.forward
def _(be, x, *, axis):
    e = np.exp(x - reduce_axis("max", x, axis))
    e /= reduce_axis("sum", e, axis)
    return e


@short_softmax.vjp
def _(be, saved, g, needs, *, axis):
    out = saved["out"]
    return (out * (g - reduce_axis("sum", g * out, axis)),)


short_squash = squash.variant("numpy")


@short_squash.forward
def _(be, s, *, axis, eps):
    return s * squash_factor(np, reduce_axis("sum", s * s, axis), eps)


@short_squash.vjp
def _(be, saved, g, needs, *, axis, eps):
    # The reference's VJP (ops/caps.py, where the math is) with the short-axis sums.
    s = saved["s"]
    n2 = reduce_axis("sum", s * s, axis)
    gs = reduce_axis("sum", g * s, axis)
    return (squash_grad(np, s, g, n2, gs, eps),)
