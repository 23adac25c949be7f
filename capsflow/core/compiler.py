"""Spec -> networkx DAG, with every check a user mistake can trip.

DAG nodes are values: graph inputs (kind "input"), parameters (kind "param") and op
nodes (kind "op", one output each). An edge u -> v carries ``slots``: the positions
at which v consumes u (a value can feed one op twice, e.g. mul(a, a)).
"""
from __future__ import annotations

import difflib
import heapq

import networkx as nx

from capsflow.errors import SpecError
from capsflow.core.opdef import OPS, REQUIRED, get_op
from capsflow.core.shapes import ShapeError, fmt
from capsflow.lang.spec import NodeSpec, Spec


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
            value = float(value)
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join("null" if t is type(None) else t.__name__ for t in types)
            raise _error(node, f"attribute '{name}' must be {wanted}, got {value!r}")
        resolved[name] = value
    return resolved


def _check_arity(node: NodeSpec, op) -> None:
    low, high = op.arity()
    if not low <= len(node.inputs) <= high:
        names = ", ".join(op.inputs)
        raise _error(node, f"op '{op.name}' takes inputs ({names}), got {len(node.inputs)}")


def _check_acyclic(dag: nx.DiGraph, spec: Spec) -> None:
    try:
        cycle = nx.find_cycle(dag)
    except nx.NetworkXNoCycle:
        return
    path = " -> ".join([u for u, _ in cycle] + [cycle[0][0]])
    first = dag.nodes[cycle[0][0]]
    raise SpecError(f"cycle: {path}", file=first.get("file") or spec.file, line=first.get("line"),
                    node=cycle[0][0])


def _check_outputs(dag: nx.DiGraph, spec: Spec) -> None:
    sources = {n for n, d in dag.nodes(data=True) if d["kind"] in ("input", "param")}
    for name, ref in spec.outputs.items():
        target = spec.aliases.get(ref, ref)
        if target not in dag:
            raise SpecError(f"output '{name}' refers to unknown node '{ref}'" + _suggest(ref, dag),
                            file=spec.file)
        spec.outputs[name] = target
        if target not in sources and not (nx.ancestors(dag, target) & sources):
            raise SpecError(f"output '{name}' ('{ref}') depends on no input or parameter",
                            file=spec.file, node=target)


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
            shape = op.shape_fn(*shapes, **data["attrs"])
        except ShapeError as exc:
            ins = ", ".join(f"{ref} {fmt(dag.nodes[ref]['shape'])}" for ref in node.inputs)
            raise _error(node, f"shape mismatch in {op.name}({ins}): {exc}") from None
        data["shape"] = tuple(shape)
