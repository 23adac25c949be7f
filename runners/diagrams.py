"""The forward graph and the reverse plan of a compiled graph, as Sketches.

Forward: op nodes are rounded boxes (op name, attributes, node id), graph inputs
blue ellipses, parameters amber ellipses, graph outputs double-bordered; an edge
carries its value's shape (batch shown as N). One solid cluster per stage, one
dashed cluster per iteration of a repeat block (routing/0, routing/1, ...).

Backward: one rose box per VJP that the reverse pass runs, amber Σ circles where
the gradients of several consumers are summed, amber ellipses for the parameter
gradients, and red dashed edges ending in a bar where a non-differentiable input
cuts the flow. With measured norms, each gradient edge is coloured and thickened
by the norm of the gradient it carries.

SVG element ids (for tests and for linking): forward nodes use the spec id and
edges ``fwd:SRC->DST``; backward nodes ``vjp:ID``, ``sum:ID``, ``grad:PARAM`` and
``stop:ID``, gradient edges ``grad:CONSUMER->VALUE`` (``[SLOT]`` appended when one
consumer takes a value twice), summed gradients ``gradsum:VALUE``, cut edges
``cut:CONSUMER->VALUE``; clusters ``stage:NAME``, ``iteration:BLOCK/K`` and ``legend``.
"""
from __future__ import annotations

from collections import Counter

from capsflow.errors import CapsflowError
from capsflow.core.opdef import OPS, REQUIRED

from .drawing import MUTED, LogScale, Sketch, esc, label, norm_text, shape_text
from .gradflow import GradNorms, ReverseFlow

INPUT_FILL = "#dbeafe"
PARAM_FILL = "#fde68a"
OP_FILL = "#ffffff"
VJP_FILL = "#ffe4e6"
SUM_FILL = "#fef08a"
CUT = "#b91c1c"
ITERATION = "#0284c7"    # the seed figure's cyan dashed routing box
GRAPH_ATTRS = {"nodesep": "0.25", "ranksep": "0.35", "labelloc": "t", "fontsize": "18",
               "newrank": "true", "compound": "true"}


# -- what to draw where ----------------------------------------------------------------
def focus_members(graph, focus: str) -> set:
    """DAG nodes of the ``--focus`` region: a node id (or alias such as routing/v),
    a stage name, or an id prefix (``routing`` -> every routing iteration), plus the
    parameters used only there."""
    dag, spec = graph.dag, graph.spec
    target = spec.aliases.get(focus, focus)
    members = {n for n, d in dag.nodes(data=True)
               if n == target or d.get("stage") == focus or n.startswith(focus)}
    if not members:
        stages = sorted({d["stage"] for _, d in dag.nodes(data=True) if d.get("stage")})
        raise CapsflowError(f"--focus '{focus}' matches no node id, id prefix or stage; "
                            f"stages: {', '.join(stages)}; repeat blocks: "
                            f"{', '.join(spec.blocks) or 'none'}")
    for n, d in dag.nodes(data=True):
        consumers = set(dag.successors(n))
        if d["kind"] == "param" and consumers and consumers <= members:
            members.add(n)
    return members


def cluster_path(graph, name: str) -> tuple:
    """Cluster keys from the outside in: ``stage:S`` then ``iteration:BLOCK/K`` for
    each (nested) repeat block. Inputs and parameters go in the innermost cluster
    holding all their consumers."""
    dag = graph.dag
    d = dag.nodes[name]
    if d["kind"] != "op":
        paths = [cluster_path(graph, c) for c in dag.successors(name)]
        return _common_prefix(paths) if paths else ()
    path = [f"stage:{d['stage']}"] if d.get("stage") else []
    block = d.get("block")
    if block is not None:
        parts = block.split("/")
        for k in range(1, len(parts)):  # a block nested in an outer one: outer/0/inner
            outer = "/".join(parts[:k])
            if outer in graph.spec.blocks:
                path.append(f"iteration:{outer}/{parts[k]}")
        path.append(f"iteration:{block}/{d['iteration']}")
    return tuple(path)


def _common_prefix(paths: list) -> tuple:
    first = paths[0]
    n = 0
    while n < len(first) and all(len(p) > n and p[n] == first[n] for p in paths):
        n += 1
    return first[:n]


