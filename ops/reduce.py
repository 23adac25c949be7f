"""Reductions over one or more axes."""
from capsflow.core.opdef import Attr, defop
from capsflow.core.shapes import ShapeError, axis_list, non_negative_eps

AXIS = Attr((int, list, type(None)), None)


def _axes(axis, ndim: int) -> tuple:
    if axis is None:
        return tuple(range(ndim))
    axes = sorted(axis_list(axis if isinstance(axis, list) else [axis], ndim, "axis"))
    if len(set(axes)) != len(axes):
        raise ShapeError(f"axis {axis} names an axis twice")
    return tuple(axes)


def _reduced_shape(x, axis, keepdims):
    axes = _axes(axis, len(x))
    if keepdims:
        return tuple(1 if k in axes else d for k, d in enumerate(x))
    return tuple(d for k, d in enumerate(x) if k not in axes)


def _expand_back(xp, g, shape, axis, keepdims):
    """Broadcast a reduced gradient back to the input's shape."""
    if not keepdims:
        g = xp.expand_dims(g, _axes(axis, len(shape)))
    return xp.broadcast_to(g, shape)


sum_ = defop("sum", inputs=("x",), attrs={"axis": AXIS, "keepdims": False}, saves=("shape",),
             doc="sum over axis (an int, a list, or null for all)")
sum_.shape(lambda x, *, axis, keepdims: _reduced_shape(x, axis, keepdims))


@sum_.forward
def _(xp, x, *, axis, keepdims):
    return x.sum(axis=_axes(axis, x.ndim), keepdims=keepdims), {"shape": x.shape}


@sum_.vjp
def _(xp, saved, g, needs, *, axis, keepdims):
    return (_expand_back(xp, g, saved["shape"], axis, keepdims),)

mean = defop("mean", inputs=("x",), attrs={"axis": AXIS, "keepdims": False}, saves=("shape",),
             doc="mean over axis (an int, a list, or null for all)")
mean.shape(lambda x, *, axis, keepdims: _reduced_shape(x, axis, keepdims))


@mean.forward
def _(xp, x, *, axis, keepdims):
    return x.mean(axis=_axes(axis, x.ndim), keepdims=keepdims), {"shape": x.shape}


@mean.vjp
def _(xp, saved, g, needs, *, axis, keepdims):
    shape = saved["shape"]
    count = 1
    for k in _axes(axis, len(shape)):
        count *= shape[k]
    return (_expand_back(xp, g / count, shape, axis, keepdims),)


norm = defop("norm", inputs=("x",), attrs={"axis": -1, "eps": 0.0}, saves=("x", "out"),
             doc="vector length |x| = sqrt(sum(x^2, axis)); eps > 0 gives "
                 "sqrt(sum(x^2, axis) + eps) instead")


@norm.shape
def _(x, *, axis, eps):
    non_negative_eps("norm", eps)
    return _reduced_shape(x, axis, False)


@norm.forward
def _(xp, x, *, axis, eps):
    n2 = (x * x).sum(axis=axis)
    return xp.sqrt(n2 + eps) if eps else xp.sqrt(n2)


@norm.vjp
def _(xp, saved, g, needs, *, axis, eps):
    # out = sqrt(|x|^2 + eps), d out / dx = x / out. With eps = 0 that is x / |x|, which
    # is defined as 0 where |x| = 0 (as PyTorch's norm backward): there x = 0, so dividing
    # by 1 in place of 0 gives 0 without ever computing 0/0.
    out = saved["out"]
    safe = xp.where(out > 0, out, 1)
    return (xp.expand_dims(g / safe, axis) * saved["x"],)
