"""Finite-difference gradient checks, for single ops and for whole graphs.

Both compare the reverse pass with central differences in float64 and report a
relative error ``|fd - analytic| / max(|fd|, |analytic|)`` (norms over the array).
"""
from __future__ import annotations

from typing import Any

import numpy as np

from capsflow.backends import get_backend, to_numpy
from capsflow.core.executor import _saves, _split, unbroadcast
from capsflow.core.gradients import as_array
from capsflow.core.opdef import get_op


def _rel_err(fd: np.ndarray, an: np.ndarray) -> float:
    scale = max(np.linalg.norm(fd), np.linalg.norm(an), 1e-300)
    return float(np.linalg.norm(fd - an) / scale)


def apply_op(name: str, backend: Any, args: list, attrs: dict | None = None) -> tuple:
    """Run one op's forward on ``backend`` (a name or Options: its variant where one
    applies) as the executor would: (out, saved, attributes, variant that ran)."""
    op = get_op(name)
    be = get_backend(backend)
    full = {k: a.default for k, a in op.attrs.items()}
    full.update(attrs or {})
    result, variant = op.run_forward(be, list(args), full)
    out, extras = _split(result)
    return out, _saves(op, {}, args, out, extras), full, variant


def op_gradcheck(name: str, args: list, attrs: dict | None = None, backend: Any = "numpy",
                 eps: float = 1e-6, seed: int = 0) -> list:
    """Relative error of each differentiable input's VJP against central differences, for
    the implementation that runs on ``backend`` (with ``Options(fast_paths=False)`` the
    reference; by default the backend's variant where one applies).

    Checks <g, f(x)> for a random cotangent g, element by element: keep inputs small.
    Returns one float per input (None where the op gives no gradient by design).
    """
    be = get_backend(backend)
    xp = be.xp
    args = [None if a is None else xp.asarray(a, dtype=xp.float64) for a in args]
    op = get_op(name)
    out, saved, full, variant = apply_op(name, be, args, attrs)
    g = xp.asarray(np.random.default_rng(seed).standard_normal(out.shape))
    needs = tuple(a is not None and op.differentiable(k, len(args)) for k, a in enumerate(args))
    analytic = [as_array(be, a) for a in op.run_vjp(be, variant, saved, g, needs, full)]

    def objective(values: list) -> float:
        return float((op.compute(be, *values, **full) * g).sum())

    errors = []
    for k, a in enumerate(args):
        if not needs[k] or analytic[k] is None:
            errors.append(None)
            continue
        an = to_numpy(unbroadcast(xp, analytic[k], a.shape))
        fd = np.zeros(a.shape)
        flat = to_numpy(a).ravel()
        for i in range(flat.size):
            plus, minus = flat.copy(), flat.copy()
            plus[i] += eps
            minus[i] -= eps
            vp = list(args)
            vp[k] = xp.asarray(plus.reshape(a.shape))
            vm = list(args)
            vm[k] = xp.asarray(minus.reshape(a.shape))
            fd.flat[i] = (objective(vp) - objective(vm)) / (2 * eps)
        errors.append(_rel_err(fd, an))
    return errors


def graph_gradcheck(graph: Any, params: dict, inputs: dict, backend: Any = "numpy",
                    seed: int = 0, loss: str = "loss", directions: int = 2) -> dict:
    """Worst relative error per parameter of the whole graph's gradient, in float64.

    Along unit directions d (the gradient's own direction, then random ones) the
    directional derivative <dL/dp, d> is compared with a fourth-order central
    difference of the loss. The step is sized per direction so the loss changes by
    a set fraction of its value (1e-7, 1e-9 and 1e-11; the best agreement counts):
    some CapsNet gradients are ~1e-9 (the decoder behind the capsule mask), where a
    fixed step measures round-off, and a large step crosses ReLU kinks. A gradient (or a
    loss) that is not finite, or a difference that is not, is an error of inf: nothing
    was checked there.
    """
    be = get_backend(backend)
    params = {k: np.asarray(to_numpy(v), dtype=np.float64) for k, v in params.items()}
    inputs = {k: None if v is None else np.asarray(to_numpy(v), dtype=np.float64)
              for k, v in inputs.items()}
    outputs, grads = graph.value_and_grad(params, inputs, backend=backend, loss=loss)
    base = abs(float(to_numpy(outputs[loss]))) or 1.0
    rng = np.random.default_rng(seed)

    def loss_along(name: str, d: np.ndarray, h: float) -> float:
        changed = dict(params)
        changed[name] = params[name] + h * d
        return float(to_numpy(graph.run(changed, inputs, backend=backend, outputs=[loss])[loss]))

    report = {}
    finite_loss = np.isfinite(float(to_numpy(outputs[loss])))
    for name, p in params.items():
        if name not in grads:
            continue
        g = to_numpy(grads[name])
        if not (finite_loss and np.isfinite(g).all()):
            report[name] = float("inf")
            continue
        worst = 0.0
        for k in range(directions):
            d = g.copy() if k == 0 and np.any(g) else rng.standard_normal(p.shape)
            d /= np.linalg.norm(d)
            an = float((g * d).sum())
            measured = [_directional_error(loss_along, name, d, an, base, target)
                        for target in (1e-7, 1e-9, 1e-11)]
            # The best step that measures more than round-off decides; only where every
            # step is round-off (a gradient of about 0) does the round-off allowance.
            clear = [error for error, blurred in measured if not blurred]
            error = min(clear or [error for error, _ in measured])
            worst = max(worst, error if np.isfinite(error) else float("inf"))
        report[name] = worst
    be.synchronize()
    return report


#: Round-off of a float64 loss, relative to its size, that a difference may carry (the
#: loss sums many terms: a hundred machine epsilons).
LOSS_ROUNDOFF = 100 * float(np.finfo(np.float64).eps)


def _directional_error(loss_along, name: str, d: np.ndarray, an: float, base: float,
                       target: float) -> tuple:
    """(relative error, whether round-off blurs it) of a 4th-order central difference
    whose step moves the loss (of size ``base``) by about ``target`` of it.

    The difference carries round-off of its own (the loss's round-off times the
    stencil's 18/12 over the step). Where that is a tenth of the derivatives or more,
    the step measures round-off: the error is then counted without it (a parameter the
    loss ignores has gradient 0 and a difference of round-off, which is agreement, not
    an error of 100%), and flagged, so that a clearer step decides where there is one
    (the allowance is up to 0.3% of the gradient at the smallest step: subtracted
    everywhere, it hid gradients 0.1% wrong)."""
    h = float(np.clip(base * target / max(abs(an), 1e-300), 1e-8, 1e-2))
    f = [loss_along(name, d, t * h) for t in (-2, -1, 1, 2)]
    fd = (f[0] - 8 * f[1] + 8 * f[2] - f[3]) / (12 * h)
    noise = LOSS_ROUNDOFF * base * 18 / (12 * h)
    scale = max(abs(fd), abs(an))
    if scale <= 1e-300:
        return 0.0, True
    if noise < 0.1 * scale:
        return abs(fd - an) / scale, False
    return max(abs(fd - an) - noise, 0.0) / scale, True
