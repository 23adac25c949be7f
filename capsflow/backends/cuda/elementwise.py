"""relu, sigmoid and scale on CuPy, forward and VJP, in their input's memory order
(layout.in_memory_order): CuPy's element-wise ops return C order whatever the input's
layout, and a convolution's channels-last output would otherwise come back in
(N, C, H, W) order, for the next convolution to copy back. Each runs its op's
reference on the arrays so viewed; relu's VJP is one kernel (kernels.relu_vjp)."""
from capsflow.backends.cuda import kernels
from capsflow.backends.cuda.layout import in_memory_order
from capsflow.core.opdef import OpDef, Variant
from capsflow.ops.elementwise import relu, scale, sigmoid


def _in_memory_order(op: OpDef) -> Variant:
    """A CuPy variant of the one-input ``op``: its reference with the input (forward),
    or the arrays it saves and the output gradient (VJP), viewed in the memory order of
    the first of them."""
    found = op.variant("cupy")

    @found.forward
    def _(be, x, **attrs):
        return in_memory_order(lambda t: op.forward_fn(be.xp, t, **attrs), x)

    @found.vjp
    def _(be, saved, g, needs, **attrs):
        def run(*viewed):  # the saved arrays, then g
            return op.vjp_fn(be.xp, dict(zip(op.saves, viewed)), viewed[-1], needs, **attrs)[0]
        return (in_memory_order(run, *(saved[k] for k in op.saves), g),)

    return found


_in_memory_order(sigmoid)
_in_memory_order(scale)
gpu_relu = _in_memory_order(relu)
_relu_vjp_in_order = gpu_relu.vjp_fn


@gpu_relu.vjp
def _(be, saved, g, needs):
    fused = kernels.relu_vjp(be.xp, g, saved["out"])
    return _relu_vjp_in_order(be, saved, g, needs) if fused is None else (fused,)
