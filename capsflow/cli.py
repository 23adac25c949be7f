"""The ``capsflow`` command: one subcommand per runner module.

Each runner module in capsflow.runners defines ``add_arguments(parser)`` and
``main(args) -> int``; this file only wires them up and turns user errors into one
line (``capsflow: error: ...``, exit status 2) instead of a traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from capsflow.errors import CapsflowError

COMMANDS = {
    "check": ("check", "compile a graph and print its nodes, shapes and parameter counts"),
    "ops": ("oplist", "list the op library: inputs, attributes, defaults"),
    "gradcheck": ("gradcheck", "whole-graph gradient check against finite differences (float64)"),
    "bench": ("bench", "time a training step against the PyTorch reference"),
    "train": ("train", "train a graph on MNIST or Fashion-MNIST"),
    "eval": ("evaluate", "test accuracy, per-class accuracy and confusion matrix of a checkpoint"),
    "visualize": ("visualize", "reconstruction, perturbation and training-curve pictures"),
    "render": ("render", "draw the graph and its gradient flow with Graphviz"),
    "compare": ("compare", "train routing variants side by side and tabulate them"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"capsflow {self.prog.split()[-1]}: error: {message}\n")


def add_graph_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every graph-reading command shares."""
    parser.add_argument("graph", help="YAML graph spec, e.g. graphs/capsnet.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="NAME=VALUE",
                        help="override a graph variable, e.g. --set routing_iters=1 (repeatable)")


def compile_from_args(args: argparse.Namespace):
    """Compile ``args.graph`` with the ``--set`` overrides."""
    from capsflow.core.graph import compile as compile_graph
    from capsflow.lang.yamlio import parse_override
    overrides = dict(parse_override(o) for o in args.overrides)
    return compile_graph(args.graph, overrides)


def build_parser(chosen: str | None) -> argparse.ArgumentParser:
    """All subcommands are listed; only the chosen one's module is imported, so a
    runner's optional dependencies (graphviz, tqdm, torch) never break the others."""
    parser = _Parser(prog="capsflow", description="Capsule Networks as a YAML computation graph.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == chosen:
            module = _import_runner(name, module_name)
            module.add_arguments(p)
            p.set_defaults(runner=module)
    return parser


def _import_runner(command: str, module_name: str):
    try:
        return importlib.import_module(f"capsflow.runners.{module_name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"capsflow.runners.{module_name}":
            raise SystemExit(f"capsflow {command}: error: this installation has no "
                             f"'{module_name}' runner") from None
        if exc.name and exc.name.startswith("capsflow"):
            raise
        missing = exc.name or str(exc)
        raise SystemExit(f"capsflow {command}: error: needs the Python package '{missing}' "
                         f"(pip install {missing}, or pip install 'capsflow[dev]')") from None


def main(argv: list | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(chosen if chosen in COMMANDS else None)
    args = parser.parse_args(argv)
    try:
        return int(args.runner.main(args) or 0)
    except CapsflowError as exc:
        print(f"capsflow {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"capsflow {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
