"""A small drawing layer over the graphviz package: nodes in nested clusters, a
focus filter, a colour scale, and deterministic DOT output.

A ``Sketch`` collects nodes (each standing for one DAG node, for ``--focus``),
edges and clusters as plain data, then emits a ``graphviz.Digraph`` in insertion
order, so the same graph always gives the same DOT source and the same picture.
graphviz is imported only when a Digraph is built.
"""
from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from typing import Any

from capsflow.errors import CapsflowError

FONT = "Helvetica"
INK = "#1e293b"          # text and outlines
MUTED = "#64748b"        # secondary text: ids, shapes
CONTEXT = "#94a3b8"      # nodes shown only as neighbours of a --focus region
# Gradient norms, small to large: dark blue (vanishing) ... dark red (exploding).
SCALE = ("#253494", "#2c7fb8", "#1b9e77", "#e6ab02", "#e6550d", "#a50f15")


@dataclass
class Item:
    """One drawn node: ``name`` is its DOT name, ``stands_for`` the DAG node it depicts."""

    name: str
    stands_for: str
    cluster: tuple
    attrs: dict


@dataclass
class Cluster:
    key: str
    attrs: dict
    children: dict = field(default_factory=dict)   # key -> Cluster, in insertion order
    items: list = field(default_factory=list)


@dataclass
class Sketch:
    """Nodes, edges and clusters of one drawing, before graphviz sees them."""

    title: str
    graph_attrs: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)       # name -> Item, in insertion order
    edges: list = field(default_factory=list)       # (tail, head, attrs)
    clusters: dict = field(default_factory=dict)    # key -> attrs of that cluster

    def cluster(self, key: str, **attrs: Any) -> None:
        """Declare a cluster's look (label, style...); ``key`` is also its SVG id."""
        self.clusters.setdefault(key, attrs)

    def node(self, name: str, stands_for: str, cluster: tuple = (), **attrs: Any) -> None:
        self.items[name] = Item(name, stands_for, tuple(cluster), attrs)

    def edge(self, tail: str, head: str, **attrs: Any) -> None:
        self.edges.append((tail, head, attrs))

    # -- focus -----------------------------------------------------------------------
    def keep_region(self, members: set) -> None:
        """Keep the nodes that stand for ``members`` and, greyed out as context, the
        nodes they share an edge with; drop the rest."""
        kept = {n for n, it in self.items.items() if it.stands_for in members}
        context = set()
        for tail, head, _ in self.edges:
            if tail in kept and head not in kept:
                context.add(head)
            elif head in kept and tail not in kept:
                context.add(tail)
        for name in context:
            self.items[name].attrs.update(color=CONTEXT, fontcolor=CONTEXT, style="dashed",
                                          fillcolor="white", peripheries="1")
            self.items[name].attrs["class"] = "context"
        shown = kept | context
        self.items = {n: it for n, it in self.items.items() if n in shown}
        self.edges = [e for e in self.edges if e[0] in shown and e[1] in shown
                      and (e[0] in kept or e[1] in kept)]
        for tail, head, attrs in self.edges:
            if (tail in context or head in context) and "color" not in attrs:
                attrs.update(color=CONTEXT, fontcolor=CONTEXT)  # measured colours stay

    # -- output ------------------------------------------------------------------------
    def to_graphviz(self) -> Any:
        """The sketch as a ``graphviz.Digraph`` (DOT source via ``.source``)."""
        graphviz = import_graphviz()
        dot = graphviz.Digraph(name=self.title, graph_attr={
            "fontname": FONT, "fontcolor": INK, **self.graph_attrs},
            node_attr={"fontname": FONT, "fontsize": "11", "color": INK, "fontcolor": INK},
            edge_attr={"fontname": FONT, "fontsize": "9", "color": INK, "fontcolor": MUTED,
                       "arrowsize": "0.7"})
        root = Cluster("", {})
        for item in self.items.values():
            place = root
            for key in item.cluster:
                if key not in place.children:
                    place.children[key] = Cluster(key, self.clusters.get(key, {}))
                place = place.children[key]
            place.items.append(item)
        _emit(dot, root)
        for tail, head, attrs in self.edges:
            dot.edge(dot_name(tail), dot_name(head), **_strings(attrs))
        return dot


