"""Capsule ops: softmax (for routing), squash, and the decoder's capsule mask."""
from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt, norm_axis

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
    n2 = (s * s).sum(axis=axis, keepdims=True)
    return s * (n2 / ((1 + n2) * xp.sqrt(n2 + eps)))


@squash.vjp
def _(xp, saved, g, needs, *, axis, eps):
    # v = f(n2) s with f(n2) = n2 / ((1 + n2) r), r = sqrt(n2 + eps), n2 = |s|^2.
    # dv/ds . g = f g + 2 f'(n2) <g, s> s, with f' written so it stays finite at n2 = 0.
    s = saved["s"]
    n2 = (s * s).sum(axis=axis, keepdims=True)
    r2 = n2 + eps
    r = xp.sqrt(r2)
    f = n2 / ((1 + n2) * r)
    df = (n2 + 2 * eps - n2 * n2) / (2 * r2 * r * (1 + n2) ** 2)
    return (f * g + (2 * df * (g * s).sum(axis=axis, keepdims=True)) * s,)


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
