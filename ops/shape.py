"""Ops that move data around without arithmetic, and constants."""
from capsflow.core.opdef import Attr, defop
from capsflow.core.shapes import MAX_NDIM, ShapeError, axis_list, fmt, norm_axis
from capsflow.core.shapes import reshape as reshape_shape

reshape = defop("reshape", inputs=("x",), attrs={"shape": Attr(list)}, saves=("shape_in",),
                doc="reshape to `shape` (ints; one -1 is inferred, e.g. the batch)")


@reshape.shape
def _(x, *, shape):
    if len(shape) > MAX_NDIM or not all(isinstance(d, int) and not isinstance(d, bool)
                                        for d in shape):
        raise ShapeError(f"attribute shape must hold at most {MAX_NDIM} integers (use -1 for "
                         f"the batch), got {shape!r:.80}")
    return reshape_shape(x, shape)


@reshape.forward
def _(xp, x, *, shape):
    return x.reshape(shape), {"shape_in": x.shape}


@reshape.vjp
def _(xp, saved, g, needs, *, shape):
    return (g.reshape(saved["shape_in"]),)


transpose = defop("transpose", inputs=("x",), attrs={"axes": Attr(list)},
                  doc="permute axes, e.g. axes: [0, 2, 1]")


@transpose.shape
def _(x, *, axes):
    if len(axes) != len(x) or not all(type(a) is int for a in axes) \
            or sorted(axes) != list(range(len(x))):
        raise ShapeError(f"axes {axes!r:.80} is not a permutation of the {len(x)} axes of {fmt(x)}")
    return tuple(x[a] for a in axes)


@transpose.forward
def _(xp, x, *, axes):
    return x.transpose(axes)


@transpose.vjp
def _(xp, saved, g, needs, *, axes):
    inverse = [0] * len(axes)
    for k, a in enumerate(axes):
        inverse[a] = k
    return (g.transpose(inverse),)


expand_dims = defop("expand_dims", inputs=("x",), attrs={"axis": Attr(int)},
                    doc="insert an axis of size 1 (for broadcasting)")


@expand_dims.shape
def _(x, *, axis):
    k = norm_axis(axis, len(x) + 1)
    return tuple(x[:k]) + (1,) + tuple(x[k:])


@expand_dims.forward
def _(xp, x, *, axis):
    return xp.expand_dims(x, axis)


@expand_dims.vjp
def _(xp, saved, g, needs, *, axis):
    return (xp.squeeze(g, axis=axis),)


zeros = defop("zeros", inputs=("like",), attrs={"dims": Attr(list)}, nondiff=("like",),
              doc="zeros of shape [like.shape[d] for d in dims] and like's dtype "
                  "(e.g. routing logits sized from u_hat, batch included)")


@zeros.shape
def _(like, *, dims):
    return tuple(like[d] for d in axis_list(dims, len(like), "dims"))


@zeros.forward
def _(xp, like, *, dims):
    return xp.zeros(tuple(like.shape[d] for d in dims), dtype=like.dtype)


@zeros.vjp
def _(xp, saved, g, needs, *, dims):
    return (None,)
