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
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from capsflow.training.checkpoint import load_npz, params_of
from capsflow.cli import (add_graph_arguments, check_output_file, compile_from_args,
                          non_negative_int, positive_int)
from capsflow.errors import CapsflowError
from capsflow.options import add_option_arguments, options_from_args

from .data import DATASETS, load_split, one_hot
from .diagrams import backward_sketch, focus_members, forward_sketch
from .drawing import import_graphviz
from .gradcheck import random_batch
from .gradflow import measure_grad_norms, reverse_flow
from .step_memory import check_step_fits

PDF_DATE = re.compile(rb"/CreationDate \(D:\d{14}Z\)")
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
    parser.add_argument("--norm-range", nargs=2, type=float, metavar=("LOW", "HIGH"),
                        help="fix the colour scale of --grad-norms, e.g. 1e-10 10, so that "
                             "drawings of different runs compare (default: this run's range)")
    parser.add_argument("--loss", default="loss", help="output to differentiate (loss)")
    parser.add_argument("--rankdir", choices=["TB", "LR"], default="TB",
                        help="layout direction of the forward graph; the backward graph "
                             "runs the other way, so the loss sits at the same end in both")
    batch = parser.add_argument_group("the batch of --grad-norms")
    batch.add_argument("--checkpoint", metavar="PATH",
                       help="parameters (.npz from train or save_params); default: fresh "
                            "initial weights")
    batch.add_argument("--random-input", action="store_true",
                       help="random images and labels instead of MNIST")
    batch.add_argument("--data-dir", help="data root or dataset folder (else $CAPSFLOW_DATA, "
                                          "the user cache)")
    batch.add_argument("--dataset", default="mnist", choices=list(DATASETS))
    batch.add_argument("--split", default="test", choices=["train", "test"])
    batch.add_argument("--bs", type=positive_int, default=8, help="batch size (8)")
    batch.add_argument("--seed", type=non_negative_int, default=0,
                       help="seed of the initial weights and the random input (0)")
    add_option_arguments(batch)


def main(args: argparse.Namespace) -> int:
    out = check_output_file(args.output, "-o")
    fmt = output_format(out)
    if args.stats is not None:
        check_output_file(args.stats, "--stats")
    measuring = check_flags(args)
    weights = None
    if args.checkpoint:
        weights, own_overrides = read_weights(args.checkpoint, args.graph)
        args.overrides = own_overrides + list(args.overrides)
    graph = compile_from_args(args)
    if args.focus:
        focus_members(graph, args.focus)  # a bad --focus fails before any computing
    backward_dir = {"LR": "RL", "TB": "BT"}[args.rankdir]
    if measuring:
        sketch = grad_norm_sketch(graph, args, backward_dir, weights)
    elif args.backward:
        flow = reverse_flow(graph, loss=args.loss)
        sketch = backward_sketch(graph, flow, None, args.focus, backward_dir)
    else:
        sketch = forward_sketch(graph, args.focus, args.rankdir)
    write_drawing(sketch.to_graphviz(), out, fmt)
    print(f"wrote {out} ({len(sketch.items)} nodes, {len(sketch.edges)} edges)")
    return 0


def check_flags(args: argparse.Namespace) -> bool:
    """One line for flags that make no sense together; True when a batch is to run."""
    measuring = args.grad_norms or args.stats is not None
    for flag, given in (("--checkpoint", args.checkpoint), ("--random-input", args.random_input),
                        ("--norm-range", args.norm_range)):
        if given and not measuring:
            raise CapsflowError(f"{flag} only matters with --grad-norms (or --stats)")
    if args.norm_range and not 0 < args.norm_range[0] < args.norm_range[1] < float("inf"):
        raise CapsflowError(f"--norm-range needs 0 < LOW < HIGH < inf, got "
                            f"{args.norm_range[0]:g} {args.norm_range[1]:g}")
    return measuring