def declare_clusters(sketch: Sketch, graph) -> None:
    """Labels and styles of every stage and iteration cluster."""
    for _, d in graph.dag.nodes(data=True):
        if d.get("stage"):
            sketch.cluster(f"stage:{d['stage']}", label=d["stage"], style="rounded",
                           color=MUTED, fontsize="15", labeljust="l", penwidth="1.2")
    for block, count in graph.spec.blocks.items():
        for k in range(count):
            sketch.cluster(f"iteration:{block}/{k}", style="dashed", color=ITERATION,
                           fontcolor=ITERATION, penwidth="1.6", labeljust="r", labelloc="b",
                           fontsize="11", label=f"{block}, iteration {k + 1} of {count}")


def short_id(graph, name: str) -> str:
    """The id inside its iteration (routing/1/c -> c); the cluster names the rest."""
    d = graph.dag.nodes[name]
    if d.get("block") is None:
        return name
    return name[len(f"{d['block']}/{d['iteration']}/"):]


def attrs_text(d: dict) -> str:
    """Attributes that differ from the op's defaults, e.g. 'axis=2'."""
    defaults = OPS[d["op"]].attrs
    shown = []
    for key, value in d["attrs"].items():
        default = defaults[key].default
        if default is not REQUIRED and value == default:
            continue
        shown.append(_attr_text(value) if key == "eq" else f"{key}={_attr_text(value)}")
    return " ".join(shown)


def _attr_text(value) -> str:
    if isinstance(value, list):
        return ",".join(map(str, value))
    return f"{value:g}" if isinstance(value, float) else str(value)


def title(graph, what: str, note: str = "") -> str:
    """The drawing's heading: graph name, what is drawn, the variables used."""
    variables = ", ".join(f"{k}={v}" for k, v in graph.spec.vars.items())
    lines = [f"{graph.spec.name}: {what}"] + ([variables] if variables else []) + \
        ([note] if note else [])
    return label(lines[0], *lines[1:])


def _outputs_of(graph) -> dict:
    outs: dict = {}
    for out, node in graph.spec.outputs.items():
        outs.setdefault(node, []).append(out)
    return outs


# -- forward ------------------------------------------------------------------------------
def forward_sketch(graph, focus: str | None = None, rankdir: str = "TB") -> Sketch:
    """The forward DAG: every input, parameter and op node, edges labelled with shapes."""
    dag = graph.dag
    sketch = Sketch(graph.spec.name, {"rankdir": rankdir, "label": title(graph, "forward graph")})
    sketch.graph_attrs.update(GRAPH_ATTRS)
    declare_clusters(sketch, graph)
    outputs = _outputs_of(graph)
    for name in graph.order:
        d = dag.nodes[name]
        where = cluster_path(graph, name)
        if d["kind"] == "input":
            lines = [shape_text(d["shape"]) + (" (optional)" if d.get("optional") else "")]
            sketch.node(name, name, where, id=name, shape="ellipse", style="filled",
                        fillcolor=INPUT_FILL, label=label(name, *lines), tooltip=f"input {name}")
        elif d["kind"] == "param":
            sketch.node(name, name, where, id=name, shape="ellipse", style="filled",
                        fillcolor=PARAM_FILL, label=label(name, shape_text(d["shape"])),
                        tooltip=f"parameter {name}")
        else:
            lines = [short_id(graph, name)] + [f"output '{o}'" for o in outputs.get(name, [])]
            sketch.node(name, name, where, id=name, shape="box", style="rounded,filled",
                        fillcolor=OP_FILL, label=label(d["op"], *lines, sub=attrs_text(d)),
                        peripheries="2" if name in outputs else None,
                        tooltip=f"{name} = {d['op']}({', '.join(d['inputs'])}) "
                                f"-> {shape_text(d['shape'])}  [{d.get('file')}:{d.get('line')}]")
            for ref in dict.fromkeys(d["inputs"]):
                slots = dag.edges[ref, name]["slots"]
                source = dag.nodes[ref]
                text = "" if source["kind"] == "param" else shape_text(source["shape"])
                if len(slots) > 1:
                    text += f" (\u00d7{len(slots)})"
                sketch.edge(ref, name, id=f"fwd:{ref}->{name}", label=text or None,
                            constraint=_ranks_by(graph, ref, name))
    if focus:
        sketch.keep_region(focus_members(graph, focus))
    _forward_legend(sketch)
    return sketch


