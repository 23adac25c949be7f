"""Contractions: matmul, linear (fully connected) and einsum."""
from capsflow.core.opdef import Attr, defop
from capsflow.core.shapes import ShapeError, broadcast, fmt

matmul = defop("matmul", inputs=("a", "b"), saves=("a", "b"),
               doc="batched matrix product a @ b (batch axes broadcast)")


@matmul.shape
def _(a, b):
    if len(a) < 2 or len(b) < 2:
        raise ShapeError(f"matmul needs inputs of 2 or more axes, got {fmt(a)} and {fmt(b)}")
    if a[-1] != b[-2]:
        raise ShapeError(f"matmul inner sizes differ: {fmt(a)} @ {fmt(b)}")
    return broadcast(a[:-2], b[:-2]) + (a[-2], b[-1])


matmul.forward(lambda xp, a, b: xp.matmul(a, b))


@matmul.vjp
def _(xp, saved, g, needs):
    a, b = saved["a"], saved["b"]
    ga = xp.matmul(g, xp.swapaxes(b, -1, -2)) if needs[0] else None
    gb = xp.matmul(xp.swapaxes(a, -1, -2), g) if needs[1] else None
    return ga, gb


linear = defop("linear", inputs=("x", "w", "b?"), saves=("x", "w"),
               doc="x @ w + b with w of shape (in, out): a fully connected layer")


@linear.shape
def _(x, w, b=None):
    if len(w) != 2 or not x or x[-1] != w[0]:
        raise ShapeError(f"linear: input {fmt(x)} does not fit weight {fmt(w)} (in, out)")
    if b is not None and tuple(b) != (w[1],):
        raise ShapeError(f"linear: bias {fmt(b)} should be ({w[1]},)")
    return tuple(x[:-1]) + (w[1],)


@linear.forward
def _(xp, x, w, b=None):
    out = xp.matmul(x, w)
    if b is not None:
        out += b
    return out


@linear.vjp
def _(xp, saved, g, needs):
    x, w = saved["x"], saved["w"]
    g2 = g.reshape(-1, g.shape[-1])
    gx = xp.matmul(g, w.T) if needs[0] else None
    gw = xp.matmul(x.reshape(-1, x.shape[-1]).T, g2) if needs[1] else None
    gb = g2.sum(axis=0) if len(needs) > 2 and needs[2] else None
    return gx, gw, gb


def parse_equation(eq: str, count: int) -> tuple[list[str], str]:
    """'ijdk,nik->nijd' -> (['ijdk', 'nik'], 'nijd'), validated."""
    if eq.count("->") != 1 or "." in eq:
        raise ShapeError(f"einsum equation '{eq:.80}' needs one explicit '->' output and no '...'")
    if len(eq) > 64 * (count + 1):  # each term has at most 52 letters: no need to read on
        raise ShapeError(f"einsum equation '{eq:.80}...' is too long for {count} operands")
    lhs, out = eq.replace(" ", "").split("->")
    subs = lhs.split(",")
    if len(subs) != count:
        raise ShapeError(f"einsum equation '{eq}' names {len(subs)} operands, the node passes {count}")
    for s in subs + [out]:
        if len(set(s)) != len(s) or s and not (s.isascii() and s.isalpha()):
            raise ShapeError(f"einsum term '{s}' in '{eq}' repeats an index or uses non-letters")
    if set(out) - set("".join(subs)):
        raise ShapeError(f"einsum output '{out}' has indices that no operand has")
    return subs, out


einsum = defop("einsum", inputs=("x*",), attrs={"eq": Attr(str)}, saves=("operands",),
               doc="Einstein summation, e.g. eq: 'ijdk,nik->nijd' (explicit output, no '...')")


@einsum.shape
def _(*shapes, eq):
    subs, out = parse_equation(eq, len(shapes))
    sizes: dict = {}
    for s, shape in zip(subs, shapes):
        if len(s) != len(shape):
            raise ShapeError(f"einsum term '{s}' has {len(s)} indices, its operand is {fmt(shape)}")
        for index, dim in zip(s, shape):
            if sizes.setdefault(index, dim) != dim:
                raise ShapeError(f"einsum index '{index}' is {sizes[index]} in one operand "
                                 f"and {dim} in another")
    return tuple(sizes[i] for i in out)


def contract(xp, subs: list, out: str, *xs):
    """einsum of ``xs`` with index strings ``subs`` -> ``out``."""
    return xp.einsum(f"{','.join(subs)}->{out}", *xs, optimize=len(xs) > 1)


def gradient_equation(subs: list, out: str, k: int) -> tuple:
    """einsum's VJP for operand k is an einsum too: (its operand subscripts, with the
    output gradient first, and the subscript it yields). Indices that operand k alone
    has are not in it (the gradient is broadcast back along them)."""
    others = [s for j, s in enumerate(subs) if j != k]
    present = set(out).union(*others)
    return [out] + others, "".join(i for i in subs[k] if i in present)


@einsum.forward
def _(xp, *xs, eq):
    subs, out = parse_equation(eq, len(xs))
    return contract(xp, subs, out, *xs), {"operands": xs}


@einsum.vjp
def _(xp, saved, g, needs, *, eq):
    xs = saved["operands"]
    subs, out = parse_equation(eq, len(xs))
    grads = []
    for k, (sub, x) in enumerate(zip(subs, xs)):
        if not needs[k]:
            grads.append(None)
            continue
        grad_subs, kept = gradient_equation(subs, out, k)
        gk = contract(xp, grad_subs, kept, g, *[xs[j] for j in range(len(xs)) if j != k])
        if kept != sub:
            gk = xp.broadcast_to(gk.reshape([x.shape[sub.index(i)] if i in kept else 1
                                             for i in sub]), x.shape)
        grads.append(gk)
    return tuple(grads)