def grad_norm_sketch(graph, args: argparse.Namespace, rankdir: str, loaded: dict | None):
    """Run one batch, report its gradient norms (and write --stats), and draw them;
    ``loaded``: the --checkpoint's parameters (``read_weights``), else None."""
    params, weights = parameters(graph, args, loaded)
    inputs, source = batch_inputs(graph, args)
    options = options_from_args(args)
    if args.loss == "loss":  # as the measurement runs it: unfused, gradients made whole
        wide = any(getattr(v, "dtype", None) == np.float64 for v in inputs.values())
        check_step_fits(graph, options.replace(fusion=False, factored_grads=False), args.bs,
                        "float64" if wide else "float32")
    norms = measure_grad_norms(graph, params, inputs, backend=options, loss=args.loss)
    low, high = norms.range()
    print(f"one batch of {norms.batch} ({source}, {weights}): loss {norms.loss:.4f}, "
          f"gradient norms {low:.2e} .. {high:.2e}")
    if not math.isfinite(norms.loss):
        print(f"note: the loss is {norms.loss}: the norms drawn are those of a graph whose "
              "numbers are not finite")
    if args.stats:
        about = {"graph": graph.spec.name, "file": graph.spec.file, "vars": graph.spec.vars,
                 "loss_output": args.loss, "input": source, "weights": weights}
        write_json(Path(args.stats), norms.to_json(about))
        print(f"wrote {args.stats}")
    note = f"{source}, {weights}: loss {norms.loss:.4f}"
    return backward_sketch(graph, norms.flow, norms, args.focus, rankdir, note,
                           args.norm_range)


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
    out.write_bytes(_fixed_pdf_date(data) if fmt == "pdf" else data)


def _fixed_pdf_date(pdf: bytes) -> bytes:
    """Cairo stamps PDFs with the time of drawing; a fixed date of the same length
    (so the byte offsets in the PDF's index stay valid) keeps re-renders identical."""
    return PDF_DATE.sub(b"/CreationDate (D:19700101000000Z)", pdf)


def write_json(path: Path, report: dict) -> None:
    """JSON with one line per top-level field and per entry of a list or of a
    mapping of mappings (an edge, a value), so that diffs stay readable. A norm or loss
    that is NaN or infinite is written null (JSON has no NaN: strict parsers refuse it)."""
    report = _finite_or_null(report)
    lines = []
    for key, value in report.items():
        if isinstance(value, list) and value:
            inner = ",\n".join(f"  {json.dumps(v)}" for v in value)
            lines.append(f" {json.dumps(key)}: [\n{inner}\n ]")
        elif isinstance(value, dict) and value and all(isinstance(v, dict) for v in value.values()):
            inner = ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in value.items())
            lines.append(f" {json.dumps(key)}: {{\n{inner}\n }}")
        else:
            lines.append(f" {json.dumps(key)}: {json.dumps(value)}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("{\n" + ",\n".join(lines) + "\n}\n", encoding="utf-8")


def _finite_or_null(value: Any) -> Any:
    """``value`` with every float that is not finite replaced by None, at any depth."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def batch_inputs(graph, args: argparse.Namespace) -> tuple:
    """(inputs, description): ``--bs`` MNIST examples (x, one-hot y), or random ones."""
    if args.random_input:
        return random_batch(graph, args.bs, args.seed), f"random input (seed {args.seed})"
    wanted = set(graph.spec.inputs)
    if not wanted <= {"x", "y"} or "x" not in wanted:
        raise CapsflowError(f"the graph's inputs ({', '.join(graph.spec.inputs)}) are not "
                            "images x and labels y; use --random-input")
    images, labels = load_split(args.dataset, args.split, args.data_dir, limit=args.bs)
    inputs = {"x": images}
    if "y" in wanted:
        inputs["y"] = one_hot(labels)
    return inputs, f"{args.dataset} {args.split}[0:{len(images)}]"


def read_weights(path: str, graph_path: str) -> tuple:
    """(parameters, --set values) of --checkpoint, read once. A training checkpoint's own
    --set values come first (a run trained with routing_iters=1 has the parameters of the
    3-iteration graph, and was drawn as that), and it must be of this graph; a parameters
    file (save_params) has none."""
    from capsflow.runners.training import check_same_graph, checkpoint_of
    arrays = load_npz(path)
    if "meta" not in arrays:
        return params_of(arrays, path), []
    ckpt = checkpoint_of(Path(path), arrays)
    check_same_graph(ckpt, graph_path)
    return ckpt.params, [f"{k}={json.dumps(v)}" for k, v in ckpt.overrides.items()]


def parameters(graph, args: argparse.Namespace, loaded: dict | None) -> tuple:
    """(params, description): the --checkpoint's parameters (``loaded``), or fresh ones."""
    if loaded is not None:
        graph.check_params(loaded)
        return loaded, f"weights {Path(args.checkpoint).name}"
    return graph.init_params(args.seed), f"initial weights (seed {args.seed})"

