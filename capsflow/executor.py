"""Runs a Plan: the forward pass over op forwards, the reverse pass over op VJPs.

No composite backward exists anywhere: the reverse pass only calls per-op VJPs and
sums the contributions that meet at a value, reducing broadcast gradients to the
value's shape at that one place.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from . import profile
from .memory import LiveBytes
from .opdef import OPS
from .schedule import Plan


@dataclass
class RunResult:
    outputs: dict
    grads: dict = field(default_factory=dict)
    peak_bytes: int = 0


def _split(result: Any) -> tuple:
    """An op forward returns ``out`` or ``(out, extras)``."""
    return result if isinstance(result, tuple) else (result, {})


def unbroadcast(xp: Any, g: Any, shape: tuple) -> Any:
    """Sum a broadcast gradient back down to ``shape``."""
    if g.shape == tuple(shape):
        return g
    extra = g.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + k for k, d in enumerate(shape) if d == 1 and g.shape[extra + k] != 1)
    return g.sum(axis=axes, keepdims=True).reshape(shape)


def _call(prof, phase: str, name: str, op, fn, *args, **attrs) -> Any:
    """``fn(*args, **attrs)``, timed into ``prof`` when profiling is on."""
    if prof is None:
        return fn(*args, **attrs)
    return prof.call(phase, name, op.name, fn, *args, **attrs)


def execute(dag: nx.DiGraph, plan: Plan, values: dict, xp: Any, meter: LiveBytes | None = None,
            grad_hook: Any = None) -> RunResult:
    """Evaluate ``plan`` given ``values`` (inputs and parameters as backend arrays).

    ``grad_hook(consumer, value, slot, gradient)``, if given, sees every gradient
    contribution of the reverse pass (what flows along one DAG edge), e.g. to draw
    gradient norms on the rendered graph.
    """
    meter = meter or LiveBytes()
    prof = profile.active()
    if prof is not None:
        prof.steps += 1
    values = dict(values)
    for name in plan.absent:
        values[name] = None
    saved: dict = {}
    shapes: dict = {}
    for i, name in enumerate(plan.steps):
        node = dag.nodes[name]
        op = OPS[node["op"]]
        args = [values[ref] for ref in node["inputs"]]
        out, extras = _split(_call(prof, "forward", name, op, op.forward_fn, xp, *args,
                                   **node["attrs"]))
        values[name] = out
        if name in plan.needs:
            saved[name] = _saves(op, node, args, out, extras)
            shapes.update({ref: getattr(values[ref], "shape", None) for ref in node["inputs"]})
        for dead in plan.free_after.get(i, ()):
            values.pop(dead, None)
        meter.sample(values, saved)
    outputs = {k: values[v] for k, v in plan.outputs.items()}
    if plan.loss is None:
        return RunResult(outputs, peak_bytes=meter.peak)
    grads = _reverse(dag, plan, values[plan.loss], saved, shapes, xp, meter, values, grad_hook,
                     prof)
    return RunResult(outputs, grads, meter.peak)


def _saves(op, node: dict, args: list, out: Any, extras: dict) -> dict:
    names = op.input_names(len(args))
    kept = {}
    for key in op.saves:
        if key == "out":
            kept[key] = out
        elif key in names:
            kept[key] = args[names.index(key)]
        elif key in extras:
            kept[key] = extras[key]
        else:
            raise RuntimeError(f"op '{op.name}' declares save '{key}' but its forward "
                               "did not provide it")
    return kept


def _reverse(dag, plan: Plan, loss_value, saved: dict, shapes: dict, xp, meter, values,
             grad_hook, prof=None) -> dict:
    grads = {plan.loss: xp.ones_like(loss_value)}
    for name in plan.backward:
        node = dag.nodes[name]
        kept = saved.pop(name)
        g = grads.pop(name, None)
        if g is None:  # every path from here to the loss was cut (stop_gradient)
            continue
        op = OPS[node["op"]]
        needs = plan.needs[name]
        contributions = _call(prof, "vjp", name, op, op.vjp_fn, xp, kept, g, needs,
                              **node["attrs"])
        del kept, g
        for slot, ref in enumerate(node["inputs"]):
            gk = contributions[slot] if slot < len(contributions) else None
            if not needs[slot] or gk is None:
                continue
            gk = unbroadcast(xp, gk, shapes[ref])
            if grad_hook is not None:
                grad_hook(name, ref, slot, gk)
            grads[ref] = gk if ref not in grads else grads[ref] + gk
        del contributions
        meter.sample(values, saved, grads)
    return {p: grads.pop(p) if p in grads else None for p in plan.wrt}
