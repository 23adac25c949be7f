"""Per-example losses; the graph takes their mean over the batch."""
from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt, norm_axis

margin_loss = defop(
    "margin_loss", inputs=("lengths", "target"),
    attrs={"m_plus": 0.9, "m_minus": 0.1, "down_weight": 0.5},
    saves=("lengths", "target"), nondiff=("target",),
    doc="sum_k T_k max(0, m+ - L_k)^2 + down_weight (1 - T_k) max(0, L_k - m-)^2 -> (N,)")


@margin_loss.shape
def _(lengths, target, **_):
    if tuple(lengths) != tuple(target):
        raise ShapeError(f"lengths {fmt(lengths)} and one-hot target {fmt(target)} differ in shape")
    if not lengths:
        raise ShapeError("margin_loss needs the class axis last, got a 0-D input")
    return tuple(lengths[:-1])


@margin_loss.forward
def _(xp, lengths, target, *, m_plus, m_minus, down_weight):
    present = xp.maximum(m_plus - lengths, 0)
    absent = xp.maximum(lengths - m_minus, 0)
    return (target * present ** 2 + down_weight * (1 - target) * absent ** 2).sum(axis=-1)


@margin_loss.vjp
def _(xp, saved, g, needs, *, m_plus, m_minus, down_weight):
    lengths, target = saved["lengths"], saved["target"]
    present = xp.maximum(m_plus - lengths, 0)
    absent = xp.maximum(lengths - m_minus, 0)
    d = -2 * target * present + 2 * down_weight * (1 - target) * absent
    return g[..., None] * d, None


sum_squared_error = defop(
    "sum_squared_error", inputs=("pred", "target"), saves=("pred", "target"),
    doc="sum((pred - target)^2) over the last axis -> one number per example")


@sum_squared_error.shape
def _(pred, target):
    if tuple(pred) != tuple(target):
        raise ShapeError(f"prediction {fmt(pred)} and target {fmt(target)} differ in shape")
    if not pred:
        raise ShapeError("sum_squared_error sums over the last axis; it got a 0-D input")
    return tuple(pred[:-1])


@sum_squared_error.forward
def _(xp, pred, target):
    d = pred - target
    return (d * d).sum(axis=-1)


@sum_squared_error.vjp
def _(xp, saved, g, needs):
    d = 2 * (saved["pred"] - saved["target"]) * g[..., None]
    return d if needs[0] else None, -d if needs[1] else None


log_softmax = defop("log_softmax", inputs=("x",), attrs={"axis": -1}, saves=("out",),
                    doc="x - log(sum(exp(x), axis)), max-subtracted so it never overflows")


def _log_softmax(xp, x, axis):
    z = x - x.max(axis=axis, keepdims=True)
    return z - xp.log(xp.exp(z).sum(axis=axis, keepdims=True))


@log_softmax.shape
def _(x, *, axis):
    norm_axis(axis, len(x))
    return x


log_softmax.forward(lambda xp, x, *, axis: _log_softmax(xp, x, axis))


@log_softmax.vjp
def _(xp, saved, g, needs, *, axis):
    # d out_j / d x_k = delta_jk - softmax_k
    return (g - xp.exp(saved["out"]) * g.sum(axis=axis, keepdims=True),)


softmax_cross_entropy = defop(
    "softmax_cross_entropy", inputs=("logits", "target"), saves=("target", "prob"),
    nondiff=("target",),
    doc="-sum(target * log_softmax(logits), -1) -> one number per example; target one-hot "
        "(or probability rows), class axis last; max-subtracted, stable for large logits")


@softmax_cross_entropy.shape
def _(logits, target):
    if tuple(logits) != tuple(target):
        raise ShapeError(f"logits {fmt(logits)} and target {fmt(target)} differ in shape")
    if not logits:
        raise ShapeError("softmax_cross_entropy needs the class axis last, got a 0-D input")
    return tuple(logits[:-1])


@softmax_cross_entropy.forward
def _(xp, logits, target):
    logp = _log_softmax(xp, logits, -1)
    return -(target * logp).sum(axis=-1), {"prob": xp.exp(logp)}


@softmax_cross_entropy.vjp
def _(xp, saved, g, needs):
    # d/dz of -sum_k t_k (z_k - logsumexp(z)) = softmax(z) sum_k t_k - t
    target = saved["target"]
    d = saved["prob"] * target.sum(axis=-1, keepdims=True) - target
    return g[..., None] * d, None
