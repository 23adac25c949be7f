"""softmax and squash on CuPy: one kernel over the last axis, forward and VJP, in place
of a chain of element-wise ops and reductions (kernels.rowwise). Over another axis, or
in another dtype, they decline to the reference."""
from capsflow.backends.cuda import kernels
from capsflow.core.opdef import DECLINED
from capsflow.ops.caps import softmax, squash


def _rowwise(be, name: str, axis: int, *arrays, eps=None):
    """kernels.rowwise, or DECLINED where it does not apply."""
    out = kernels.rowwise(be.xp, name, axis, *arrays, eps=eps)
    return DECLINED if out is None else out


gpu_softmax = softmax.variant("cupy")
gpu_softmax.forward(lambda be, x, *, axis: _rowwise(be, "softmax_fwd", axis, x))


@gpu_softmax.vjp
def _(be, saved, g, needs, *, axis):
    gx = _rowwise(be, "softmax_vjp", axis, saved["out"], g)
    return gx if gx is DECLINED else (gx,)


gpu_squash = squash.variant("cupy")
gpu_squash.forward(lambda be, s, *, axis, eps: _rowwise(be, "squash_fwd", axis, s, eps=eps))


@gpu_squash.vjp
def _(be, saved, g, needs, *, axis, eps):
    gs = _rowwise(be, "squash_vjp", axis, saved["s"], g, eps=eps)
    return gs if gs is DECLINED else (gs,)
