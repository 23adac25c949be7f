"""Capsule ops: softmax (for routing), squash, and the decoder's capsule mask."""
from capsflow.backends.cuda import kernels as cuda_kernels
from capsflow.backends import on_cpu
from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt, norm_axis

softmax = defop("softmax", inputs=("x",), attrs={"axis": -1}, saves=("out",),
                doc="exp(x) / sum(exp(x), axis), max-subtracted so it never overflows")


@softmax.shape
def _(x, *, axis):
    norm_axis(axis, len(x))
    return x


#: Reductions over axes this short run as a loop of element-wise ops (see _reduce).
SHORT_AXIS = 16


def _reduce(xp, kind: str, x, axis):
    """``x.max`` or ``x.sum`` ("max", "sum") over ``axis``, keepdims. NumPy reduces a
    short inner axis (the 10 digit capsules of the routing logits, a capsule's 8 or 16
    dimensions) several times slower than it combines whole slices, so a short axis is
    folded slice by slice."""
    n = x.shape[axis]
    if n > SHORT_AXIS or not on_cpu(xp):  # on a GPU one launch beats n
        return getattr(x, kind)(axis=axis, keepdims=True)
    combine = xp.maximum if kind == "max" else xp.add
    take = [slice(None)] * x.ndim
    take[axis] = slice(0, 1)
    acc = x[tuple(take)].copy()
    for k in range(1, n):
        take[axis] = slice(k, k + 1)
        combine(acc, x[tuple(take)], out=acc)
    return acc


@softmax.forward
def _(xp, x, *, axis):
    fused = cuda_kernels.rowwise(xp, "softmax_fwd", axis, x)
    if fused is not None:
        return fused
    e = xp.exp(x - _reduce(xp, "max", x, axis))
    e /= _reduce(xp, "sum", e, axis)
    return e


@softmax.vjp
def _(xp, saved, g, needs, *, axis):
    out = saved["out"]
    fused = cuda_kernels.rowwise(xp, "softmax_vjp", axis, out, g)
    if fused is not None:
        return (fused,)
    return (out * (g - _reduce(xp, "sum", g * out, axis)),)


squash = defop("squash", inputs=("s",), attrs={"axis": -1, "eps": 1e-7}, saves=("s",),
               doc="|s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps), over the capsule axis")


def capsule_axis_shape(op_name: str, s: tuple, axis: int) -> tuple:
    """Shape rule of the squash family: same shape, over a real capsule axis."""
    norm_axis(axis, len(s))
    if s[axis] == 1:
        raise ShapeError(f"{op_name} over axis {axis} of {fmt(s)} has size 1: "
                         "it must run over the capsule vector, not element-wise")
    return s


squash.shape(lambda s, *, axis, eps: capsule_axis_shape("squash", s, axis))


@squash.forward
def _(xp, s, *, axis, eps):
    fused = cuda_kernels.rowwise(xp, "squash_fwd", axis, s, eps=eps)
    if fused is not None:
        return fused
    n2 = _reduce(xp, "sum", s * s, axis)
    return s * (n2 / ((1 + n2) * xp.sqrt(n2 + eps)))


@squash.vjp
def _(xp, saved, g, needs, *, axis, eps):
    # v = f(n2) s with f(n2) = n2 / ((1 + n2) r), r = sqrt(n2 + eps), n2 = |s|^2.
    # dv/ds . g = f g + 2 f'(n2) <g, s> s, with f' written so it stays finite at n2 = 0.
    s = saved["s"]
    fused = cuda_kernels.rowwise(xp, "squash_vjp", axis, s, g, eps=eps)
    if fused is not None:
        return (fused,)
    n2 = _reduce(xp, "sum", s * s, axis)
    r2 = n2 + eps
    r = xp.sqrt(r2)
    f = n2 / ((1 + n2) * r)
    df = (n2 + 2 * eps - n2 * n2) / (2 * r2 * r * (1 + n2) ** 2)
    return (f * g + (2 * df * _reduce(xp, "sum", g * s, axis)) * s,)


label_or_argmax = defop(
    "label_or_argmax", inputs=("scores", "label?"), nondiff=("scores", "label"),
    doc="the one-hot label when one is given (training), else one-hot argmax of scores "
        "(inference): the decoder's capsule mask")


@label_or_argmax.shape
def _(scores, label=None):
    if label is not None and tuple(label) != tuple(scores):
        raise ShapeError(f"label {fmt(label)} and scores {fmt(scores)} differ in shape")
    return scores


@label_or_argmax.forward
def _(xp, scores, label=None):
    if label is not None:
        return label.astype(scores.dtype, copy=False)
    k = scores.shape[-1]
    return (xp.argmax(scores, axis=-1)[..., None] == xp.arange(k)).astype(scores.dtype)


@label_or_argmax.vjp
def _(xp, saved, g, needs):
    return None, None
