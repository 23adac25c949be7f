"""Optimizers and learning-rate schedules, written from scratch on NumPy/CuPy.

Parameters live in a flat ``dict[str, array]`` (names such as ``"conv1.w"``)
and are updated in place, so arrays already on the GPU stay where they are.
Optimizer state is a plain dict that converts to and from a flat dict of
host NumPy arrays for ``.npz`` checkpoints.

The update rules match ``torch.optim.Adam`` and ``torch.optim.SGD`` (default
options: no weight decay, no amsgrad, no nesterov, no dampening); ``adam-tf1`` is
Adam as TF1's ``AdamOptimizer`` computes it (the paper's official code).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import numpy as np

from capsflow.backends import get_array_module, get_backend, to_numpy
from capsflow.core.routine import Routine
from capsflow.errors import CapsflowError

Array = Any  # numpy.ndarray or cupy.ndarray
Params = Dict[str, Array]
State = Dict[str, Any]

OPTIMIZERS = ("adam", "adam-tf1", "sgd")

#: Where Adam adds its epsilon: "torch", to the bias-corrected sqrt(v_hat) (Kingma & Ba's
#: Algorithm 1, torch.optim.Adam); "tf1", to sqrt(v) before the bias correction (the
#: paper's "efficient" form, TF1's AdamOptimizer, which the CapsNet paper's code used).
ADAM_EPS_FORMS = ("torch", "tf1")


def get_xp(arr: Array) -> Any:
    """Return the array module (``numpy`` or ``cupy``) that owns ``arr``."""
    return get_array_module(arr)


def to_host(arr: Array) -> np.ndarray:
    """Copy ``arr`` to a NumPy array (CuPy arrays via ``.get()``)."""
    return to_numpy(arr)


class OptimizerError(CapsflowError, ValueError):
    """A bad optimizer name or setting passed by the user."""


def _check_same_keys(params: Params, grads: Params) -> None:
    missing = sorted(set(params) - set(grads))
    extra = sorted(set(grads) - set(params))
    if missing or extra:
        raise KeyError(
            f"grads do not match params: missing {missing}, unexpected {extra}"
        )


class Adam:
    """Adam (Kingma & Ba), same arithmetic as ``torch.optim.Adam``; with
    ``eps_form="tf1"``, as TF1's ``AdamOptimizer`` (ADAM_EPS_FORMS).

    State: ``{"t": int, "m": {name: array}, "v": {name: array}}`` where each
    moment array has the shape and dtype of its parameter.
    """

    def __init__(
        self,
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        eps_form: str = "torch",
    ) -> None:
        if lr < 0:
            raise OptimizerError(f"learning rate must be >= 0, got {lr}")
        b1, b2 = betas
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise OptimizerError(f"betas must lie in [0, 1), got {betas}")
        self.lr = float(lr)
        self.betas = (float(b1), float(b2))
        if eps_form not in ADAM_EPS_FORMS:
            raise OptimizerError(f"Adam's eps_form must be one of {', '.join(ADAM_EPS_FORMS)}, "
                                 f"got {eps_form!r}")
        self.eps = float(eps)
        self.eps_form = eps_form
        self.name = "adam" if eps_form == "torch" else "adam-" + eps_form

    def init_state(self, params: Params) -> State:
        """Zero moments shaped like each parameter, step counter 0."""
        return {
            "t": 0,
            "m": {k: get_xp(p).zeros_like(p) for k, p in params.items()},
            "v": {k: get_xp(p).zeros_like(p) for k, p in params.items()},
        }

    def step(self, params: Params, grads: Params, state: State,
             lr: Optional[float] = None, backend: Any = None) -> None:
        """Apply one Adam update to ``params`` and ``state`` in place.

        ``grads[name]`` has the shape of ``params[name]``; ``lr`` overrides
        ``self.lr`` for this step (e.g. from a schedule); ``backend`` as in ``apply``.
        """
        _check_same_keys(params, grads)
        self.apply(params, grads, state, self.advance(state, lr), backend)

    def advance(self, state: State, lr: Optional[float] = None) -> Tuple[float, float]:
        """Count one step in ``state`` and return its (step_size, divisor of sqrt(v)).

        ``apply`` computes p -= step_size * m / (sqrt(v) / divisor + eps). The host half
        of a step: ``apply`` does the array work. A recorded step (training/train_step.py)
        replays only ``apply`` and reads these two numbers from a device buffer.
        """
        lr = self.lr if lr is None else float(lr)
        b1, b2 = self.betas
        state["t"] = int(state["t"]) + 1
        t = state["t"]
        bias1, bias2_sqrt = 1.0 - b1 ** t, (1.0 - b2 ** t) ** 0.5
        if self.eps_form == "tf1":
            # TF1: lr_t = lr * sqrt(bc2) / bc1; p -= lr_t * m / (sqrt(v) + eps)
            return lr * bias2_sqrt / bias1, 1.0
        # torch: step_size = lr / bc1; denom = sqrt(v) / sqrt(bc2) + eps
        return lr / bias1, bias2_sqrt

    def apply(self, params: Params, grads: Params, state: State, hyper: Any,
              backend: Any = None) -> None:
        """The array half of a step: update ``params`` and the moments in place.

        ``hyper`` is ``advance``'s pair, as Python floats or as a float64 device array
        (which a backend's fused update reads when it runs). A device array may carry a
        third value, ``go``: where it is 0 nothing changes (see training/train_step.py).
        ``backend`` (a name, Options or Backend; by default the parameters' array
        library) chooses the implementation (``adam_update``).
        """
        be = get_backend(backend if backend is not None
                         else get_array_module(*params.values()).__name__)
        adam_update(be, params, grads, state, hyper, self.betas, self.eps)


def _adam_update_reference(xp: Any, params: Params, grads: Params, state: State, hyper: Any,
                           betas: Tuple[float, float], eps: float) -> None:
    """Adam's array work with ``xp``, as torch.optim.Adam does it."""
    host_hyper = tuple(float(h) for h in to_host(hyper))
    if len(host_hyper) > 2 and host_hyper[2] == 0:
        return
    step_size, bias2_sqrt = host_hyper[:2]
    b1, b2 = betas
    for name, p in params.items():
        g = grads[name]
        m = state["m"][name]
        v = state["v"][name]
        # m = b1*m + (1-b1)*g, written as torch's lerp: m += (g - m)*(1-b1)
        m += (g - m) * (1.0 - b1)
        v *= b2
        v += (1.0 - b2) * (g * g)
        # out= keeps 0-d parameters as arrays (xp.sqrt would return a scalar)
        denom = xp.sqrt(v, out=xp.empty_like(v))
        denom /= bias2_sqrt
        denom += eps
        # p -= step_size * m / denom, reusing denom as the scratch buffer
        xp.divide(m, denom, out=denom)
        denom *= step_size
        p -= denom


#: ``adam_update(be, params, grads, state, hyper, betas, eps)``: Adam's array half; a
#: backend may register a fused variant (one kernel per parameter on CuPy).
adam_update = Routine("adam_update", _adam_update_reference)


class SGD:
    """SGD with heavy-ball momentum, same arithmetic as ``torch.optim.SGD``.

    ``buf = momentum * buf + g`` (``buf = g`` on the first step), then
    ``p -= lr * buf``. With ``momentum == 0`` it is plain SGD.
    State: ``{"t": int, "buf": {name: array}}``.
    """

    name = "sgd"

    def __init__(self, lr: float = 1e-2, momentum: float = 0.9) -> None:
        if lr < 0:
            raise OptimizerError(f"learning rate must be >= 0, got {lr}")
        if momentum < 0:
            raise OptimizerError(f"momentum must be >= 0, got {momentum}")
        self.lr = float(lr)
        self.momentum = float(momentum)

    def init_state(self, params: Params) -> State:
        """Momentum buffers shaped like each parameter, step counter 0."""
        return {
            "t": 0,
            "buf": {k: get_xp(p).zeros_like(p) for k, p in params.items()},
        }

    def step(self, params: Params, grads: Params, state: State,
             lr: Optional[float] = None, backend: Any = None) -> None:
        """Apply one SGD update to ``params`` and ``state`` in place (one ``xp`` code
        path on every backend, so ``backend`` is accepted and not needed)."""
        _check_same_keys(params, grads)
        lr = self.lr if lr is None else float(lr)
        first = int(state["t"]) == 0
        state["t"] = int(state["t"]) + 1
        for name, p in params.items():
            g = grads[name]
            if self.momentum == 0.0:
                p -= lr * g
                continue
            buf = state["buf"][name]
            if first:
                buf[...] = g  # torch seeds the buffer with the first gradient
            else:
                buf *= self.momentum
                buf += g
            p -= lr * buf


Optimizer = Union[Adam, SGD]


def make_optimizer(name: str, lr: float) -> Optimizer:
    """Build an optimizer by name (one of OPTIMIZERS) with default options."""
    key = name.strip().lower()
    if key == "adam":
        return Adam(lr=lr)
    if key == "adam-tf1":
        return Adam(lr=lr, eps_form="tf1")
    if key == "sgd":
        return SGD(lr=lr)
    raise OptimizerError(
        f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}"
    )


