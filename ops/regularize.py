"""Regularisation: dropout. Its mode is chosen by data, never by a global flag: fed a
seed, the op is in training mode and draws its mask from that seed; without one it is
the identity (evaluation, prediction, export). The trainer feeds a graph input named
``dropout_seed`` (runners/training.py, docs/training.md "Dropout"); evaluation never does.
"""
from math import floor, isfinite

from capsflow.core.opdef import defop
from capsflow.core.shapes import ShapeError, fmt

dropout = defop(
    "dropout", inputs=("x", "seed?"), attrs={"rate": 0.5}, saves=("keep",),
    nondiff=("seed",),
    doc="inverted dropout: with a seed (one number, shape [1] or []; training), each value is kept with "
        "probability 1 - rate and scaled by 1 / (1 - rate), the rest are 0, the mask drawn "
        "from xp.random.RandomState(floor(seed) mod 2**32), so one seed is one mask; "
        "without a seed (evaluation) the identity")


def seed_value(seed) -> int:
    """The generator seed of a fed seed (one value, shape () or (1,)): floor(seed) mod
    2**32. (A graph input arrives in the parameters' float dtype; float32 holds whole
    numbers exactly up to 2**24.)"""
    value = float(seed.reshape(()))
    if not isfinite(value):
        raise ValueError(f"dropout: the seed must be a finite number, got {value}")
    return floor(value) % 2 ** 32


@dropout.shape
def _(x, seed=None, *, rate):
    if not 0 <= rate < 1:
        raise ShapeError(f"dropout: rate must lie in [0, 1), got {rate}")
    if seed is not None and tuple(seed) not in ((), (1,)):
        raise ShapeError(f"dropout: the seed must be one number (shape [1] or []), "
                         f"got {fmt(seed)}")
    return x


@dropout.forward
def _(xp, x, seed=None, *, rate):
    if seed is None:  # evaluation: nothing dropped, nothing scaled
        return x, {"keep": None}
    draws = xp.random.RandomState(seed_value(seed)).random_sample(x.shape)
    keep = draws >= rate
    out = x * keep
    out *= 1.0 / (1.0 - rate)
    return out, {"keep": keep}


@dropout.vjp
def _(xp, saved, g, needs, *, rate):
    keep = saved["keep"]
    if keep is None:
        return g, None
    gx = g * keep
    gx *= 1.0 / (1.0 - rate)
    return gx, None
