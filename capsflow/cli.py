"""The ``capsflow`` command: one subcommand per runner module.

Each runner module in capsflow.runners defines ``add_arguments(parser)`` and
``main(args) -> int``; this file wires them up and decides how a run ends:

* a user error (``CapsflowError``, a bad flag, a file the system refuses: ``OSError``, or
  memory that sizes the user chose cannot get: ``MemoryError``) is one line,
  ``capsflow COMMAND: error: ...``, exit status 2;
* any other exception is a bug in capsflow: one line naming the exception, the file and
  line it came from and where to report it, exit status 1 (the status of an uncaught
  Python exception, so scripts and fuzzers tell bugs from user errors); the traceback is
  printed only with ``capsflow --debug COMMAND ...``;
* Ctrl-C: exit status 130.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
import traceback
from pathlib import Path
from typing import Callable

from capsflow.errors import CapsflowError

REPORT_BUGS_TO = "capsflow's issue tracker"
EXIT_USER_ERROR = 2
EXIT_BUG = 1

COMMANDS = {
    "check": ("check", "compile a graph and print its nodes, shapes and parameter counts"),
    "ops": ("oplist", "list the op library: inputs, attributes, defaults"),
    "gradcheck": ("gradcheck", "whole-graph gradient check against finite differences (float64)"),
    "bench": ("bench", "time a training step against the PyTorch reference"),
    "train": ("train", "train a graph on a dataset (MNIST, CIFAR-10, your image folders...)"),
    "eval": ("evaluate", "test accuracy, per-class accuracy and confusion matrix of a checkpoint"),
    "predict": ("predict", "classify image files (PNG, JPEG, ...) with a trained checkpoint"),
    "visualize": ("visualize", "reconstruction, perturbation and training-curve pictures"),
    "render": ("render", "draw the graph and its gradient flow with Graphviz"),
    "compare": ("compare", "train routing variants side by side and tabulate them"),
    "reproduce": ("reproduce", "run a recipe: one row of the results table (docs/results.md)"),
    "export": ("export", "write the inference forward graph and its weights as an ONNX model"),
}


class _Parser(argparse.ArgumentParser):
    """argparse that reports bad flags as one line with exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # The validators below say "must be ..."; argparse prefixes "argument --bs: ".
        # Written "--bs must be >= 1, got 0", as TrainConfig.check words the same rule.
        message = re.sub(r"^argument (\S+): must ", r"\1 must ", message)
        self.exit(EXIT_USER_ERROR, f"{self.prog}: error: {printable(message)}\n")