#: The learning-rate schedules (TrainConfig.lr_schedule; docs/training.md).
SCHEDULES = ("per-epoch", "per-step")


class ExponentialDecay:
    """The learning rate as training goes on, one of two exponential decays:

    * ``per-epoch`` (the common one, e.g. the Keras CapsNet port): ``base_lr * factor **
      epoch``, constant within an epoch (epoch counts from 0);
    * ``per-step`` (the paper's official code, TensorFlow's ``exponential_decay`` without
      staircase): ``base_lr * factor ** (step / every)`` with ``step`` the number of updates
      already made, never below ``floor`` (``tf.maximum(lr, 1e-6)`` there).
    """

    def __init__(self, base_lr: float, factor: float, kind: str = "per-epoch",
                 every: int = 2000, floor: float = 0.0) -> None:
        if factor <= 0:
            raise OptimizerError(f"decay factor must be > 0, got {factor}")
        if kind not in SCHEDULES:
            raise OptimizerError(f"unknown learning-rate schedule {kind!r}; choose one of: "
                                 f"{', '.join(SCHEDULES)}")
        if every < 1:
            raise OptimizerError(f"the decay interval must be >= 1 step, got {every}")
        self.base_lr, self.factor = float(base_lr), float(factor)
        self.kind, self.every, self.floor = kind, int(every), float(floor)

    def lr_at(self, epoch: int, step: int = 0) -> float:
        """Learning rate of the update made in ``epoch`` after ``step`` earlier updates."""
        if self.kind == "per-epoch":
            return self.base_lr * self.factor ** int(epoch)
        return max(self.base_lr * self.factor ** (int(step) / self.every), self.floor)


