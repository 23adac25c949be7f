"""Spec -> networkx DAG, with every check a user mistake can trip.

DAG nodes are values: graph inputs (kind "input"), parameters (kind "param") and op
nodes (kind "op", one output each). An edge u -> v carries ``slots``: the positions
at which v consumes u (a value can feed one op twice, e.g. mul(a, a)).
"""
from __future__ import annotations

import difflib
import heapq
import math

import networkx as nx

from capsflow.errors import SpecError
from capsflow.core.opdef import OPS, REQUIRED, get_op
from capsflow.core.shapes import AttrValueError, ShapeError, check_dims, fmt
from capsflow.lang.limits import show
from capsflow.lang.spec import NodeSpec, Spec, output_location


def build_dag(spec: Spec) -> nx.DiGraph:
    """Create the DAG, check names, ops, attributes and cycles, and infer shapes."""
    get_op("relu")  # make sure the op library is registered
    dag = nx.DiGraph(name=spec.name, file=spec.file)
    for order, inp in enumerate(spec.inputs.values()):
        dag.add_node(inp.name, kind="input", shape=inp.shape, optional=inp.optional,
                     line=inp.line, order=order)
    for order, par in enumerate(spec.params.values(), start=len(dag)):
        _claim_name(dag, par.name, par.file or spec.file, par.line)
        dag.add_node(par.name, kind="param", shape=par.shape, trainable=par.trainable,
                     line=par.line, order=order)
    for order, node in enumerate(spec.nodes, start=len(dag)):
        _claim_name(dag, node.id, node.file, node.line)
        op = _lookup_op(node)
        dag.add_node(node.id, kind="op", op=op.name, attrs=_check_attrs(node, op),
                     inputs=list(node.inputs), file=node.file, line=node.line, stage=node.stage,
                     block=node.block, iteration=node.iteration, order=order)
    for node in spec.nodes:
        _check_arity(node, OPS[node.op])
        for slot, ref in enumerate(node.inputs):
            if ref not in dag:
                raise _error(node, f"input '{ref}' is not an input, parameter or node id"
                             + _suggest(ref, dag))
            if dag.has_edge(ref, node.id):
                dag.edges[ref, node.id]["slots"].append(slot)
            else:
                dag.add_edge(ref, node.id, slots=[slot])
    _check_acyclic(dag, spec)
    _check_outputs(dag, spec)
    _infer_shapes(dag, spec)
    return dag


def topological_order(dag: nx.DiGraph) -> list[str]:
    """Kahn's algorithm with an explicit queue, ties broken by declaration order, so the
    order is deterministic and deep unrolled graphs never hit a recursion limit."""
    indegree = {n: dag.in_degree(n) for n in dag}
    ready = sorted((dag.nodes[n]["order"], n) for n, d in indegree.items() if d == 0)
    order: list[str] = []
    heapq.heapify(ready)
    while ready:
        _, n = heapq.heappop(ready)
        order.append(n)
        for m in dag.successors(n):
            indegree[m] -= 1
            if indegree[m] == 0:
                heapq.heappush(ready, (dag.nodes[m]["order"], m))
    return order


# -- checks ------------------------------------------------------------------------------
def _error(node: NodeSpec, message: str) -> SpecError:
    """An error at ``node``; inside a fragment instance it also names the include."""
    if node.context:
        message = f"{message} ({node.context})"
    return SpecError(message, file=node.file, line=node.line, node=node.id)


def _claim_name(dag: nx.DiGraph, name: str, file: str | None, line: int | None) -> None:
    if name in dag:
        raise SpecError(f"duplicate name '{name}': inputs, parameters and node ids share "
                        "one namespace", file=file, line=line, node=name)


def _lookup_op(node: NodeSpec):
    try:
        return get_op(node.op)
    except KeyError:
        raise _error(node, f"unknown op '{node.op}'" + _suggest(node.op, OPS)) from None


def _suggest(name: str, choices) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _check_attrs(node: NodeSpec, op) -> dict:
    unknown = sorted(set(node.attrs) - set(op.attrs))
    if unknown:
        allowed = ", ".join(op.attrs) or "none"
        raise _error(node, f"op '{op.name}' has no attribute '{unknown[0]}' (allowed: {allowed})")
    resolved = {}
    for name, attr in op.attrs.items():
        if name not in node.attrs:
            if attr.default is REQUIRED:
                raise _error(node, f"op '{op.name}' needs attribute '{name}'")
            resolved[name] = attr.default
            continue
        value = node.attrs[name]
        types = attr.type if isinstance(attr.type, tuple) else (attr.type,)
        if float in types and isinstance(value, int) and not isinstance(value, bool):
            value = _to_float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _error(node, f"attribute '{name}' must be {wanted}, got {show(value)}")
        problem = _attr_problem(value)
        if problem:
            raise _error(node, f"attribute '{name}': {problem}, got {show(value)}")
        resolved[name] = value
    return resolved