def _ranks_by(graph, ref: str, consumer: str) -> str | None:
    """'false' for a graph input's edges past its first consumer: x feeds conv1 and,
    for the reconstruction loss, x_flat; ranking x_flat by x would pull the Loss
    stage to the start of the drawing."""
    dag = graph.dag
    if dag.nodes[ref]["kind"] != "input":
        return None
    first = min(dag.successors(ref), key=lambda c: dag.nodes[c]["order"])
    return None if consumer == first else "false"


def _forward_legend(sketch: Sketch) -> None:
    where = ("legend",)
    sketch.cluster("legend", label="Legend", style="rounded", color=MUTED, fontsize="12")
    sketch.node("legend/input", "", where, id="legend:input", shape="ellipse", style="filled",
                fillcolor=INPUT_FILL, label=label("graph input", "shape"))
    sketch.node("legend/param", "", where, id="legend:param", shape="ellipse", style="filled",
                fillcolor=PARAM_FILL, label=label("parameter", "shape"))
    sketch.node("legend/op", "", where, id="legend:op", shape="box", style="rounded,filled",
                fillcolor=OP_FILL, label=label("op", "node id", sub="attributes"))
    sketch.node("legend/output", "", where, id="legend:output", shape="box",
                style="rounded,filled", fillcolor=OP_FILL, peripheries="2",
                label=label("op", "graph output"))
    sketch.edge("legend/input", "legend/op", id="legend:value", label="value shape\n(N = batch)")
    sketch.edge("legend/param", "legend/output", id="legend:param-edge")


# -- backward --------------------------------------------------------------------------
def backward_sketch(graph, flow: ReverseFlow, norms: GradNorms | None = None,
                    focus: str | None = None, rankdir: str = "BT", note: str = "",
                    norm_range: tuple | None = None) -> Sketch:
    """The reverse plan: VJPs, summation points, parameter gradients, cut edges;
    with ``norms``, every gradient edge coloured and sized by its norm on a log
    scale spanning ``norm_range`` (default: the smallest to the largest norm)."""
    dag, plan = graph.dag, flow.plan
    what = "gradient norms of one batch" if norms else "backward graph (reverse plan)"
    sketch = Sketch(graph.spec.name, {"rankdir": rankdir, "label": title(graph, what, note)})
    sketch.graph_attrs.update(GRAPH_ATTRS)
    declare_clusters(sketch, graph)
    scale = LogScale(*(norm_range or norms.range())) if norms else None
    stoppers = {e.consumer for e in flow.cuts}
    totals = norms.totals if norms else {}
    for name in graph.order:
        d = dag.nodes[name]
        where = cluster_path(graph, name)
        if name in plan.needs:
            seed = ["start: \u2202loss/\u2202loss = 1"] if name == plan.loss else []
            sketch.node(name, name, where, id=f"vjp:{name}", shape="box", style="rounded,filled",
                        fillcolor=VJP_FILL, label=label(f"{d['op']} VJP", short_id(graph, name),
                                                        *seed),
                        peripheries="2" if seed else None, tooltip=f"VJP of {name}")
        elif name in flow.params:
            lines = [shape_text(d["shape"])] + ([norm_text(totals.get(name))] if norms else [])
            sketch.node(name, name, where, id=f"grad:{name}", shape="ellipse", style="filled",
                        fillcolor=PARAM_FILL, label=label(f"\u2202loss/\u2202{name}", *lines),
                        tooltip=f"gradient of parameter {name}")
        elif name in stoppers:
            sketch.node(name, name, where, id=f"stop:{name}", shape="box", style="rounded,dashed",
                        color=CUT, fontcolor=CUT,
                        label=label(d["op"], short_id(graph, name), "no gradient to its input"),
                        tooltip=f"{d['op']} is not differentiable in its input")
        else:
            continue
        if name in flow.sums:
            sketch.node(f"sum({name})", name, where, id=f"sum:{name}", shape="circle",
                        style="filled", fillcolor=SUM_FILL, margin="0.02",
                        label=f'<<b>\u03a3</b><br/><font point-size="8">{flow.fan_in[name]} '
                              f'terms</font>>', tooltip=f"sum of the gradients of {name}")
    _gradient_edges(sketch, graph, flow, norms, scale)
    if focus:
        sketch.keep_region(focus_members(graph, focus))
    _backward_legend(sketch, scale)
    return sketch


