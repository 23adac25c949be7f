"""Element-wise arithmetic: div, sqrt, rsqrt, exp, log and pow. Each computes its formula
as written (no eps, no clipping): inputs outside the domain (sqrt or log of a negative
number, division by 0) give NaN or infinity as in NumPy, so keep them in the domain, e.g.
add an eps in the graph where one is wanted. div broadcasts like add and mul; the executor
sums its gradients back to each input's shape."""
from capsflow.core.opdef import Attr, defop

from .elementwise import _binary

div = _binary("div", "a / b (broadcasting)", saves=("b", "out"))
div.forward(lambda xp, a, b: a / b)


@div.vjp
def _(xp, saved, g, needs):
    # d(a/b)/da = 1/b, d(a/b)/db = -a/b^2 = -(a/b)/b
    b = saved["b"]
    return (g / b if needs[0] else None,
            -g * saved["out"] / b if needs[1] else None)


def _unary(name: str, doc: str, saves: tuple, attrs: dict | None = None):
    op = defop(name, inputs=("x",), attrs=attrs, saves=saves, doc=doc)
    op.shape(lambda x, **_: x)
    return op


sqrt = _unary("sqrt", "sqrt(x), element-wise (x >= 0)", saves=("out",))
sqrt.forward(lambda xp, x: xp.sqrt(x))
sqrt.vjp(lambda xp, saved, g, needs: (g * 0.5 / saved["out"],))   # 1 / (2 sqrt(x))

rsqrt = _unary("rsqrt", "1 / sqrt(x), element-wise (x > 0)", saves=("out",))
rsqrt.forward(lambda xp, x: 1 / xp.sqrt(x))


@rsqrt.vjp
def _(xp, saved, g, needs):
    out = saved["out"]   # d x^(-1/2) / dx = -x^(-3/2) / 2 = -out^3 / 2
    return (g * (-0.5 * out * out * out),)


exp = _unary("exp", "exp(x), element-wise", saves=("out",))
exp.forward(lambda xp, x: xp.exp(x))
exp.vjp(lambda xp, saved, g, needs: (g * saved["out"],))

log = _unary("log", "natural logarithm log(x), element-wise (x > 0)", saves=("x",))
log.forward(lambda xp, x: xp.log(x))
log.vjp(lambda xp, saved, g, needs: (g / saved["x"],))

pow_ = _unary("pow", "x ** exponent, element-wise (x > 0 unless the exponent is a whole "
                     "number)", saves=("x",), attrs={"exponent": Attr(float, 2.0)})
pow_.forward(lambda xp, x, *, exponent: x ** exponent)


@pow_.vjp
def _(xp, saved, g, needs, *, exponent):
    if exponent == 0:  # x ** 0 is constant: 0 * 0 ** -1 would be NaN at x = 0
        return (xp.zeros_like(g),)
    return (exponent * saved["x"] ** (exponent - 1) * g,)
