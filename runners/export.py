"""``capsflow export GRAPH.yaml [--checkpoint CKPT] -o model.onnx``: the inference forward
pass as an ONNX model (capsflow/export/onnx.py; docs/export.md)."""
from __future__ import annotations

import argparse
from pathlib import Path

from capsflow.cli import add_graph_arguments, compile_from_args
from capsflow.export.onnx import OPSET, export_model, inference_plan
from capsflow.lang.yamlio import parse_override
from capsflow.runners.onnx_diagram import onnx_sketch
from capsflow.runners.render import output_format, write_drawing
from capsflow.runners.training import checkpoint_of, load_model
from capsflow.training.checkpoint import atomic_file, load_npz, params_of


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_graph_arguments(parser)
    parser.add_argument("--checkpoint", metavar="PATH",
                        help="weights: a last.npz/best.npz of capsflow train, or a "
                             "capsflow.save_params file (default: the graph's fresh init, seed 0)")
    parser.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                        help="where to write the ONNX model")
    parser.add_argument("--draw", metavar="PICTURE",
                        help="also draw the model with Graphviz, as Netron shows it; "
                             "format from the suffix: .svg .png .pdf .dot")


def load_weights(args: argparse.Namespace) -> tuple:
    """(graph, params) as eval reads them, or from a plain parameter file, or fresh."""
    if args.checkpoint is None:
        graph = compile_from_args(args)
        inference_plan(graph)  # refusals that need no weights, before making them
        return graph, graph.init_params(seed=0)
    arrays = load_npz(args.checkpoint)  # read once, whichever kind of file it is
    if "meta" in arrays:  # a training checkpoint, with its spec and --set
        overrides = dict(parse_override(o) for o in args.overrides)
        ckpt = checkpoint_of(Path(args.checkpoint), arrays)
        graph, params, _ = load_model(args.graph, ckpt, overrides)
        return graph, params
    graph = compile_from_args(args)
    params = params_of(arrays, args.checkpoint)
    graph.check_params(params)
    return graph, params


def _signature(values) -> str:
    """'x (N, 1, 28, 28), ...' for ONNX graph inputs or outputs."""
    def dims(v):
        return ", ".join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim)
    return ", ".join(f"{v.name} ({dims(v)})" for v in values)


def main(args: argparse.Namespace) -> int:
    picture_format = output_format(Path(args.draw)) if args.draw else None  # before any work
    graph, params = load_weights(args)
    model = export_model(graph, params)
    if args.draw:  # first: a picture that cannot be written leaves no model behind
        write_drawing(onnx_sketch(graph, model).to_graphviz(), Path(args.draw), picture_format)
    out = Path(args.output)
    with atomic_file(out) as f:  # never a half-written model under the name
        f.write(model.SerializeToString())
    print(f"wrote {out}: {graph.spec.name}, {len(model.graph.node)} ONNX nodes (opset {OPSET}), "
          f"{graph.param_count():,} parameters from {args.checkpoint or 'init_params(seed=0)'}")
    print(f"  inputs:  {_signature(model.graph.input)}")
    print(f"  outputs: {_signature(model.graph.output)}")
    if args.draw:
        print(f"drew {args.draw}")
    return 0
