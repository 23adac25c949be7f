"""An exported ONNX model drawn as Netron shows it, in the clusters of ``capsflow render``.

One rounded box per ONNX node (its op type, its name, the parameters it reads with their
shapes), edges labelled with the shapes the model declares (batch N), graph inputs and
outputs as ellipses. The nodes sit in the capsflow drawing's stage and iteration
clusters, and the ONNX nodes that one capsflow op became (squash: ReduceSumSquare, Add,
Sqrt, ...) share a dotted box named after that op.
"""
from __future__ import annotations

from collections import Counter

from .diagrams import (GRAPH_ATTRS, INPUT_FILL, OP_FILL, cluster_path, declare_clusters,
                       short_id, title)
from .drawing import MUTED, Sketch, label, shape_text


def onnx_sketch(graph, model) -> Sketch:
    """``model`` (exported from ``graph`` by capsflow.export.onnx) as a Sketch."""
    g = model.graph
    shapes = {v.name: _dims(v) for v in [*g.value_info, *g.input, *g.output]}
    params = {t.name: tuple(t.dims) for t in g.initializer if t.name in graph.dag}
    owners = _owners(graph, [n.name for n in g.node])
    sketch = Sketch(f"{graph.spec.name} (ONNX)",
                    {"rankdir": "TB", "label": title(graph, "exported ONNX model")})
    sketch.graph_attrs.update(GRAPH_ATTRS)
    declare_clusters(sketch, graph)
    for v in g.input:
        sketch.node(v.name, v.name, cluster_path(graph, v.name), shape="ellipse",
                    style="filled", fillcolor=INPUT_FILL,
                    label=label(v.name, shape_text(shapes[v.name])))
    counts = Counter(owners.values())
    for node in g.node:
        owner = owners.get(node.name)
        where, name = (), node.name  # an output's Identity sits outside every cluster
        if owner is not None:
            where, name = cluster_path(graph, owner), short_id(graph, owner)
            if counts[owner] > 1:  # one capsflow op, several ONNX nodes
                op = graph.dag.nodes[owner]["op"]
                sketch.cluster(f"op:{owner}", label=f"{op} {name}", style="dotted,rounded",
                               color=MUTED, fontcolor=MUTED, fontsize="10")
                where += (f"op:{owner}",)
                name = node.name[len(owner) + 1:] or name
        weights = [f"{i} {shape_text(params[i])}" for i in node.input if i in params]
        sketch.node(node.name, owner or node.name, where, shape="box", style="rounded,filled",
                    fillcolor=OP_FILL, label=label(node.op_type, *weights, sub=name),
                    tooltip=node.doc_string or None)
        for i in node.input:
            if i in shapes and i not in params:
                sketch.edge(i, node.name, label=shape_text(shapes[i]))
    for v in g.output:
        sketch.node(f"output:{v.name}", v.name, (), shape="ellipse", peripheries="2",
                    label=label(v.name, shape_text(shapes[v.name])))
        sketch.edge(v.name, f"output:{v.name}")
    return sketch


def _owners(graph, names: list) -> dict:
    """ONNX node name -> the capsflow op node it came from: the node named by that id,
    or a helper named ``id/what``."""
    ops = {n for n, d in graph.dag.nodes(data=True) if d["kind"] == "op"}
    owners = {}
    for name in names:
        owner = name
        while owner not in ops and "/" in owner:
            owner = owner.rsplit("/", 1)[0]
        if owner in ops:
            owners[name] = owner
    return owners


def _dims(value) -> tuple:
    return tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
