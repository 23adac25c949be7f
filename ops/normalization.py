"""Normalisation: layer normalisation (Ba, Kiros & Hinton 2016, "Layer Normalization")."""
from capsflow.core.opdef import Attr, defop
from capsflow.core.shapes import ShapeError, axis_list, broadcast, fmt, non_negative_eps

layer_norm = defop(
    "layer_norm", inputs=("x", "gamma?", "beta?"),
    attrs={"axis": Attr((int, list), -1), "eps": 1e-5},
    saves=("xhat", "std", "gamma", "beta_shape"),
    doc="(x - mean) / sqrt(var + eps) * gamma + beta, mean and biased variance over axis "
        "(an int or a list); gamma and beta optional, shaped like x's normalised axes "
        "(placed on them) or broadcasting to x; eps=1e-5 as in Ba et al. and PyTorch")


def _axes(axis, ndim: int) -> tuple:
    axes = axis_list(axis if isinstance(axis, list) else [axis], ndim, "axis")
    if not axes:
        raise ShapeError("layer_norm needs at least one axis to normalise over, got []")
    if len(set(axes)) != len(axes):
        raise ShapeError(f"axis {axis} names an axis twice")
    return tuple(sorted(axes))


def _on_axes(p: tuple, x: tuple, axes: tuple) -> bool:
    """Whether gamma/beta of shape ``p`` has exactly the shape of x's normalised axes
    (then it lies along those axes, wherever they are); else it broadcasts to x."""
    return tuple(p) == tuple(x[a] for a in axes)


@layer_norm.shape
def _(x, gamma=None, beta=None, *, axis, eps):
    non_negative_eps("layer_norm", eps)
    axes = _axes(axis, len(x))
    for name, p in (("gamma", gamma), ("beta", beta)):
        if p is None or _on_axes(p, x, axes):
            continue
        try:
            fits = broadcast(x, p) == tuple(x)
        except ShapeError:
            fits = False
        if not fits:
            raise ShapeError(f"layer_norm {name} {fmt(p)} must have the shape of the normalised "
                             f"axes {fmt(tuple(x[a] for a in axes))} of x {fmt(x)}, or "
                             f"broadcast to x")
    return x


def _placed(p, shape: tuple, axes: tuple):
    """gamma/beta ready to broadcast against x (of ``shape``)."""
    if p is None or not _on_axes(p.shape, shape, axes):
        return p
    return p.reshape(tuple(d if k in axes else 1 for k, d in enumerate(shape)))


@layer_norm.forward
def _(xp, x, gamma=None, beta=None, *, axis, eps):
    axes = _axes(axis, x.ndim)
    d = x - x.mean(axis=axes, keepdims=True)
    std = xp.sqrt((d * d).mean(axis=axes, keepdims=True) + eps)
    xhat = d / std
    out = xhat
    if gamma is not None:
        out = out * _placed(gamma, x.shape, axes)
    if beta is not None:
        out = out + _placed(beta, x.shape, axes)
    beta_shape = None if beta is None else beta.shape
    return out, {"xhat": xhat, "std": std, "gamma": gamma, "beta_shape": beta_shape}


def _param_grad(full, shape: tuple, axes: tuple):
    """The gradient of gamma or beta (of ``shape``) from its x-shaped one: summed over the
    other axes where it lies on the normalised axes; else left for the executor to sum
    back to ``shape`` as for any broadcast input."""
    if not _on_axes(shape, full.shape, axes):
        return full
    rest = tuple(k for k in range(full.ndim) if k not in axes)
    return full.sum(axis=rest).reshape(shape)


@layer_norm.vjp
def _(xp, saved, g, needs, *, axis, eps):
    xhat, std, gamma = saved["xhat"], saved["std"], saved["gamma"]
    axes = _axes(axis, xhat.ndim)
    gx = ggamma = gbeta = None
    if needs[0]:
        gxhat = g if gamma is None else g * _placed(gamma, xhat.shape, axes)
        # d xhat / dx for xhat = (x - mean) / sqrt(var + eps), var the biased variance:
        # (gxhat - mean(gxhat) - xhat * mean(gxhat * xhat)) / std
        gx = (gxhat - gxhat.mean(axis=axes, keepdims=True)
              - xhat * (gxhat * xhat).mean(axis=axes, keepdims=True)) / std
    if len(needs) > 1 and needs[1] and gamma is not None:
        ggamma = _param_grad(g * xhat, gamma.shape, axes)
    if len(needs) > 2 and needs[2] and saved["beta_shape"] is not None:
        gbeta = _param_grad(g, saved["beta_shape"], axes)
    return gx, ggamma, gbeta
