"""Fusion: run recognised subgraphs as one op, without changing the graph.

The YAML, the DAG and everything drawn from them stay as written; only the executor
runs a lowered copy of the DAG and plan. One pattern is recognised, routing's weighted
sum::

    e = expand_dims(c, axis)      # (N, 1152, 10) -> (N, 1152, 10, 1)
    m = mul(e, u)                 # broadcast     -> (N, 1152, 10, 16)
    s = sum(m, axis)              #               -> (N, 10, 16)

runs as ``s = einsum(c, u, eq="nij,nijd->njd")``. The product ``m`` is never
materialised (one pass over ``u`` instead of a write and a read of an array as large
as ``u``), and the reverse pass runs einsum's VJP: ``dc`` straight from ``g`` and ``u``
without the full-size product ``g * u`` that mul's VJP makes before the executor sums
it back to ``c``'s shape. The lowered op is the existing ``einsum`` op, so its forward
and VJP are the ones tests/test_ops_grad.py checks, with the same ``xp`` code on NumPy
and CuPy; tests/test_fast_paths.py checks the fused graph against the unfused one.

The executor lowers every plan when ``Options.fusion`` is on (the default).
"""
from __future__ import annotations

import dataclasses
import string
import weakref

import networkx as nx

from capsflow.core.schedule import Plan, last_uses

_cache: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


@dataclasses.dataclass(frozen=True)
class Fusion:
    """One recognised expand_dims -> mul -> sum chain and the einsum that replaces it."""
    expand: str
    mul: str
    sum: str
    inputs: tuple          # the einsum's operands, in mul's operand order
    c_slot: int            # which of them is expand_dims' input
    eq: str


def find_weighted_sums(dag: nx.DiGraph, plan: Plan) -> list:
    """Every expand_dims -> mul -> sum chain in ``plan`` whose two intermediate values
    nobody else reads, with the einsum equation that computes it in one step."""
    step_set = set(plan.steps)
    keep = set(plan.outputs.values()) | {plan.loss}
    found = []
    for s in plan.steps:
        node = dag.nodes[s]
        if node["op"] != "sum" or node["attrs"].get("keepdims"):
            continue
        m = node["inputs"][0]
        if not _private(dag, m, s, step_set, keep) or dag.nodes[m].get("op") != "mul":
            continue
        a, b = dag.nodes[m]["inputs"]
        for slot, e in ((0, a), (1, b)):
            other = b if slot == 0 else a
            if (dag.nodes[e].get("op") == "expand_dims" and other != e
                    and _private(dag, e, m, step_set, keep)):
                eq = _equation(dag, e, other, m, s, slot)
                if eq is not None:
                    c = dag.nodes[e]["inputs"][0]
                    inputs = (c, other) if slot == 0 else (other, c)
                    found.append(Fusion(e, m, s, inputs, slot, eq))
                    break
    return found


def _private(dag: nx.DiGraph, node: str, consumer: str, steps: set, keep: set) -> bool:
    """``node`` is an op value read only by ``consumer`` (once) and by nothing else."""
    return (node in steps and node not in keep
            and list(dag.successors(node)) == [consumer]
            and dag.nodes[consumer]["inputs"].count(node) == 1)


def _equation(dag: nx.DiGraph, e: str, other: str, m: str, s: str, slot: int) -> str | None:
    """The einsum equation of sum(mul(expand_dims(c), other)), or None when the shapes
    broadcast in any other way than along the inserted axis."""
    m_shape = tuple(dag.nodes[m]["shape"])
    e_shape = tuple(dag.nodes[e]["shape"])
    if tuple(dag.nodes[other]["shape"]) != m_shape or len(e_shape) != len(m_shape):
        return None
    rank = len(m_shape)
    if rank > len(string.ascii_lowercase):
        return None
    inserted = dag.nodes[e]["attrs"]["axis"] % rank
    if any(e_shape[k] != m_shape[k] for k in range(rank) if k != inserted):
        return None
    letters = string.ascii_lowercase[:rank]
    axis = dag.nodes[s]["attrs"].get("axis")
    summed = set(range(rank)) if axis is None else {
        a % rank for a in (axis if isinstance(axis, list) else [axis])}
    c_sub = "".join(ch for k, ch in enumerate(letters) if k != inserted)
    out = "".join(ch for k, ch in enumerate(letters) if k not in summed)
    subs = (c_sub, letters) if slot == 0 else (letters, c_sub)
    return f"{subs[0]},{subs[1]}->{out}"


def lower(dag: nx.DiGraph, plan: Plan) -> tuple:
    """(dag, plan) with every recognised chain fused; the originals when there is none.

    The lowered DAG is a copy (the caller's DAG is untouched), cached per DAG and set
    of fusions, so a training loop copies it once; the plan is rewritten on each call
    (a pass over its steps), so every field of the caller's plan carries over.
    """
    fusions = tuple(find_weighted_sums(dag, plan))
    if not fusions:
        return dag, plan
    per_dag = _cache.setdefault(dag, {})
    if fusions not in per_dag:
        per_dag[fusions] = _lowered_dag(dag, fusions)
    lowered = per_dag[fusions]
    return lowered, _lowered_plan(lowered, plan, fusions)


def _lowered_dag(dag: nx.DiGraph, fusions: tuple) -> nx.DiGraph:
    lowered = dag.copy()
    for f in fusions:
        node = dict(dag.nodes[f.sum])
        node.update(op="einsum", inputs=list(f.inputs), attrs={"eq": f.eq},
                    fused=("expand_dims", "mul", "sum"))
        lowered.remove_nodes_from([f.expand, f.mul])
        lowered.add_node(f.sum, **node)
        lowered.add_edges_from((ref, f.sum) for ref in f.inputs)
    return lowered


def _lowered_plan(lowered: nx.DiGraph, plan: Plan, fusions: tuple) -> Plan:
    removed = {n for f in fusions for n in (f.expand, f.mul)}
    needs = dict(plan.needs)
    for f in fusions:
        fused_needs = tuple(_wants_gradient(plan, f, k) for k in range(2))
        for n in (f.expand, f.mul, f.sum):
            needs.pop(n, None)
        if any(fused_needs):
            needs[f.sum] = fused_needs
    steps = [n for n in plan.steps if n not in removed]
    # Last uses are recomputed on the lowered DAG: the einsum reads c and the mul's other
    # operand at the sum's step, later than expand_dims and mul read them, so a value
    # that the unfused plan frees after a node declared between them must live longer.
    free_after = last_uses(lowered, steps, set(plan.outputs.values()) | {plan.loss})
    backward = [n for n in reversed(steps) if n in needs]  # as schedule.make_plan orders it
    return dataclasses.replace(plan, steps=steps, free_after=free_after, needs=needs,
                               backward=backward)


def _wants_gradient(plan: Plan, f: Fusion, slot: int) -> bool:
    """Whether the fused einsum must give operand ``slot`` a gradient: exactly when the
    unfused chain would have (through expand_dims for c, through mul for the other)."""
    mul_needs = plan.needs.get(f.mul, (False, False))
    if slot == f.c_slot:
        return bool(mul_needs[f.c_slot] and plan.needs.get(f.expand, (False,))[0])
    return bool(mul_needs[slot])
