"""Element-wise ops. Binary ops broadcast like NumPy; the executor sums each gradient
back to its input's shape, so the VJPs here return full broadcast-shaped gradients."""
from capsflow.core.opdef import defop
from capsflow.core.shapes import broadcast

relu = defop("relu", inputs=("x",), saves=("out",), doc="max(x, 0)")


@relu.shape
def _(x):
    return x


relu.forward(lambda xp, x: xp.maximum(x, 0))
relu.vjp(lambda xp, saved, g, needs: (g * (saved["out"] > 0),))


sigmoid = defop("sigmoid", inputs=("x",), saves=("out",), doc="1 / (1 + exp(-x))")


@sigmoid.shape
def _(x):
    return x


@sigmoid.forward
def _(xp, x):
    e = xp.exp(-xp.abs(x))  # split by sign so exp never overflows
    return xp.where(x >= 0, 1 / (1 + e), e / (1 + e))


sigmoid.vjp(lambda xp, saved, g, needs: (g * saved["out"] * (1 - saved["out"]),))


log_sigmoid = defop("log_sigmoid", inputs=("x",), saves=("x",),
                    doc="ln(1 / (1 + exp(-x))), without the log(sigmoid) underflow")


@log_sigmoid.shape
def _(x):
    return x


@log_sigmoid.forward
def _(xp, x):
    # min(x, 0) - ln(1 + exp(-|x|)): log(sigmoid(x)) is -inf in float32 below x = -104,
    # where this is x
    return xp.minimum(x, 0) - xp.log1p(xp.exp(-xp.abs(x)))


@log_sigmoid.vjp
def _(xp, saved, g, needs):
    x = saved["x"]   # d ln sigmoid(x) / dx = 1 - sigmoid(x) = sigmoid(-x), split by sign
    e = xp.exp(-xp.abs(x))
    return (g * xp.where(x >= 0, e / (1 + e), 1 / (1 + e)),)


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
scale.forward(lambda xp, x, *, by: x * by)
scale.vjp(lambda xp, saved, g, needs, *, by: (g * by,))

offset = defop("offset", inputs=("x",), attrs={"by": 0.0}, doc="x + by, a constant shift")
offset.shape(lambda x, *, by: x)
offset.forward(lambda xp, x, *, by: x + by)
offset.vjp(lambda xp, saved, g, needs, *, by: (g,))

stop_gradient = defop("stop_gradient", inputs=("x",), nondiff=("x",),
                      doc="identity forward; no gradient flows back through it")
stop_gradient.shape(lambda x: x)
stop_gradient.forward(lambda xp, x: x)
stop_gradient.vjp(lambda xp, saved, g, needs: (None,))
