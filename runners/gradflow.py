"""The reverse pass as data: which gradients flow where, and how large they are.

``reverse_flow`` reads the scheduler's reverse plan and lists every gradient
contribution (one per DAG edge whose consumer's VJP sends a gradient to its input),
the values where several contributions are summed (u_hat feeds every routing
iteration), and the edges a non-differentiable input cuts (stop_gradient, the
decoder mask's argmax, the routing logits' zeros). ``measure_grad_norms`` runs one
real forward + reverse pass and records the L2 norm of each of those contributions.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import networkx as nx

from capsflow.backends import Backend, get_backend
from capsflow.errors import CapsflowError
from capsflow.core.opdef import OPS
from capsflow.core.schedule import Plan
from capsflow.options import Options


@dataclass(frozen=True)
class GradEdge:
    """The gradient that ``consumer``'s VJP sends to its input ``value`` at ``slot``."""

    consumer: str
    value: str
    slot: int


@dataclass
class ReverseFlow:
    """The reverse plan of one graph, arranged for drawing.

    ``edges`` lists gradient contributions in the order the reverse pass makes them;
    ``cuts`` the input slots that would carry a gradient if their op were
    differentiable there; ``fan_in[value]`` counts the contributions a value
    receives (more than one: the executor sums them, a summation node in drawings).
    """

    plan: Plan
    edges: list = field(default_factory=list)
    cuts: list = field(default_factory=list)
    fan_in: dict = field(default_factory=dict)

    @property
    def sums(self) -> list:
        """Values whose gradient is a sum of several contributions."""
        return [v for v, n in self.fan_in.items() if n > 1]

    @property
    def params(self) -> list:
        """Parameters that receive a gradient, in graph order."""
        return [p for p in self.plan.wrt if p in self.fan_in]


def loss_output(graph, loss: str) -> str:
    """The node id of output ``loss``, or one clear line when the graph has none."""
    if loss not in graph.spec.outputs:
        raise CapsflowError(f"the graph has no output '{loss}' to differentiate; "
                            f"outputs: {', '.join(graph.spec.outputs)}")
    return graph.spec.outputs[loss]


def reverse_flow(graph, given: set | None = None, loss: str = "loss") -> ReverseFlow:
    """The reverse plan of ``graph`` for ``loss`` when the inputs ``given`` are fed
    (default: every graph input)."""
    loss_output(graph, loss)
    given = set(graph.spec.inputs) if given is None else set(given)
    plan = graph.plan(given, [loss], loss)
    flow = ReverseFlow(plan)
    dag = graph.dag
    for name in plan.backward:
        for slot, ref in enumerate(dag.nodes[name]["inputs"]):
            if plan.needs[name][slot]:
                flow.edges.append(GradEdge(name, ref, slot))
                flow.fan_in[ref] = flow.fan_in.get(ref, 0) + 1
    wants_grad = set(plan.needs) | set(plan.wrt)
    reaches_loss = nx.ancestors(dag, plan.loss)
    for name in reversed(plan.steps):
        if name not in reaches_loss:
            continue
        node = dag.nodes[name]
        count = len(node["inputs"])
        for slot, ref in enumerate(node["inputs"]):
            if ref in wants_grad and not OPS[node["op"]].differentiable(slot, count):
                flow.cuts.append(GradEdge(name, ref, slot))
    return flow


@dataclass
class GradNorms:
    """L2 norms of the gradients of one batch (over the whole batch).

    ``edges[(consumer, value, slot)]``: one contribution; ``totals[value]``: the
    summed gradient of a value (what its own VJP, or the optimizer, receives);
    ``shapes`` the concrete shape of each value's gradient; ``flow`` the reverse
    plan they were measured on.
    """

    flow: ReverseFlow
    loss: float
    batch: int
    edges: dict = field(default_factory=dict)
    totals: dict = field(default_factory=dict)
    shapes: dict = field(default_factory=dict)

    def range(self) -> tuple:
        """(smallest, largest) non-zero norm, contributions and sums; (0, 0) if all vanish."""
        positive = [v for v in [*self.edges.values(), *self.totals.values()] if v > 0]
        return (min(positive), max(positive)) if positive else (0.0, 0.0)

    def to_json(self, about: dict) -> dict:
        """A JSON-ready report: ``about`` (graph, input, parameters) plus the
        numbers in reverse-pass order."""
        flow = self.flow
        edges = [{"from": e.consumer, "to": e.value, "slot": e.slot,
                  "shape": list(self.shapes.get(e.value, ())),
                  "norm": self.edges.get((e.consumer, e.value, e.slot))}
                 for e in flow.edges]
        values = {v: {"norm": self.totals.get(v), "contributions": n,
                      "kind": "param" if v in flow.plan.wrt else "op"}
                  for v, n in flow.fan_in.items()}
        cuts = [{"from": e.consumer, "to": e.value, "slot": e.slot} for e in flow.cuts]
        lo, hi = self.range()
        return {**about, "loss": self.loss, "batch": self.batch,
                "norm_range": {"min": lo, "max": hi},
                "edges": edges, "values": values, "cut": cuts}


def measure_grad_norms(graph, params: dict, inputs: dict,
                       backend: Options | Backend = Options(), loss: str = "loss") -> GradNorms:
    """One forward + reverse pass on ``inputs`` (e.g. x (B, 1, 28, 28), y (B, 10));
    returns the norm of every gradient contribution and of every summed gradient.

    Runs ``backend``'s options without fusion and factored gradients: the gradient hook
    must see each DAG edge's gradient, which those two would merge or leave unmade."""
    given = {k for k, v in inputs.items() if v is not None}
    flow = reverse_flow(graph, given, loss)
    be = get_backend(get_backend(backend).options.replace(fusion=False, factored_grads=False))
    xp = be.xp
    edges: dict = {}
    shapes: dict = {}
    sums: dict = {}  # running sums, kept only where contributions meet

    def hook(consumer: str, value: str, slot: int, g: Any) -> None:
        edges[(consumer, value, slot)] = _norm(xp, g)
        shapes[value] = tuple(int(d) for d in g.shape)
        if flow.fan_in.get(value, 0) > 1:
            sums[value] = g.copy() if value not in sums else sums[value] + g

    outputs, _ = graph.value_and_grad(params, inputs, backend=be, loss=loss,
                                      outputs=[loss], grad_hook=hook)
    totals = {v: _norm(xp, g) for v, g in sums.items()}
    for (_, value, _), n in edges.items():
        totals.setdefault(value, n)  # a single contribution is the whole gradient
    batch = next(int(v.shape[0]) for v in inputs.values() if v is not None)
    return GradNorms(flow, float(outputs[loss]), batch, edges, totals, shapes)


def _norm(xp: Any, g: Any) -> float:
    return float(xp.linalg.norm(g.ravel().astype(xp.float64)))
