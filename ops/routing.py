"""Ops that routing variants need beyond the paper's: leaky softmax and Efficient-CapsNet's
exponential squash (graphs/routing/leaky.yaml and graphs/routing/efficient.yaml)."""
from capsflow.core.opdef import defop
from capsflow.core.shapes import norm_axis

from .caps import capsule_axis_shape

leaky_softmax = defop(
    "leaky_softmax", inputs=("x",), attrs={"axis": -1}, saves=("out",),
    doc="softmax over axis with an extra zero 'orphan' logit, which is dropped: "
        "exp(x) / (1 + sum(exp(x), axis)); the outputs sum to less than 1")


@leaky_softmax.shape
def _(x, *, axis):
    norm_axis(axis, len(x))
    return x


@leaky_softmax.forward
def _(xp, x, *, axis):
    # Subtract max(x, 0), the largest logit including the orphan's 0, so nothing overflows.
    top = xp.maximum(x.max(axis=axis, keepdims=True), 0)
    e = xp.exp(x - top)
    return e / (xp.exp(-top) + e.sum(axis=axis, keepdims=True))


@leaky_softmax.vjp
def _(xp, saved, g, needs, *, axis):
    # The orphan logit is a constant, so the Jacobian of the real columns is softmax's:
    # d out_j / d x_k = out_j (delta_jk - out_k).
    out = saved["out"]
    return (out * (g - (g * out).sum(axis=axis, keepdims=True)),)


squash_exp = defop(
    "squash_exp", inputs=("s",), attrs={"axis": -1, "eps": 1e-7}, saves=("s",),
    doc="Efficient-CapsNet's squash (1 - exp(-r)) s / r with r = sqrt(|s|^2 + eps), "
        "over the capsule axis")


squash_exp.shape(lambda s, *, axis, eps: capsule_axis_shape("squash_exp", s, axis, eps))


def _radius(xp, s, axis, eps):
    return xp.sqrt((s * s).sum(axis=axis, keepdims=True) + eps)


def _factor(xp, r):
    """f(r) = (1 - e^-r) / r, and its limit 1 at r = 0 (eps = 0 and a zero capsule):
    expm1 keeps 1 - e^-r accurate for the small r of unused capsules."""
    positive = r > 0
    return xp.where(positive, -xp.expm1(-r) / xp.where(positive, r, 1), 1)


@squash_exp.forward
def _(xp, s, *, axis, eps):
    return s * _factor(xp, _radius(xp, s, axis, eps))


@squash_exp.vjp
def _(xp, saved, g, needs, *, axis, eps):
    # v = f(r) s with f(r) = (1 - e^-r) / r and dr/ds = s / r, so
    # J^T g = f g + (f'(r) / r) <g, s> s, and f'(r) r = e^-r - f, so the second term is
    # (e^-r - f) <g, s / r> s / r: bounded factors (f'(r) / r = ... / r^3 overflows
    # float32 for long capsules), and 0 at s = 0, where 1/r is taken as 1.
    s = saved["s"]
    r = _radius(xp, s, axis, eps)
    f = _factor(xp, r)
    inv_r = 1 / xp.where(r > 0, r, 1)
    k = (xp.exp(-r) - f) * ((g * s).sum(axis=axis, keepdims=True) * inv_r) * inv_r
    return (f * g + k * s,)