def _emit(parent: Any, cluster: Cluster) -> None:
    for item in cluster.items:
        parent.node(dot_name(item.name), **_strings(item.attrs))
    for key, child in cluster.children.items():
        # Only subgraphs named cluster* are drawn as boxes; the key keeps names unique.
        with parent.subgraph(name=f"cluster {key}") as sub:
            sub.attr(id=key, **_strings(child.attrs))
            _emit(sub, child)


def _strings(attrs: dict) -> dict:
    return {k: str(v) for k, v in attrs.items() if v is not None}


def dot_name(name: str) -> str:
    """A DOT node name for a spec id. The graphviz package reads ``a:b`` in an edge as
    node ``a``, port ``b``; spec ids rarely hold a colon, and get a lookalike here."""
    return name.replace(":", "\u2236")


def import_graphviz() -> Any:
    """The graphviz package, or one line saying how to install it."""
    try:
        import graphviz
    except ImportError:
        raise CapsflowError("drawing needs the graphviz Python package: "
                            "pip install 'capsflow[render]' (or pip install graphviz)") from None
    return graphviz


# -- labels ----------------------------------------------------------------------------
def label(title: str, *lines: str, sub: str = "") -> str:
    """An HTML-like label: ``title`` in bold with ``sub`` small beside it, then
    ``lines`` small and muted below."""
    text = f"<b>{esc(title)}</b>"
    if sub:
        text += f' <font point-size="9">{esc(sub)}</font>'
    for line in lines:
        text += f'<br/><font point-size="9" color="{MUTED}">{esc(line)}</font>'
    return f"<{text}>"


def esc(text: str) -> str:
    return html.escape(str(text), quote=False)


def shape_text(shape: tuple) -> str:
    """(N, 1152, 10, 16) -> 'N×1152×10×16'; a scalar -> 'scalar'."""
    return "\u00d7".join(str(d) for d in shape) if shape else "scalar"


def norm_text(value: float | None) -> str:
    return "no gradient" if value is None else f"\u2016g\u2016 {value:.2e}"


# -- colour scale ----------------------------------------------------------------------
@dataclass(frozen=True)
class LogScale:
    """Maps positive numbers to SCALE colours and pen widths on a log axis from
    ``low`` to ``high``."""

    low: float
    high: float

    def position(self, value: float) -> float:
        """0 at ``low``, 1 at ``high`` (clipped), linear in log10."""
        if value <= 0 or self.low <= 0:
            return 0.0
        span = math.log10(self.high) - math.log10(self.low)
        if span <= 0:
            return 0.5
        return min(1.0, max(0.0, (math.log10(value) - math.log10(self.low)) / span))

    def colour(self, value: float) -> str:
        t = self.position(value) * (len(SCALE) - 1)
        k = min(int(t), len(SCALE) - 2)
        return _mix(SCALE[k], SCALE[k + 1], t - k)

    def text_colour(self, value: float) -> str:
        """The edge colour darkened, so that labels stay readable on white."""
        return _mix(self.colour(value), "#000000", 0.3)

    def width(self, value: float) -> float:
        return round(0.8 + 4.7 * self.position(value), 2)

    def ticks(self, count: int = 5) -> list:
        """``count`` values spread evenly (in log10) from ``low`` to ``high``."""
        if self.low <= 0 or self.high <= self.low:
            return [self.high]
        a, b = math.log10(self.low), math.log10(self.high)
        return [10 ** (a + (b - a) * k / (count - 1)) for k in range(count)]


def _mix(a: str, b: str, t: float) -> str:
    ca = [int(a[k:k + 2], 16) for k in (1, 3, 5)]
    cb = [int(b[k:k + 2], 16) for k in (1, 3, 5)]
    return "#" + "".join(f"{round(x + (y - x) * t):02x}" for x, y in zip(ca, cb))
