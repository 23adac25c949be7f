"""Runs a Plan: the forward pass over op forwards, the reverse pass over op VJPs.

No composite backward exists anywhere: the reverse pass only calls per-op VJPs and
sums the contributions that meet at a value, reducing broadcast gradients to the
value's shape at that one place. Contributions that are outer products may arrive
factored (capsflow/core/gradients.py); their sum is made when the value's VJP needs it.
"""
from __future__ import annotations

import sys
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from capsflow.core import fusion

from capsflow.core import gradients as outer_grads

from capsflow.core import profile
from capsflow.core.memory import LiveBytes
from capsflow.core.opdef import OPS
from capsflow.core.schedule import Plan


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


def _call(prof, phase: str, name: str, node: dict, fn, *args, **attrs) -> Any:
    """``fn(*args, **attrs)``, timed into ``prof`` when profiling is on."""
    if prof is None:
        return fn(*args, **attrs)
    label = node["op"] + (f" ({'+'.join(node['fused'])})" if "fused" in node else "")
    return prof.call(phase, name, label, fn, *args, **attrs)


def execute(dag: nx.DiGraph, plan: Plan, values: dict, xp: Any, meter: LiveBytes | None = None,
            grad_hook: Any = None) -> RunResult:
    """Evaluate ``plan`` given ``values`` (inputs and parameters as backend arrays).

    With a ``meter``, the bytes of live arrays are counted after every op (its peak is
    the result's ``peak_bytes``); without one, nothing is counted.

    ``grad_hook(consumer, value, slot, gradient)``, if given, sees every gradient
    contribution of the reverse pass (what flows along one DAG edge), e.g. to draw
    gradient norms on the rendered graph.
    """
    meter = meter or _NoMeter()
    if grad_hook is None:  # the hook sees the DAG's own edges, so it gets the unfused graph
        dag, plan = fusion.lower(dag, plan)
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
        out, extras = _split(_call(prof, "forward", name, node, op.forward_fn, xp, *args,
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
    # Outer-product gradients stay factored until summed (outer_grads), except for a hook,
    # which sees every contribution as an array.
    with outer_grads.collecting() if grad_hook is None else nullcontext():
        grads = _reverse(dag, plan, values[plan.loss], saved, shapes, xp, meter, values,
                         grad_hook, prof)
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


class _NoMeter:
    peak = 0

    def sample(self, *containers: Any) -> int:
        return 0


def _refcount(a: Any) -> int:
    return sys.getrefcount(a)


def _probe_refcount() -> int:
    fresh = object()  # referenced by this local alone
    return _refcount(fresh)


#: What ``_refcount`` reports for an object held by one local variable of its caller.
_SOLE_REFS = _probe_refcount()


def _private(a: Any) -> bool:
    """``a`` owns its memory (not a view), is writable, and only the caller's local
    variable references it: no other gradient, saved value or view shares it, so
    adding into it in place changes nothing anyone else reads."""
    # a.flags is read inline: the flags object references the array while it lives.
    # CuPy's flags have no 'writeable' (CuPy has no read-only arrays).
    return (getattr(a, "base", 0) is None and hasattr(a, "flags")
            and getattr(a.flags, "writeable", True) and _refcount(a) <= _SOLE_REFS + 1)


def _reverse(dag, plan: Plan, loss_value, saved: dict, shapes: dict, xp, meter, values,
             grad_hook, prof=None) -> dict:
    grads = {plan.loss: xp.ones_like(loss_value)}
    owned: set = set()  # values whose gradient is a sum this loop allocated (nobody else holds it)
    for name in plan.backward:
        node = dag.nodes[name]
        kept = saved.pop(name)
        g = outer_grads.total(xp, grads.pop(name, None))
        owned.discard(name)
        if g is None:  # every path from here to the loss was cut (stop_gradient)
            continue
        op = OPS[node["op"]]
        needs = plan.needs[name]
        contributions = list(_call(prof, "vjp", name, node, op.vjp_fn, xp, kept, g, needs,
                                   **node["attrs"]))
        del kept, g
        for slot, ref in enumerate(node["inputs"]):
            gk = contributions[slot] if slot < len(contributions) else None
            if gk is not None:
                contributions[slot] = None  # so that a private gk is referenced by gk alone
            if not needs[slot] or gk is None:
                continue
            if outer_grads.is_deferred(gk):
                grads[ref] = outer_grads.add(grads[ref], gk) if ref in grads else gk
                owned.discard(ref)  # add() sums the plain part from now on, never in place
                continue
            gk = unbroadcast(xp, gk, shapes[ref])
            if grad_hook is not None:
                grad_hook(name, ref, slot, gk)
            if ref not in grads:
                grads[ref] = gk  # may be a VJP's view or another value's gradient: never written
            elif outer_grads.is_deferred(grads[ref]):
                grads[ref] = outer_grads.add(grads[ref], gk)
            elif ref in owned:
                grads[ref] += gk  # in place: saves allocating (and page-faulting) a new sum
            elif _private(gk) and gk.dtype == grads[ref].dtype:
                gk += grads[ref]  # a fresh array that nothing else references: reuse it
                grads[ref] = gk
                owned.add(ref)
            else:
                grads[ref] = grads[ref] + gk
                owned.add(ref)
            del gk
        del contributions
        meter.sample(values, saved, grads)
    return {p: outer_grads.total(xp, grads.pop(p)) if p in grads else None for p in plan.wrt}
