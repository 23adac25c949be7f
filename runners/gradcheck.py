"""``capsflow gradcheck``: the whole graph's gradients against finite differences, float64."""
from __future__ import annotations

import argparse

import numpy as np

from capsflow.cli import (add_graph_arguments, compile_from_args, non_negative_int,
                          positive_float, positive_int)
from capsflow.core.gradcheck import graph_gradcheck
from capsflow.core.shapes import at_batch
from capsflow.errors import CapsflowError
from capsflow.options import add_option_arguments, options_from_args
from capsflow.runners.step_memory import check_step_fits

# Whole-graph finite differences cross ReLU kinks and hit round-off on tiny gradients,
# so their bound is looser than the per-op one (1e-6); exactness is the PyTorch parity test's job.
DEFAULT_TOLERANCE = 1e-4


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_graph_arguments(parser)
    parser.add_argument("--bs", type=positive_int, default=2,
                        help="batch size of the random batch (2)")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    add_option_arguments(parser)
    parser.add_argument("--tol", type=positive_float, default=DEFAULT_TOLERANCE,
                        help=f"worst relative error allowed ({DEFAULT_TOLERANCE:g})")


def random_batch(graph, batch: int, seed: int) -> dict:
    """Inputs shaped like the graph's, pixels in [0, 1] and one-hot labels where the
    input is called y (the convention of graphs/*.yaml)."""
    rng = np.random.default_rng(seed)
    batch_inputs = {}
    for name, spec in graph.spec.inputs.items():
        shape = at_batch(spec.shape, batch)
        if name == "y":
            batch_inputs[name] = np.eye(shape[-1])[rng.integers(0, shape[-1], shape[0])]
        else:
            batch_inputs[name] = rng.random(shape)
    return batch_inputs


def main(args: argparse.Namespace) -> int:
    graph = compile_from_args(args)
    options = options_from_args(args)
    check_step_fits(graph, options, args.bs, "float64")
    params = graph.init_params(args.seed, dtype="float64")
    report = graph_gradcheck(graph, params, random_batch(graph, args.bs, args.seed),
                             backend=options, seed=args.seed)
    if not report:
        raise CapsflowError(f"{graph.spec.file} has no trainable parameter whose gradient "
                            f"reaches the loss: nothing to check")
    width = max(len(n) for n in report)
    print(f"{'parameter'.ljust(width)}  worst relative error")
    for name, err in report.items():
        print(f"{name.ljust(width)}  {err:.2e}{'  FAIL' if err > args.tol else ''}")
    worst = max(report.values())
    ok = worst <= args.tol
    print(f"worst {worst:.2e} (tolerance {args.tol:g}): {'ok' if ok else 'FAILED'}")
    if worst == float("inf"):
        print("(inf: the loss, a gradient or a finite difference is NaN or infinite at this "
              "batch and initialisation; nothing was checked there)")
    return 0 if ok else 1
