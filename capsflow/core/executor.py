"""Runs a Plan: the forward pass over op forwards, the reverse pass over op VJPs.

No composite backward exists anywhere: the reverse pass only calls per-op VJPs and
hands each contribution to the gradient accumulator (core/gradients.py), reducing
broadcast gradients to the value's shape first. Each op runs through its backend's
variant where one applies (core/opdef.py); the executor never knows which backend it
is on beyond passing ``be`` along. Saved arrays die right after their op's VJP.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from capsflow.core import fusion, profile
from capsflow.core.gradients import GradientAccumulator, Outer
from capsflow.core.memory import LiveBytes
from capsflow.core.opdef import OPS
from capsflow.core.schedule import Plan
from capsflow.errors import CapsflowError


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


def _call(prof, phase: str, name: str, node: dict, fn, *args) -> Any:
    """``fn(*args)``, timed into ``prof`` when profiling is on."""
    if prof is None:
        return fn(*args)
    label = node["op"] + (f" ({'+'.join(node['fused'])})" if "fused" in node else "")
    return prof.call(phase, name, label, fn, *args)


def execute(dag: nx.DiGraph, plan: Plan, values: dict, be: Any, meter: LiveBytes | None = None,
            grad_hook: Any = None) -> RunResult:
    """Evaluate ``plan`` given ``values`` (inputs and parameters as arrays of backend
    ``be``, whose options choose fusion, op variants and factored gradients).

    With a ``meter``, the bytes of live arrays are counted as they are made and freed and
    read after every op (its peak is the result's ``peak_bytes``); without one, nothing
    is counted.

    ``grad_hook(consumer, value, slot, gradient)``, if given, sees every gradient
    contribution of the reverse pass (what flows along one DAG edge), e.g. to draw
    gradient norms on the rendered graph. It needs options without fusion and without
    factored gradients, under which every DAG edge carries one plain array.
    """
    if grad_hook is not None and (be.options.fusion or be.options.factored_grads):
        raise CapsflowError("a grad_hook sees every DAG edge's gradient: run it with "
                            "Options(fusion=False, factored_grads=False)")
    meter = meter or _NoMeter()
    if be.options.fusion:
        dag, plan = fusion.lower(dag, plan)
    prof = profile.active()
    if prof is not None:
        prof.steps += 1
    values = dict(values)
    for name in plan.absent:
        values[name] = None
    meter.add(values)
    saved: dict = {}
    shapes: dict = {}
    for i, name in enumerate(plan.steps):
        node = dag.nodes[name]
        op = OPS[node["op"]]
        args = [values[ref] for ref in node["inputs"]]
        result, variant = _call(prof, "forward", name, node, op.run_forward, be, args, node["attrs"])
        out, extras = _split(result)
        values[name] = out
        meter.add(out)
        if name in plan.needs:
            saved[name] = (variant, _saves(op, node, args, out, extras))
            meter.add(saved[name][1])
            shapes.update({ref: getattr(values[ref], "shape", None) for ref in node["inputs"]})
        for dead in plan.free_after.get(i, ()):
            meter.remove(values.pop(dead, None))
        meter.sample(values, saved)
        del args, result, out, extras  # nothing but values and saved may hold an array on
    outputs = {k: values[v] for k, v in plan.outputs.items()}
    if plan.loss is None:
        return RunResult(outputs, peak_bytes=meter.peak)
    grads = _reverse(dag, plan, values[plan.loss], saved, shapes, be, meter, values, grad_hook, prof)
    return RunResult(outputs, grads, meter.peak)


def _saves(op, node: dict, args: list, out: Any, extras: dict) -> dict:
    """What the VJP may read: the declared inputs and output, and every extra array the
    forward returned (a variant's forward may return extras of its own)."""
    names = op.input_names(len(args))
    kept = dict(extras)
    for key in op.saves:
        if key == "out":
            kept[key] = out
        elif key in names:
            kept[key] = args[names.index(key)]
        elif key not in extras:
            raise RuntimeError(f"op '{op.name}' declares save '{key}' but its forward "
                               "did not provide it")
    return kept


class _NoMeter:
    peak = 0

    def add(self, obj: Any) -> None:
        pass

    def remove(self, obj: Any) -> None:
        pass

    def sample(self, *containers: Any) -> int:
        return 0


def _reverse(dag, plan: Plan, loss_value, saved: dict, shapes: dict, be, meter, values,
             grad_hook, prof=None) -> dict:
    xp = be.xp
    grads = GradientAccumulator(be, meter)
    grads.add(plan.loss, xp.ones_like(loss_value))
    for name in plan.backward:
        node = dag.nodes[name]
        variant, kept = saved.pop(name)
        meter.remove(kept)
        g = grads.pop(name)
        if g is None:  # every path from here to the loss was cut (stop_gradient)
            continue
        op = OPS[node["op"]]
        needs = plan.needs[name]
        contributions = _call(prof, "vjp", name, node, op.run_vjp, be, variant, kept, g, needs,
                              node["attrs"])
        del kept, g  # the saved arrays die here, right after their last use
        for slot, ref in enumerate(node["inputs"]):
            gk = contributions[slot] if slot < len(contributions) else None
            if not needs[slot] or gk is None:
                continue
            if not isinstance(gk, Outer):
                gk = unbroadcast(xp, gk, shapes[ref])
                if grad_hook is not None:
                    grad_hook(name, ref, slot, gk)
            grads.add(ref, gk)
        del contributions, gk
        meter.sample(values, saved, grads)
    return {p: grads.pop(p) for p in plan.wrt}
