"""Element-wise ops. Binary ops broadcast like NumPy; the executor sums each gradient
back to its input's shape, so the VJPs here return full broadcast-shaped gradients.

The one-input ops, forward and VJP, work in their input's memory order
(backend.in_memory_order): CuPy's element-wise ops return C order whatever the input's
layout, and a convolution's channels-last output would otherwise come back in
(N, C, H, W) order, for the next convolution to copy back."""
from capsflow.backends.cuda import kernels as cuda_kernels
from capsflow.backends import in_memory_order
from capsflow.core.opdef import defop
from capsflow.core.shapes import broadcast

relu = defop("relu", inputs=("x",), saves=("out",), doc="max(x, 0)")


@relu.shape
def _(x):
    return x


@relu.forward
def _(xp, x):
    return in_memory_order(lambda t: xp.maximum(t, 0), x)


@relu.vjp
def _(xp, saved, g, needs):
    fused = cuda_kernels.relu_vjp(xp, g, saved["out"])
    if fused is None:
        fused = in_memory_order(lambda out, gm: gm * (out > 0), saved["out"], g)
    return (fused,)


sigmoid = defop("sigmoid", inputs=("x",), saves=("out",), doc="1 / (1 + exp(-x))")


@sigmoid.shape
def _(x):
    return x


@sigmoid.forward
def _(xp, x):
    def stable(t):  # split by sign so exp never overflows
        e = xp.exp(-xp.abs(t))
        return xp.where(t >= 0, 1 / (1 + e), e / (1 + e))

    return in_memory_order(stable, x)


@sigmoid.vjp
def _(xp, saved, g, needs):
    return (in_memory_order(lambda out, gm: gm * out * (1 - out), saved["out"], g),)


def _binary(name: str, doc: str, saves: tuple = ()):
    op = defop(name, inputs=("a", "b"), saves=saves, doc=doc)
    op.shape(lambda a, b: broadcast(a, b))
    return op


add = _binary("add", "a + b (broadcasting)")
add.forward(lambda xp, a, b: a + b)
add.vjp(lambda xp, saved, g, needs: (g, g))

sub = _binary("sub", "a - b (broadcasting)")
sub.forward(lambda xp, a, b: a - b)
sub.vjp(lambda xp, saved, g, needs: (g, -g if needs[1] else None))

mul = _binary("mul", "a * b (broadcasting)", saves=("a", "b"))
mul.forward(lambda xp, a, b: a * b)
mul.vjp(lambda xp, saved, g, needs: (g * saved["b"] if needs[0] else None,
                                     g * saved["a"] if needs[1] else None))

scale = defop("scale", inputs=("x",), attrs={"by": 1.0}, doc="x * by, a constant factor")
scale.shape(lambda x, *, by: x)
scale.forward(lambda xp, x, *, by: in_memory_order(lambda t: t * by, x))
scale.vjp(lambda xp, saved, g, needs, *, by: (in_memory_order(lambda t: t * by, g),))

stop_gradient = defop("stop_gradient", inputs=("x",), nondiff=("x",),
                      doc="identity forward; no gradient flows back through it")
stop_gradient.shape(lambda x: x)
stop_gradient.forward(lambda xp, x: x)
stop_gradient.vjp(lambda xp, saved, g, needs: (None,))
