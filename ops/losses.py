"""Per-example losses; the graph takes their mean over the batch."""
from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt

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
