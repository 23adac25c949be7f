"""``capsflow render``: draw a graph, its reverse plan, or the gradient norms of one batch.

    capsflow render graphs/capsnet.yaml -o capsnet.svg                  # forward graph
    capsflow render graphs/capsnet.yaml --focus DigitCaps --set routing_iters=1 -o r1.png
    capsflow render graphs/capsnet.yaml --backward -o backward.svg      # the reverse plan
    capsflow render graphs/capsnet.yaml --grad-norms --random-input --stats norms.json -o g.svg

The format follows the suffix of ``-o``: .svg, .png, .pdf need Graphviz's ``dot``
program; .dot (or .gv) writes the DOT source and needs only the graphviz package.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from capsflow.checkpoint import load_params
from capsflow.cli import add_graph_arguments, compile_from_args
from capsflow.errors import CapsflowError

from .diagrams import backward_sketch, forward_sketch
from .drawing import import_graphviz
from .gradflow import measure_grad_norms, reverse_flow

FORMATS = {".svg": "svg", ".png": "png", ".pdf": "pdf", ".dot": "dot", ".gv": "dot"}
INSTALL_DOT = ("Graphviz's 'dot' program is not installed, so {out} cannot be drawn; install "
               "it (apt-get install graphviz, brew install graphviz or conda install graphviz), "
               "or write the DOT source with -o {stem}.dot")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_graph_arguments(parser)
    parser.add_argument("-o", "--output", required=True, metavar="OUT",
                        help="output file; format from the suffix: .svg .png .pdf .dot")
    parser.add_argument("--focus", metavar="NODE_OR_PREFIX",
                        help="draw one region: a node id, a stage (DigitCaps) or an id prefix "
                             "(routing), with its neighbours greyed out")
    parser.add_argument("--backward", action="store_true",
                        help="draw the reverse plan: VJPs, gradient sums, cut edges")
    parser.add_argument("--grad-norms", action="store_true",
                        help="run one batch and colour every backward edge by its gradient "
                             "norm (implies --backward)")
    parser.add_argument("--stats", metavar="OUT.json",
                        help="also write the gradient norms as JSON (implies --grad-norms)")
    parser.add_argument("--loss", default="loss", help="output to differentiate (loss)")
    parser.add_argument("--rankdir", choices=["LR", "TB"], default="LR",
                        help="layout direction of the forward graph; the backward graph "
                             "runs the other way (LR: loss on the right in both)")
    batch = parser.add_argument_group("the batch of --grad-norms")
    batch.add_argument("--checkpoint", metavar="PATH",
                       help="parameters (.npz from train or save_params); default: fresh "
                            "initial weights")
    batch.add_argument("--random-input", action="store_true",
                       help="random images and labels instead of MNIST")
    batch.add_argument("--data-dir", help="data root or dataset folder (else $CAPSFLOW_DATA, "
                                          "the user cache)")
    batch.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    batch.add_argument("--split", default="test", choices=["train", "test"])
    batch.add_argument("--bs", type=int, default=8, help="batch size (8)")
    batch.add_argument("--seed", type=int, default=0,
                       help="seed of the initial weights and the random input (0)")
    batch.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])


def main(args: argparse.Namespace) -> int:
    out = Path(args.output)
    fmt = output_format(out)
    measuring = args.grad_norms or args.stats is not None
    for flag, given in (("--checkpoint", args.checkpoint), ("--random-input", args.random_input)):
        if given and not measuring:
            raise CapsflowError(f"{flag} only matters with --grad-norms (or --stats)")
    if args.bs < 1:
        raise CapsflowError(f"--bs must be a positive batch size, got {args.bs}")
    graph = compile_from_args(args)
    backward_dir = {"LR": "RL", "TB": "BT"}[args.rankdir]
    if measuring:
        inputs, source = batch_inputs(graph, args)
        params, weights = parameters(graph, args)
        norms = measure_grad_norms(graph, params, inputs, backend=args.backend, loss=args.loss)
        flow = reverse_flow(graph, {k for k, v in inputs.items() if v is not None}, args.loss)
        note = f"{source}, {weights}: loss {norms.loss:.4f}"
        print(f"one batch of {norms.batch} ({source}, {weights}): loss {norms.loss:.4f}, "
              f"gradient norms {norms.range()[0]:.2e} .. {norms.range()[1]:.2e}")
        sketch = backward_sketch(graph, flow, norms, args.focus, backward_dir, note)
        if args.stats:
            about = {"graph": graph.spec.name, "file": graph.spec.file, "vars": graph.spec.vars,
                     "loss_output": args.loss, "input": source, "weights": weights}
            write_json(Path(args.stats), norms.to_json(flow, about))
            print(f"wrote {args.stats}")
    elif args.backward:
        flow = reverse_flow(graph, loss=args.loss)
        sketch = backward_sketch(graph, flow, None, args.focus, backward_dir)
    else:
        sketch = forward_sketch(graph, args.focus, args.rankdir)
    write_drawing(sketch.to_graphviz(), out, fmt)
    print(f"wrote {out} ({len(sketch.items)} nodes, {len(sketch.edges)} edges)")
    return 0


def output_format(out: Path) -> str:
    fmt = FORMATS.get(out.suffix.lower())
    if fmt is None:
        raise CapsflowError(f"cannot tell the format of '{out}' from its suffix; use one of "
                            f"{', '.join(FORMATS)}")
    return fmt


def write_drawing(dot, out: Path, fmt: str) -> None:
    """Write ``dot`` (a graphviz.Digraph) to ``out``: DOT source, or run Graphviz."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "dot":
        out.write_text(dot.source, encoding="utf-8")
        return
    graphviz = import_graphviz()
    try:
        data = dot.pipe(format=fmt)
    except graphviz.ExecutableNotFound:
        raise CapsflowError(INSTALL_DOT.format(out=out, stem=out.with_suffix(""))) from None
    except graphviz.CalledProcessError as exc:
        detail = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
        raise CapsflowError(f"Graphviz failed to draw {out}: "
                            f"{detail[-1] if detail else exc}") from None
    out.write_bytes(data)


def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


def batch_inputs(graph, args: argparse.Namespace) -> tuple:
    """(inputs, description): ``--bs`` MNIST examples (x, one-hot y), or random ones."""
    if args.random_input:
        from .gradcheck import random_batch
        return random_batch(graph, args.bs, args.seed), f"random input (seed {args.seed})"
    from .data import load_split, one_hot
    wanted = set(graph.spec.inputs)
    if not wanted <= {"x", "y"} or "x" not in wanted:
        raise CapsflowError(f"the graph's inputs ({', '.join(graph.spec.inputs)}) are not "
                            "images x and labels y; use --random-input")
    images, labels = load_split(args.dataset, args.split, args.data_dir, limit=args.bs)
    inputs = {"x": images}
    if "y" in wanted:
        inputs["y"] = one_hot(labels).astype(np.float32)
    return inputs, f"{args.dataset} {args.split}[0:{len(images)}]"


def parameters(graph, args: argparse.Namespace) -> tuple:
    """(params, description): a checkpoint's parameters, or fresh ones."""
    if args.checkpoint:
        params = load_params(args.checkpoint)
        graph.check_params(params)
        return params, f"weights {Path(args.checkpoint).name}"
    return graph.init_params(args.seed), f"initial weights (seed {args.seed})"