def printable(text: str) -> str:
    """``text`` as one printable line: a newline, a control character or an undecodable
    byte (a surrogate) that the user typed into a flag or a file name is written as its
    escape (``\\n``, ``\\x07``, ``\\udcdc``), so that an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# ------------------------------------------------------------- flag validators
# argparse ``type=`` functions: a bad value stops the command at parsing, before any
# data is loaded or file written.


def _number(convert: Callable, text: str, ok: Callable, rule: str):
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid {convert.__name__} value: '{text}'") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"must be {rule}, got {text}")
    return value


def positive_int(text: str) -> int:
    """A count: 1, 2, ..."""
    return _number(int, text, lambda v: v >= 1, ">= 1 (a positive integer)")


def int_up_to(high: int) -> Callable[[str], int]:
    """A count from 1 to ``high`` (threads: a count past any machine's is a typo)."""
    def count(text: str) -> int:
        return _number(int, text, lambda v: 1 <= v <= high, f"between 1 and {high:,}")
    count.__name__ = "int"
    return count


def non_negative_int(text: str) -> int:
    """A seed, an index, a number of pixels: 0, 1, ..."""
    return _number(int, text, lambda v: v >= 0, ">= 0")


def positive_float(text: str) -> float:
    """A learning rate: finite and > 0 (float() accepts 'nan' and 'inf')."""
    return _number(float, text, lambda v: math.isfinite(v) and v > 0, "a finite number > 0")


def non_negative_float(text: str) -> float:
    """A floor, a weight: finite and >= 0."""
    return _number(float, text, lambda v: math.isfinite(v) and v >= 0, "a finite number >= 0")


def check_output_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a folder that can be created or written, else one line naming ``flag``;
    called before any work, so a typo does not cost a training run. Creates nothing."""
    path = Path(path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        why = "" if existing == path else f"cannot be made: {existing} "
        raise CapsflowError(f"{flag} {path} {why}is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CapsflowError(f"{flag} {path}: no permission to write in {existing}")
    return path


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file that can be written (not a folder, in a folder that can be made
    or written), else one line naming ``flag``; called before any work."""
    from capsflow.training.checkpoint import check_replaceable
    path = Path(path)
    if path.is_dir():
        raise CapsflowError(f"{flag} {path} is a folder; name a file")
    try:
        check_replaceable(path)
    except OSError as exc:
        raise CapsflowError(f"{flag} {path}: {exc.strerror}; name a file") from None
    check_output_dir(path.parent, flag)
    return path


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
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an internal error (a bug in capsflow)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    parser.command_parser = parser  # the chosen command's, which reports unknown flags
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        # Also accepted after the command; SUPPRESS keeps a value given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                       help=argparse.SUPPRESS)
        if name == chosen:
            module = _import_runner(name, module_name)
            module.add_arguments(p)
            p.set_defaults(runner=module)
            parser.command_parser = p
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
    chosen = chosen if chosen in COMMANDS else None
    prog = f"capsflow {chosen}" if chosen else "capsflow"
    debug = "--debug" in argv  # until the flags are parsed
    try:
        parser = build_parser(chosen)
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # said by the command's parser: "capsflow train: error: ..."
            parser.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
        debug = args.debug
        args.command_argv = argv  # e.g. for train --nproc, which reruns the command per rank
        return int(args.runner.main(args) or 0)
    except CapsflowError as exc:
        if not _said_by_rank_zero(exc):
            print(f"{prog}: error: {printable(str(exc))}", file=sys.stderr)
        return EXIT_USER_ERROR
    except BrokenPipeError:  # the reader left early (`capsflow ... | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1
    except OSError as exc:  # a file the system refuses (disk full, permissions...)
        where = f": {exc.filename}" if exc.filename else ""
        print(f"{prog}: error: {printable(f'{exc.strerror or exc}{where}')}", file=sys.stderr)
        return EXIT_USER_ERROR
    except MemoryError as exc:  # sizes the user chose (batch, images, graph vars) too large
        if debug:  # an absurd allocation may also be capsflow's: show where it was
            traceback.print_exc()
        print(f"{prog}: error: not enough memory ({str(exc) or 'MemoryError'}); smaller sizes "
              f"(--bs, --image-size, --set ...) need less", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the last resort: anything else is a bug in capsflow
        if debug:
            traceback.print_exc()
        print(f"{prog}: {bug_report(exc, debug)}", file=sys.stderr)
        return EXIT_BUG


def _said_by_rank_zero(exc: CapsflowError) -> bool:
    """Whether this process is local rank 1, 2... of a data-parallel job, where local rank
    0 on the same machine meets the same user error (the same flags, files and data) and
    says it: one line per machine (each machine's log shows why), not one per rank. A
    rank's own trouble (a DistributedError: its rendezvous, its collectives) is always
    said, as is everything where the launcher does not say how many ranks share a machine
    (no LOCAL_WORLD_SIZE: each rank counts as alone)."""
    from capsflow.runners.distributed import DistributedError, env_config
    if isinstance(exc, DistributedError):
        return False
    try:
        env = env_config()
    except CapsflowError:
        return False
    return env is not None and env["local_world_size"] > 1 and env["local_rank"] > 0


def bug_report(exc: BaseException, debug: bool = False) -> str:
    """One line for an unexpected exception: its type, message and innermost frame."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = ""
    if frames:
        file = Path(frames[-1].filename)
        root = Path(__file__).resolve().parents[1]  # shorter paths inside the project
        shown = file.relative_to(root) if file.is_relative_to(root) else file
        where = f" at {shown}:{frames[-1].lineno}"
    lines = str(exc).strip().splitlines()
    message = f": {lines[0][:200]}" if lines else ""
    hint = "" if debug else "; rerun with --debug for the traceback"
    return (f"internal error (a bug in capsflow): {type(exc).__name__}{message}{where}; "
            f"please report it to {REPORT_BUGS_TO} with the command line{hint}")


if __name__ == "__main__":
    sys.exit(main())