def state_to_flat(state: State) -> Dict[str, np.ndarray]:
    """Flatten optimizer state to host arrays for ``np.savez``.

    Keys: ``"t"`` (0-d int64) and ``"<slot>/<param name>"`` such as
    ``"m/conv1.w"``; parameter names may contain dots but not ``/``
    in the slot part, so the first ``/`` splits slot from name.
    """
    flat: Dict[str, np.ndarray] = {"t": np.asarray(int(state["t"]), dtype=np.int64)}
    for slot, arrays in state.items():
        if slot == "t":
            continue
        if "/" in slot:
            raise OptimizerError(f"optimizer state slot name {slot!r} must not contain '/'")
        for name, arr in arrays.items():
            flat[f"{slot}/{name}"] = to_host(arr)
    return flat


def state_from_flat(flat: Dict[str, np.ndarray], xp: Any = np) -> State:
    """Rebuild optimizer state from :func:`state_to_flat` output.

    Arrays are moved onto ``xp`` (``numpy`` or ``cupy``) with their dtype kept.
    """
    if "t" not in flat:
        raise OptimizerError(
            "optimizer state has no step counter 't'; pass a dict from state_to_flat")
    state: State = {"t": int(np.asarray(flat["t"]))}
    for key, arr in flat.items():
        if key == "t":
            continue
        slot, sep, name = key.partition("/")
        if not sep or not name:
            raise OptimizerError(
                f"bad optimizer state key {key!r}; expected '<slot>/<param name>'"
            )
        state.setdefault(slot, {})[name] = xp.array(arr)
    return state