def _to_float(value: int) -> float | int:
    try:
        return float(value)
    except OverflowError:
        return value  # too large for a float: reported by _attr_problem


def _attr_problem(value) -> str | None:
    """Attribute values are finite numbers, strings, booleans or flat lists of them."""
    items = value if isinstance(value, list) else [value]
    for item in items:
        if isinstance(item, float) and not math.isfinite(item):
            return "numbers must be finite (no NaN or infinity)"
        if isinstance(item, int) and not isinstance(item, bool) and abs(item) > 2 ** 63:
            return "whole numbers must fit in 64 bits"
        if isinstance(item, (list, dict)):
            return "a list attribute holds plain values, not lists or mappings"
    return None


def _check_arity(node: NodeSpec, op) -> None:
    low, high = op.arity()
    if not low <= len(node.inputs) <= high:
        names = ", ".join(op.inputs)
        raise _error(node, f"op '{op.name}' takes inputs ({names}), got {len(node.inputs)}")


def _check_acyclic(dag: nx.DiGraph, spec: Spec) -> None:
    """Kahn's order leaves out exactly the nodes on or behind a cycle; walking back
    from one of them along left-out predecessors must come round to a node already
    seen. Linear time (networkx's find_cycle took seconds on a 20,000-node graph)."""
    left = set(dag) - set(topological_order(dag))
    if not left:
        return
    start = min(left, key=lambda n: dag.nodes[n]["order"])
    walk, seen = [start], {start: 0}
    while True:
        back = min((p for p in dag.predecessors(walk[-1]) if p in left),
                   key=lambda n: dag.nodes[n]["order"])
        if back in seen:
            break
        seen[back] = len(walk)
        walk.append(back)
    cycle = walk[seen[back]:][::-1]  # in the direction of the edges
    first = cycle.index(min(cycle, key=lambda n: dag.nodes[n]["order"]))
    cycle = cycle[first:] + cycle[:first]
    data = dag.nodes[cycle[0]]
    raise SpecError(f"cycle: {' -> '.join(cycle + [cycle[0]])}", file=data.get("file") or spec.file,
                    line=data.get("line"), node=cycle[0])


def _check_outputs(dag: nx.DiGraph, spec: Spec) -> None:
    sources = {n for n, d in dag.nodes(data=True) if d["kind"] in ("input", "param")}
    fed = _descendants(dag, sources)   # one walk for all outputs
    for name, ref in spec.outputs.items():
        target = spec.aliases.get(ref, ref)
        file, line = output_location(spec, name)
        if target not in dag:
            raise SpecError(f"output '{name}' refers to unknown node '{ref}'" + _suggest(ref, dag),
                            file=file, line=line)
        spec.outputs[name] = target
        if target not in fed:
            raise SpecError(f"output '{name}' ('{ref}') depends on no input or parameter",
                            file=file, line=line, node=target)


def _descendants(dag: nx.DiGraph, sources: set) -> set:
    """``sources`` and every node reachable from them."""
    found, stack = set(sources), list(sources)
    while stack:
        for m in dag.successors(stack.pop()):
            if m not in found:
                found.add(m)
                stack.append(m)
    return found


def _infer_shapes(dag: nx.DiGraph, spec: Spec) -> None:
    by_id = {n.id: n for n in spec.nodes}
    for name in topological_order(dag):
        data = dag.nodes[name]
        if data["kind"] != "op":
            continue
        node, op = by_id[name], OPS[data["op"]]
        shapes = [dag.nodes[ref]["shape"] for ref in node.inputs]
        if not op.variadic:
            shapes += [None] * (len(op.inputs) - len(shapes))  # absent optional inputs
        try:
            shape = tuple(op.shape_fn(*shapes, **data["attrs"]))
            check_dims(shape)
        except AttrValueError as exc:
            raise _error(node, str(exc)) from None
        except ShapeError as exc:
            ins = ", ".join(f"{ref} {fmt(dag.nodes[ref]['shape'])}" for ref in node.inputs)
            raise _error(node, f"shape mismatch in {op.name}({ins}): {exc}") from None
        data["shape"] = shape
