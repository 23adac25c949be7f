"""``capsflow check``: compile a spec and print a table of nodes, shapes and parameters."""
from __future__ import annotations

import argparse
import math

from capsflow.cli import add_graph_arguments, compile_from_args
from capsflow.core.shapes import fmt


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_graph_arguments(parser)
    parser.add_argument("--quiet", action="store_true", help="print only the totals")


def summary_rows(graph) -> list:
    """(node, op, output shape, parameter count) for every value in graph order."""
    rows = []
    for name in graph.order:
        d = graph.dag.nodes[name]
        count = math.prod(d["shape"]) if d["kind"] == "param" else 0
        rows.append((name, d.get("op", d["kind"]), fmt(d["shape"]), count))
    return rows


def decoder_params(graph) -> list:
    """Parameters used only by the Decoder stage (the reconstruction network)."""
    out = []
    for name, d in graph.dag.nodes(data=True):
        if d["kind"] != "param":
            continue
        stages = {graph.dag.nodes[c].get("stage") for c in graph.dag.successors(name)}
        if stages == {"Decoder"}:
            out.append(name)
    return out


def main(args: argparse.Namespace) -> int:
    graph = compile_from_args(args)
    rows = summary_rows(graph)
    if not args.quiet:
        widths = [max(len(str(r[k])) for r in rows + [("node", "op", "shape", "params")])
                  for k in range(4)]
        header = ("node", "op", "output shape", "params")
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in rows:
            print("  ".join([str(r[0]).ljust(widths[0]), str(r[1]).ljust(widths[1]),
                             str(r[2]).ljust(widths[2]), (f"{r[3]:,}" if r[3] else "").rjust(widths[3])]))
    total = graph.param_count()
    decoder = graph.param_count(decoder_params(graph))
    ops = sum(1 for _, d in graph.dag.nodes(data=True) if d["kind"] == "op")
    blocks = ", ".join(f"{b} x{n}" for b, n in graph.spec.blocks.items()) or "none"
    print(f"{graph.spec.file}: {ops} op nodes, repeat blocks: {blocks}")
    print(f"parameters: {total:,} total, {total - decoder:,} without decoder")
    for param in graph.spec.params.values():
        if param.schedule is not None:  # set by the trainer each epoch (docs/spec.md)
            print(f"scheduled: {param.name} {param.scheduled_value(0):g} in the first epoch, "
                  f"{param.schedule.per_epoch:+g} per epoch, until {param.schedule.until:g}")
    return 0
