"""Capsule ops: softmax (for routing), squash, and the decoder's capsule mask."""
from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt, non_negative_eps, norm_axis

softmax = defop("softmax", inputs=("x",), attrs={"axis": -1}, saves=("out",),
                doc="exp(x) / sum(exp(x), axis), max-subtracted so it never overflows")


@softmax.shape
def _(x, *, axis):
    norm_axis(axis, len(x))
    return x


@softmax.forward
def _(xp, x, *, axis):
    e = xp.exp(x - x.max(axis=axis, keepdims=True))
    e /= e.sum(axis=axis, keepdims=True)
    return e


@softmax.vjp
def _(xp, saved, g, needs, *, axis):
    out = saved["out"]
    return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)


squash = defop("squash", inputs=("s",), attrs={"axis": -1, "eps": 0.0}, saves=("s",),
               doc="|s|^2 / (1 + |s|^2) * s / |s|, over the capsule axis (0 at s = 0); "
                   "eps > 0 gives |s|^2 / (1 + |s|^2) * s / sqrt(|s|^2 + eps) instead")


def capsule_axis_shape(op_name: str, s: tuple, axis: int, eps: float) -> tuple:
    """Shape rule of the squash family: same shape, over a real capsule axis."""
    non_negative_eps(op_name, eps)
    norm_axis(axis, len(s))
    if s[axis] == 1:
        raise ShapeError(f"{op_name} over axis {axis} of {fmt(s)} has size 1: "
                         "it must run over the capsule vector, not element-wise")
    return s


squash.shape(lambda s, *, axis, eps: capsule_axis_shape("squash", s, axis, eps))


# squash(s) = f s with n2 = |s|^2, n = |s|:
#   eps = 0 (the paper):  f = n2 / ((1 + n2) n) = n / (1 + n2)      (0 at s = 0: no 0/0)
#   eps > 0:              f = n2 / ((1 + n2) r),  r = sqrt(n2 + eps)
# VJP: J^T g = f g + (f'(n) / n) <g, s> s, the Jacobian being symmetric.
#   eps = 0:  f'(n) = (1 - n2) / (1 + n2)^2, so J^T g = f g + (1 - n2) / ((1 + n2)^2 n) <g, s> s;
#             <g, s> s / n = O(|s|) -> 0 as s -> 0, and is computed with 1/n taken as 1 where
#             n = 0 (there s = 0, so the term is exactly 0): finite, and 0 at s = 0 as it must
#             be (squash is differentiable at 0 with derivative 0).
#   eps > 0:  with f as a function of n2, J^T g = f g + 2 f'(n2) <g, s> s,
#             2 f'(n2) = (n2 + 2 eps - n2^2) / (r^3 (1 + n2)^2), finite at n2 = 0.
# The same formulas, divided one factor at a time: written as one fraction, (1 + n2)^2 n
# and r^3 (1 + n2)^2 overflow float32 from |s| of about 5e7 (eps = 0) or 3e5 (eps > 0),
# which silently dropped the second term (a gradient 10-60% wrong) or made it NaN.
def _has_eps(n2, eps: float) -> bool:
    """Whether the eps formula applies: eps as the arrays hold it (1e-50 is 0 in float32,
    and the CUDA kernels, which take it as a float, use the paper's formula then too)."""
    return bool(eps) and bool(n2.dtype.type(eps))


def squash_factor(xp, n2, eps: float):
    """f(|s|^2) with squash(s) = f s: |s| / (1 + |s|^2), or the eps formula."""
    if _has_eps(n2, eps):
        return n2 / (1 + n2) / xp.sqrt(n2 + eps)
    return xp.sqrt(n2) / (1 + n2)


def squash_grad(xp, s, g, n2, gs, eps: float):
    """dsquash(s)/ds . g from n2 = |s|^2 and gs = <g, s> (summed over the capsule axis
    by the caller: the reference sums with xp, the CPU variant over short axes)."""
    q = 1 + n2
    if _has_eps(n2, eps):
        r = xp.sqrt(n2 + eps)
        f = n2 / q / r
        t = (n2 + 2 * eps) / q / q - (n2 / q) * (n2 / q)   # (n2 + 2 eps - n2^2) / q^2
        return f * g + ((t / r) * (gs / r) / r) * s          # 2 f'(n2) <g, s> = t <g, s> / r^3
    n = xp.sqrt(n2)
    f = n / q
    k = (1 - n2) / q / q * (gs / xp.where(n > 0, n, 1))      # (1 - n2) / (q^2 n) <g, s>
    return f * g + k * s


@squash.forward
def _(xp, s, *, axis, eps):
    return s * squash_factor(xp, (s * s).sum(axis=axis, keepdims=True), eps)


@squash.vjp
def _(xp, saved, g, needs, *, axis, eps):
    s = saved["s"]
    n2 = (s * s).sum(axis=axis, keepdims=True)
    gs = (g * s).sum(axis=axis, keepdims=True)
    return (squash_grad(xp, s, g, n2, gs, eps),)


label_or_argmax = defop(
    "label_or_argmax", inputs=("scores", "label?"), nondiff=("scores", "label"),
    doc="the one-hot label when one is given (training), else one-hot argmax of scores "
        "(inference): the decoder's capsule mask")


@label_or_argmax.shape
def _(scores, label=None):
    if not scores:
        raise ShapeError("label_or_argmax needs scores with a class axis, got a scalar")
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
