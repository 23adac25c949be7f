"""Scheduling: which op nodes run, in what order, when values die, and the reverse plan.

All of it is derived from the DAG: the forward pass runs the ancestors of the requested
outputs in topological order; the reverse pass runs, backwards, the op nodes that lie
between the trainable parameters and the loss. Gradient contributions meet wherever a
value has several consumers (u_hat and W feed every routing iteration); the executor
sums them there, for every op alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from capsflow.errors import CapsflowError
from capsflow.core.opdef import OPS


@dataclass
class Plan:
    steps: list                     # op node ids to evaluate, in order
    free_after: dict                # step index -> values whose last forward use it was
    absent: set                     # optional graph inputs not given (passed as None)
    outputs: dict                   # output name -> node id
    loss: str | None = None
    backward: list = field(default_factory=list)   # op node ids whose VJP runs, in order
    needs: dict = field(default_factory=dict)       # node id -> which inputs want a gradient
    wrt: list = field(default_factory=list)         # parameters that receive gradients

    @property
    def saving(self) -> set:
        return set(self.backward)


def make_plan(dag: nx.DiGraph, order: list, given: set, outputs: dict,
              loss: str | None = None, wrt: list | None = None,
              fed: frozenset = frozenset(), loss_name: str | None = None) -> Plan:
    """Plan a forward pass for ``outputs`` (and a reverse pass for ``loss`` w.r.t. ``wrt``).

    ``outputs`` maps names to node ids; ``None`` as a value would be an error upstream.
    ``fed``: op nodes whose values the caller supplies; they and whatever only they
    need are not run. ``loss_name``: the output name of ``loss``, for messages. Raises
    CapsflowError naming what is missing when a requested output (or the loss) cannot run.
    """
    absent = _absent_inputs(dag, given)
    unavailable = unavailable_nodes(dag, order, absent, fed)
    wanted = dict(outputs)
    # The loss too: a reverse pass without its inputs would fail inside an op.
    checked = list(wanted.items()) + ([(loss_name or loss, loss)] if loss else [])
    for name, node in checked:
        if node in unavailable:
            missing = sorted(unavailable[node])
            raise CapsflowError(f"output '{name}' needs input '{missing[0]}', which was not given")
    targets = set(wanted.values()) | ({loss} if loss else set())
    needed = _upstream(dag, targets, fed)
    steps = [n for n in order if n in needed and dag.nodes[n]["kind"] == "op" and n not in fed]
    plan = Plan(steps, last_uses(dag, steps, targets), absent, wanted, loss)
    if loss:
        _plan_reverse(dag, order, plan, wrt)
    return plan


def _absent_inputs(dag: nx.DiGraph, given: set) -> set:
    absent = set()
    for n, d in dag.nodes(data=True):
        if d["kind"] == "input" and n not in given:
            if not d["optional"]:
                raise CapsflowError(f"missing input '{n}' of shape {d['shape']}")
            absent.add(n)
    return absent


def _upstream(dag: nx.DiGraph, targets: set, fed: frozenset) -> set:
    """``targets`` and their ancestors, not looking past fed nodes (explicit stack)."""
    needed: set = set()
    stack = list(targets)
    while stack:
        n = stack.pop()
        if n in needed:
            continue
        needed.add(n)
        if n not in fed:
            stack.extend(dag.predecessors(n))
    return needed


def unavailable_nodes(dag: nx.DiGraph, order: list, absent: set,
                      fed: frozenset = frozenset()) -> dict:
    """Node id -> the absent inputs it needs in a required (not optional) slot."""
    missing: dict = {n: {n} for n in absent}
    for n in order:
        d = dag.nodes[n]
        if d["kind"] != "op" or n in fed:  # a fed value needs nothing upstream
            continue
        op = OPS[d["op"]]
        names = op.inputs
        for slot, ref in enumerate(d["inputs"]):
            optional = slot < len(names) and names[slot].endswith("?")
            if ref in missing and not (optional and ref in absent):
                missing.setdefault(n, set()).update(missing[ref])
    return missing


def last_uses(dag: nx.DiGraph, steps: list, keep: set) -> dict:
    """Step index -> the op values (not in ``keep``) that ``steps`` last read there."""
    last: dict = {}
    for i, n in enumerate(steps):
        for ref in dag.nodes[n]["inputs"]:
            last[ref] = i
    free: dict = {}
    for ref, i in last.items():
        if ref not in keep and dag.nodes[ref]["kind"] == "op":
            free.setdefault(i, []).append(ref)
    return free


def _plan_reverse(dag: nx.DiGraph, order: list, plan: Plan, wrt: list | None) -> None:
    loss = plan.loss
    if dag.nodes[loss].get("shape") != ():
        raise CapsflowError(f"loss '{loss}' must be a scalar, its shape is {dag.nodes[loss]['shape']}")
    trainable = [n for n in order if dag.nodes[n]["kind"] == "param" and dag.nodes[n]["trainable"]]
    plan.wrt = list(wrt) if wrt is not None else trainable
    requires = set(plan.wrt)
    reaches_loss = nx.ancestors(dag, loss) | {loss}
    step_set = set(plan.steps)
    for n in order:
        d = dag.nodes[n]
        if d["kind"] != "op" or n not in step_set:
            continue
        op = OPS[d["op"]]
        count = len(d["inputs"])
        needs = tuple(ref in requires and op.differentiable(k, count)
                      for k, ref in enumerate(d["inputs"]))
        if any(needs) and n in reaches_loss:
            requires.add(n)
            plan.needs[n] = needs
    plan.backward = [n for n in reversed(plan.steps) if n in plan.needs]
