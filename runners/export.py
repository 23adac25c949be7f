"""``capsflow export GRAPH.yaml [--checkpoint CKPT] -o model.onnx``: the inference forward
pass as an ONNX model (capsflow/export/onnx.py; docs/export.md)."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from capsflow.cli import add_graph_arguments, check_output_file, compile_from_args
from capsflow.errors import CapsflowError
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
        check_sources(args, graph)
        inference_plan(graph)  # refusals that need no weights, before making them
        return graph, graph.init_params(seed=0)
    arrays = load_npz(args.checkpoint)  # read once, whichever kind of file it is
    if "meta" in arrays:  # a training checkpoint, with its spec and --set
        overrides = dict(parse_override(o) for o in args.overrides)
        ckpt = checkpoint_of(Path(args.checkpoint), arrays)
        graph, params, _ = load_model(args.graph, ckpt, overrides)
        check_sources(args, graph)
        return graph, params
    graph = compile_from_args(args)
    check_sources(args, graph)
    params = params_of(arrays, args.checkpoint)
    try:
        graph.check_params(params)
    except CapsflowError as exc:  # say which file, and what it is not
        raise CapsflowError(f"{args.checkpoint}: {exc}: it is not a parameter file of "
                            f"{graph.spec.name}") from None
    return graph, params


def check_outputs(args: argparse.Namespace) -> str | None:
    """One line, before any work, for an -o or --draw that cannot be written or that
    names a file the command reads (the model's rename would replace the checkpoint or
    the graph it comes from), or the same file; the picture's format."""
    check_output_file(args.output, "-o")
    picture_format = None
    if args.draw:
        check_output_file(args.draw, "--draw")
        picture_format = output_format(Path(args.draw))
        if _same_file(args.draw, args.output):
            raise CapsflowError(f"--draw {args.draw} is the -o file; name another file")
    read = [("the graph file", args.graph)]
    if args.checkpoint is not None:
        read.append(("the --checkpoint file", args.checkpoint))
    _refuse_inputs(args, read)
    return picture_format


def check_sources(args: argparse.Namespace, graph) -> None:
    """The same for the files the graph was read from: its bases and fragments."""
    _refuse_inputs(args, [("a file of the graph", source) for source in graph.spec.sources])


def _refuse_inputs(args: argparse.Namespace, read: list) -> None:
    for flag, path in (("-o", args.output), ("--draw", args.draw)):
        for what, other in read if path is not None else ():
            if _same_file(path, other):
                raise CapsflowError(f"{flag} {path} is {what}, which writing it would "
                                    f"replace; name another file")


def _same_file(a, b) -> bool:
    """Whether paths ``a`` and ``b`` name one file: the same file where both exist
    (whatever links or spellings lead there), else the same path once resolved."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one is not there (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _signature(values) -> str:
    """'x (N, 1, 28, 28), ...' for ONNX graph inputs or outputs."""
    def dims(v):
        return ", ".join(d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim)
    return ", ".join(f"{v.name} ({dims(v)})" for v in values)


def main(args: argparse.Namespace) -> int:
    picture_format = check_outputs(args)  # before any work
    graph, params = load_weights(args)
    model = export_model(graph, params)
    del params  # the model holds the weights: one copy fewer while it is serialised
    out = Path(args.output)
    drawn = False
    try:
        with atomic_file(out) as f:  # never a half-written model under the name
            f.write(model.SerializeToString())
            if args.draw:  # after the model is written, before it is renamed into place:
                # a model that cannot be written leaves no picture, and a picture that
                # cannot be drawn no model
                write_drawing(onnx_sketch(graph, model).to_graphviz(), Path(args.draw),
                              picture_format)
                drawn = True
    except BaseException:
        if drawn:  # the rename failed: no picture of a model that is not there
            Path(args.draw).unlink(missing_ok=True)
        raise
    print(f"wrote {out}: {graph.spec.name}, {len(model.graph.node)} ONNX nodes (opset {OPSET}), "
          f"{graph.param_count():,} parameters from {args.checkpoint or 'init_params(seed=0)'}")
    print(f"  inputs:  {_signature(model.graph.input)}")
    print(f"  outputs: {_signature(model.graph.output)}")
    if args.draw:
        print(f"drew {args.draw}")
    return 0