def _gradient_edges(sketch: Sketch, graph, flow: ReverseFlow, norms: GradNorms | None,
                    scale: LogScale | None) -> None:
    dag = graph.dag
    uses = Counter((e.consumer, e.value) for e in flow.edges)
    for e in flow.edges:
        head = f"sum({e.value})" if e.value in flow.sums else e.value
        ident = f"grad:{e.consumer}->{e.value}"
        if uses[e.consumer, e.value] > 1:  # mul(h, h): one edge per slot
            ident += f"[{e.slot}]"
        value = norms.edges.get((e.consumer, e.value, e.slot)) if norms else None
        sketch.edge(e.consumer, head, id=ident, **_grad_style(
            shape_text(dag.nodes[e.value]["shape"]), norms is not None, value, scale))
    for v in flow.sums:
        value = norms.totals.get(v) if norms else None
        sketch.edge(f"sum({v})", v, id=f"gradsum:{v}",
                    **_grad_style("sum", norms is not None, value, scale))
    for e in flow.cuts:
        sketch.edge(e.consumer, e.value, id=f"cut:{e.consumer}->{e.value}", style="dashed",
                    color=CUT, fontcolor=CUT, arrowhead="tee", penwidth="1.5",
                    label="cut: no gradient")


def _grad_style(text: str, measured: bool, value: float | None, scale: LogScale | None) -> dict:
    if not measured:
        return {"label": text}
    if not value:  # never computed (every path to the loss cut) or exactly zero
        return {"label": f"{text}\n{norm_text(value)}", "style": "dotted", "color": MUTED}
    return {"label": f"{text}\n{norm_text(value)}", "color": scale.colour(value),
            "fontcolor": scale.text_colour(value),
            "penwidth": str(scale.width(value))}


def _backward_legend(sketch: Sketch, scale: LogScale | None) -> None:
    where = ("legend",)
    sketch.cluster("legend", label="Legend", style="rounded", color=MUTED, fontsize="12")
    sketch.node("legend/vjp", "", where, id="legend:vjp", shape="box", style="rounded,filled",
                fillcolor=VJP_FILL, label=label("op VJP", "node id"))
    sketch.node("legend/sum", "", where, id="legend:sum", shape="circle", style="filled",
                fillcolor=SUM_FILL, margin="0.02", label=label("\u03a3", "n terms"))
    sketch.node("legend/param", "", where, id="legend:param", shape="ellipse", style="filled",
                fillcolor=PARAM_FILL, label=label("\u2202loss/\u2202param"))
    sketch.node("legend/stop", "", where, id="legend:stop", shape="box", style="rounded,dashed",
                color=CUT, fontcolor=CUT, label=label("op", "not differentiable"))
    sketch.edge("legend/vjp", "legend/sum", id="legend:grad", label="gradient\nshape")
    sketch.edge("legend/sum", "legend/param", id="legend:gradsum", label="sum")
    sketch.edge("legend/stop", "legend/vjp", id="legend:cut", style="dashed", color=CUT,
                fontcolor=CUT, arrowhead="tee", label="cut")
    if scale is None:
        return
    ticks = scale.ticks()
    cells = "".join(f'<td bgcolor="{scale.colour(t)}"><font color="white" point-size="9">'
                    f"{t:.0e}</font></td>" for t in ticks)
    sketch.node("legend/scale", "", where, id="legend:scale", shape="plain",
                label=f'<<table border="0" cellspacing="0" cellpadding="3"><tr>'
                      f'<td colspan="{len(ticks)}">'
                      f'{esc("gradient norm ‖g‖ (colour and width, log scale)")}</td></tr>'
                      f"<tr>{cells}</tr></table>>")
