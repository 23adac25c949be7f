"""Property-based fuzzing of the ``capsflow`` command line, every command, with hypothesis.

tests/test_fuzz.py fuzzes the graph language; this file fuzzes the flags, paths and files
around it. Each case is one command line: a command (check, ops, gradcheck, bench, train,
eval, predict, visualize, render, compare, reproduce, export), its usual arguments for a
cheap run (a tiny linear graph, synthetic IDX data, a tiny trained checkpoint, small
limits) and then 0 to 5 mutations drawn by *introspecting the command's argparse parser*
(``capsflow.cli.build_parser``): for each optional action its option strings, ``type``
validator, ``choices``, ``nargs`` and ``store_true``-like actions, so a flag added later
is fuzzed without a change here. Mutations: a flag added (values by its dest, choices or
type: valid ones as often as hostile ones, so that cases get past parsing), a usual flag
dropped or given again, a positional (graph, images, recipe) swapped or added, ``--set``,
a (--dataset, --data-dir) pair aimed at one reader's hostile files, a flag of another
command, an abbreviation, an unknown token, ``-h``, a word before the command, the
order shuffled. Hypothesis draws a 63-bit seed per case and the case follows from it
(``build_case``): its own draws would give clusters of near copies of one command line,
where each case costs a process. Values come from pools of valid and hostile ones:

* numbers: 0, -1, 2**31, 2**63, 2**64, 5000 digits, 1e308, 1e309, nan, inf, 5e-324,
  ``1_0``, Arabic-Indic digits, hex, empty and blank strings;
* input paths (graph, checkpoint, --resume, --data-dir, images, --metrics, recipes,
  --table): a missing file, a folder, a FIFO, /dev/zero, a symbolic-link loop, an empty
  file, garbage bytes, a truncated or crafted .npz (a pickle inside, NaN weights, meta
  that is not JSON), a YAML file where a checkpoint is expected and the reverse, corrupt
  IDX data sets (truncated, wrong magic, labels out of range, counts that disagree, a
  header declaring 2**31 images), PNG files that are empty, truncated, 1x1, or declare
  225 or 100 million pixels, 5,000-character and non-UTF-8 (surrogate-escaped) names,
  names holding a newline; data roots where every reader's files are garbage, CIFAR-10
  pickles that would run code (``os.mkdir('PWNED')``: a case that makes it is a finding),
  image folders with bombs and broken files;
* output paths (--save_dir, --out, -o, --json, --stats, --draw, --recon, --plot): an
  existing file, a path under a file, a symbolic link to /dev/full, /proc, a link loop,
  an unwritable or impossible name, odd suffixes;
* ``--set`` strings with bad names and values (YAML tags, aliases, NaN, 2**63, huge
  parameters), flags repeated, abbreviated (argparse's prefixes), written ``--flag=value``,
  flags of another command, unknown flags, stray words, ``--`` and ``-h``; random text of
  any characters a command line can hold (control characters, undecodable bytes as
  surrogate escapes, astral planes; no NUL).

Cost. Every case runs in a few seconds: what legitimately takes long is capped after
drawing (``work_caps``): the command's own parser reads the final argv and, where a count
that scales the work (epochs, steps, repeats, --nproc, a real graph's batch, a limit on a
large data set) is too large, a capped copy of the flag is appended (argparse keeps the
last value but still validates every one given). bench gets --no-torch by default,
gradcheck never sees a real graph (CapsNet's takes 30 s), ``--backend cupy`` only has to
give one line (there is no GPU here).

The invariant (docs/errors.md): the command ends with exit status 0, or 2 with exactly
one non-empty line on stderr, ``capsflow COMMAND: error: ...``; never 1 (capsflow's
"internal error", a bug), no Python traceback or warning on stderr, not killed by a
signal, no hang past the timeout (60 s), no "not enough memory" for a size a real machine
could have allocated (the child's address space is limited: a memory blow-up ends as a
MemoryError the CLI reports; a refusal of an allocation larger than the machine's memory
is fine), no code run from a data file, and no process left behind (train --nproc,
compare --jobs and bench start subprocesses): after ``main`` returns, nothing the command
started may still run, and the process must exit. On exit status 0 stderr may hold
notes and progress bars, but no traceback or Python warning.
test_the_harness_catches_each_kind_of_failure plants each kind of failure as
``capsflow check``'s main and checks that the harness reports it.

Isolation, as in tests/test_fuzz.py: each case runs in a child forked from a fork server
of its own (a clean interpreter that imported capsflow, its runners, torch, matplotlib
and onnx once, so a case costs a fork), which calls ``capsflow.cli.main(argv)``
in-process with file descriptors 1 and 2 redirected to files (subprocesses' output is
caught too), stdout and stderr encoded as a UTF-8 C locale would, its cwd a fresh scratch
folder (with copies of the checkpoint, so a case that overwrites or resumes it harms no
other case), ``XDG_CACHE_HOME`` there and ``CAPSFLOW_DATA`` unset, ``RLIMIT_AS`` at its
address space plus 2 GiB, its own session (a hang is killed with its process group) and
the Linux child-subreaper flag, so that orphaned grandchildren stay visible to it; the
parent also looks for any process whose working folder lies in the case's scratch
folder. A hang's Python stacks are dumped (faulthandler) just before the kill, so the
finding says where it hung; a rc-1 finding is rerun with ``--debug`` for its traceback.

Runs. CI: explicit cases (every command once, and the subprocess-starting ones) plus a
fixed, derandomized set of CI_EXAMPLES cases; the file takes about 40 s on two loaded
cores::

    pytest tests/test_fuzz_cli.py

Before a release, fresh seeds, every distinct finding recorded instead of stopping at the
first (tests/conftest.py's options, as for tests/test_fuzz.py)::

    for seed in 1 2 3 4; do
      pytest tests/test_fuzz_cli.py --fuzz-examples 500 --fuzz-seed $seed \
          --fuzz-findings /tmp/fuzz-cli-$seed
    done

(500 cases take about two minutes, plus a minute for each hang found.)

--fuzz-timeout SECONDS sets the hang limit when given (this file's default is 60 s, not
conftest's 10 s, which is the graph fuzzer's). With ``-s`` the test prints how the cases
ended and the slowest one; with --fuzz-findings, DIR/summary.txt counts the findings and
how all cases ended, DIR/errors.txt the kinds of one-line errors, and DIR/NNN-*/1..3
hold the first cases of each finding (argv, stderr, the result, the --debug traceback);
DIR/cases.jsonl has one line per case (argv, how it ended, seconds).
"""
from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import io
import json
import multiprocessing
import multiprocessing.forkserver
import os
import pickle
import random
import re
import resource
import shlex
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, example, given, note, settings  # noqa: E402
from hypothesis import seed as hypothesis_seed  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from capsflow.cli import COMMANDS, build_parser  # noqa: E402
from capsflow.core import memory  # noqa: E402
from test_data import _make_dataset  # noqa: E402
from test_hostile_runtime import GRAPH, craft  # noqa: E402

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="runs each case in a child with Linux resource limits")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"           # the real MNIST, where present
CI_EXAMPLES = 120             # the derandomized cases of CI, after the explicit ones
DEFAULT_TIMEOUT = 60.0        # seconds a case may run (--fuzz-timeout, when given)
EXIT_GRACE = 15.0             # seconds the child may take to exit once main returned
LEFTOVER_GRACE = 2.0          # seconds started processes get to end once main returned
MEMORY_LIMIT = 2 << 30        # RLIMIT_AS headroom of a child
DEBUG_RERUNS = 3              # rc-1 cases of one finding rerun with --debug for the traceback
COMMAND_NAMES = list(COMMANDS)

# What the fork server imports once (a missing one is skipped: ImportError is ignored).
PRELOAD = ["numpy", "yaml", "capsflow", "capsflow.cli", "capsflow.backends",
           *[f"capsflow.runners.{module}" for module, _ in COMMANDS.values()],
           "capsflow.runners.distributed", "capsflow.runners.formats", "PIL.Image",
           "PIL.PngImagePlugin", "PIL.JpegImagePlugin", "matplotlib", "matplotlib.pyplot",
           "torch", "torchvision.utils", "onnx", "graphviz", "scipy.io"]

# -- the value pools ----------------------------------------------------------------------
# Paths are written with placeholders, so that a case reads the same in every run:
# {W} the shared world folder (read-only in spirit), {R} the repository, {S} the real
# MNIST's data root (../shared/data). Relative paths are in the case's own folder.
INTS = ["0", "1", "2", "3", "8", "-1", "-0", "+2", "007", "1_0", "\u0663", " 4 ", "1.0", "1.5",
        "1e3", "0x10", "nan", "inf", "", " ", "x", "100", "1000000", str(2 ** 31),
        str(2 ** 63 - 1), str(2 ** 63), str(2 ** 64), str(-2 ** 63), "9" * 5000]
FLOATS = ["0", "-0", "0.001", "1e-3", "1", "0.5", "2", "-1", "1e308", "1e309", "-1e308",
          "1e-320", "5e-324", "nan", "-nan", "inf", "-inf", "infinity", "1e", "", " ",
          "0x1p-3", "1_0.5", "\u0661.\u0665", "1e400", "3"]
SIZES = ["28", "28x28", "28X28", " 28 x 28 ", "1", "1x1", "0", "0x5", "3x5", "x", "28x",
         "-28", "100000", "100000x1", str(2 ** 63), "2**8", "", "28x28x3", "\u0662\u0668"]
WORDS = ["", " ", "\t", "-", "--", "-x", "=", "a=b", "é", "名前", "\u202e", "caf\udce9",
         "line\nbreak", "x" * 5000, "loss", "lengths", "recon", "x", "y", "w", "nope",
         "routing", "Decoder", "DigitCaps", "mean_loss", "per_example", "%s%n", "{}",
         "$(id)", "'", '"']
SET_VALUES = ["ballast=3", "ballast=1", "ballast=0", "ballast=-1", "ballast=1.5",
              "ballast=nan", "ballast=inf", "ballast=1e308", f"ballast={2 ** 63}",
              "ballast=100000000000", "ballast=3000000", "ballast=[1, 2]", "ballast={a: 1}",
              "ballast=!!python/object/apply:os.system [id]", "ballast=&a [*a]",
              "ballast=${ballast}", "ballast=", "ballast", "=3", "=", "nope=1",
              "routing_iters=1", "channels=3", "classes=2", "height=36", "ballast=3=4",
              "Ballast=3", "ballast =3", " ballast=3", "ballast=\x01", "ballast=yes",
              "ballast=null", "ballast='3'", "ballast=\"3\"", "ballast=0x10", "ballast=1_000",
              "é=1", "ballast=" + "9" * 5000, "ballast=" + "[" * 200]
# Input files: each command's usual ones first, then hostile ones.
HOSTILE_INPUTS = ["{W}/missing.yaml", "missing/nested/file", "{W}/hostile/dir", "fifo",
                  "/dev/zero", "/dev/null", "loop", "{W}/hostile/empty",
                  "{W}/hostile/garbage.bin", "{W}/hostile/truncated.npz",
                  "{W}/hostile/text.npz", "{W}/hostile/pickle.npz", "{W}/hostile/nan.npz",
                  "{W}/hostile/meta-list.npz", "{W}/hostile/params.npz",
                  "{W}/hostile/wrong-shapes.npz", "{W}/tiny.yaml", "{W}/hostile/bad.yaml",
                  "{W}/hostile/list.yaml", "{W}/hostile/nonutf8.yaml", "afile", "sub", ".",
                  "", " ", "-", "~/x", "/proc/self/status", "/etc/passwd", "x" * 5000,
                  "caf\udce9.npz", "new\nline.npz", "{W}/data", "{W}/hostile/dir/../empty"]
GRAPHS = ["{W}/tiny.yaml"] * 6 + ["{W}/tiny_b.yaml", "{R}/graphs/capsnet.yaml",
                                  "{R}/graphs/recipes/mnist-capsnet.yaml"] + HOSTILE_INPUTS
CHECKPOINTS = ["run/last.npz"] * 6 + ["run/best.npz", "{W}/hostile/other.npz"] + HOSTILE_INPUTS
IMAGES = (["{W}/images/digit.png"] * 3
          + [f"{{W}}/images/{n}" for n in ("rgb.jpg", "one.png", "wide.png", "grey16.png",
                                            "palette.png", "empty.png", "garbage.png",
                                            "truncated.png", "bomb.png", "warn.png",
                                            "noimages", "")]
          + ["{W}/images", "{W}/images-good", "fifo", "/dev/zero", "missing.png",
             "run/last.npz", "sub"])
DATA_DIRS = (["{W}/data"] * 4
             + ["{W}/data/mnist", "{W}/folder", "{W}/bad-trunc", "{W}/bad-magic",
                "{W}/bad-labels", "{W}/bad-count", "{W}/bad-huge", "{W}/bad-gz", "{W}",
                "{S}", "{S}/mnist", "missing", "afile", "fifo", "/dev/zero", "sub", "",
                "loop", "/proc", "caf\udce9", "new\nline"])
METRICS = ["run/metrics.jsonl", "{W}/hostile/metrics-bad.jsonl", "{W}/hostile/metrics-nan.jsonl",
           "{W}/hostile/metrics-list.jsonl", "{W}/hostile/metrics-fields.jsonl",
           "{W}/hostile/metrics-zero.jsonl", "{W}/hostile/metrics-nonutf8.jsonl",
           "{W}/hostile/empty", "{W}/hostile/garbage.bin", "fifo", "/dev/zero", "missing", "sub"]
TABLES = ["{W}/rows", "{W}/rows-bad", "{W}/data", "missing", "afile", "fifo", "sub", "",
          "/proc/self", "loop"]
RECIPES = (["{W}/recipe.yaml"] * 4
           + ["mnist-capsnet", "mnist-r1-norecon", "multimnist-capsnet", "affine-mnist-capsnet",
              "fashion-mnist-capsnet", "{W}/hostile/recipe-list.yaml",
              "{W}/hostile/recipe-unknown.yaml", "{W}/hostile/recipe-nograph.yaml",
              "{W}/hostile/recipe-types.yaml", "mnist", "../../etc/passwd",
              "{R}/graphs/capsnet.yaml"]
           + HOSTILE_INPUTS)
OUTPUTS = ["out", "out/deeper/x", "afile", "afile/x", "full", "null", "sub", ".", "", " ",
           "é/ü", "a" * 300, "loop/x", "/proc/nope/x", "/proc/self/status", "run",
           "caf\udce9", "new\nline", "-", "../sibling", "sub/"]
SUFFIXED = ["g.svg", "g.png", "g.pdf", "g.dot", "g.gv", "g.txt", "g", "g.SVG", ".svg",
            "m.onnx", "sub/g.dot", "afile/g.svg", "full", "null", "/proc/nope/g.svg",
            "a" * 300 + ".svg", "caf\udce9.dot", "new\nline.svg", "run/last.npz", "g.svg.dot"]

#: (--dataset, --data-dir) pairs that reach each reader with a hostile file: garbage
#: everywhere, CIFAR-10 pickles that would run code (os.mkdir('PWNED') in the case's
#: folder, which the harness looks for), image folders holding bombs and broken files.
DATA_PAIRS = [("mnist", "{W}/data"), ("folder", "{W}/folder"), ("folder", "{W}/folder-bad"),
              ("folder", "{W}/images"), ("multimnist", "{W}/data"), ("affine-mnist", "{W}/data"),
              ("cifar10", "{W}/evil"), ("cifar10", "{W}/garbage"), ("svhn", "{W}/garbage"),
              ("smallnorb", "{W}/garbage"), ("emnist", "{W}/garbage"), ("kmnist", "{W}/garbage"),
              ("fashion-mnist", "{W}/garbage"), ("affnist", "{W}/garbage"),
              ("affnist", "{W}/data"), ("mnist", "{W}/garbage"), ("multimnist", "{W}/bad-labels"),
              ("affine-mnist", "{W}/bad-count"), ("emnist", "{W}/data"), ("mnist", "{S}")]
GARBAGE_FILES = {"mnist": ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                           "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"],
                 "emnist": [f"emnist-balanced-{s}-{k}" for s in ("train", "test")
                            for k in ("images-idx3-ubyte", "labels-idx1-ubyte")],
                 "cifar10/cifar-10-batches-py": [f"data_batch_{k}" for k in range(1, 6)]
                 + ["batches.meta", "test_batch"],
                 "svhn": ["train_32x32.mat", "test_32x32.mat"],
                 "smallnorb": [f"smallnorb-5x{ids}x9x18x6x2x96x96-{split}-{kind}.mat"
                               for ids, split in (("46789", "training"), ("01235", "testing"))
                               for kind in ("dat", "cat")],
                 "affnist": ["test.mat"]}
GARBAGE_FILES["kmnist"] = GARBAGE_FILES["fashion-mnist"] = GARBAGE_FILES["mnist"]
PWNED = "PWNED"


class _Evil:
    """Pickled, makes the folder PWNED when unpickled."""

    def __reduce__(self):
        return os.mkdir, (PWNED,)


#: Pickles a restricted unpickler must refuse: each would make the folder PWNED.
EVIL_PICKLES = [b"cos\nmkdir\n(S'PWNED'\ntR.", b"cposix\nmkdir\n(S'PWNED'\ntR.",
                b"c__builtin__\neval\n(S'__import__(\"os\").mkdir(\"PWNED\")'\ntR.",
                pickle.dumps(_Evil(), protocol=4),
                pickle.dumps({"data": _Evil(), "labels": [0]}, protocol=2)]

#: argparse ``dest`` -> the pool of its values (the rest go by ``type``, else WORDS).
INPUT_POOLS = {"graph": GRAPHS, "checkpoint": CHECKPOINTS, "resume": CHECKPOINTS,
               "data_dir": DATA_DIRS, "images": IMAGES, "metrics": METRICS, "table": TABLES,
               "recipe": RECIPES, "graphs": GRAPHS, "overrides": SET_VALUES}
OUTPUT_DESTS = {"save_dir", "out", "json", "recon", "stats", "plot"}
SUFFIXED_DESTS = {"output", "draw"}
INT_TYPES = {"int", "positive_int", "non_negative_int"}
FLOAT_TYPES = {"float", "positive_float", "non_negative_float"}
UNKNOWN_TOKENS = ["--nope", "-x", "--", "---", "--=", "-", "--bs=", "stray", "--set", "-hx",
                  "--no-", "--debugg", "-o", "--lim", "--n", "--data", "--check", "--=x",
                  "\u2014bs", "--BS", "-1", "--help=1"]

# -- the usual arguments of each command: cheap, and passing on their own ---------------
# A list of (positional dest, value) and flag groups; mutations change, drop and add.
BASE = {
    "check": ([("graph", "{W}/tiny.yaml")], []),
    "ops": ([], []),
    "gradcheck": ([("graph", "{W}/tiny.yaml")], []),
    "bench": ([("graph", "{W}/tiny.yaml")],
              [["--no-torch"], ["--repeats", "1"], ["--warmup", "1"], ["--bs", "4"]]),
    "train": ([("graph", "{W}/tiny.yaml")],
              [["--data-dir", "{W}/data"], ["--limit-train", "8"], ["--limit-test", "8"],
               ["--num_epochs", "1"], ["--bs", "4"], ["--no-progress"]]),
    "eval": ([("graph", "{W}/tiny.yaml")],
             [["--checkpoint", "run/last.npz"], ["--data-dir", "{W}/data"],
              ["--limit-test", "8"]]),
    "predict": ([("graph", "{W}/tiny.yaml"), ("images", "{W}/images/digit.png")],
                [["--checkpoint", "run/last.npz"]]),
    "visualize": ([("graph", "{W}/tiny.yaml")],
                  [["--checkpoint", "run/last.npz"], ["--out", "pics"],
                   ["--data-dir", "{W}/data"], ["--limit-test", "8"], ["--count", "4"]]),
    "render": ([("graph", "{W}/tiny.yaml")], [["-o", "g.dot"]]),
    "compare": ([("graphs", "{W}/tiny.yaml"), ("graphs", "{W}/tiny_b.yaml")],
                [["--data-dir", "{W}/data"], ["--limit-train", "8"], ["--limit-test", "8"],
                 ["--steps", "2"], ["--bs", "4"], ["--out", "cmp"], ["--no-progress"]]),
    "reproduce": ([("recipe", "{W}/recipe.yaml")],
                  [["--data-dir", "{W}/data"], ["--epochs", "1"], ["--limit-train", "8"],
                   ["--limit-test", "8"], ["--out", "rp"], ["--no-progress"]]),
    "export": ([("graph", "{W}/tiny.yaml")],
               [["-o", "m.onnx"], ["--checkpoint", "run/last.npz"]]),
}


# -- introspection of the parsers -----------------------------------------------------------
@dataclass(frozen=True)
class Flag:
    """One optional action of a command's parser."""
    command: str
    options: tuple        # option strings, e.g. ('-o', '--output')
    dest: str
    nargs: object         # 0 for switches, None for one value, an int, '+', '?'...
    type_name: str        # the type validator's name ('' for strings)
    choices: tuple


@dataclass(frozen=True)
class Positional:
    dest: str
    nargs: object


def _parser(command: str):
    return build_parser(command).command_parser


def introspect(command: str) -> tuple:
    """(flags, positionals) of ``command``, read from its argparse parser."""
    flags, positionals = [], []
    for action in _parser(command)._actions:
        if not action.option_strings:
            positionals.append(Positional(action.dest, action.nargs))
            continue
        if action.dest in ("debug", "help"):   # --debug changes how bugs print; -h below
            continue
        type_name = getattr(action.type, "__name__", "") if action.type else ""
        flags.append(Flag(command, tuple(action.option_strings), action.dest, action.nargs,
                          type_name, tuple(action.choices or ())))
    return flags, positionals


PARSED = {name: introspect(name) for name in COMMAND_NAMES}
ALL_FLAGS = [f for name in COMMAND_NAMES for f in PARSED[name][0]]


# Values a flag's type accepts, drawn as often as hostile ones, so that cases get past
# parsing and reach the files, the data and the run with their other mutations.
VALID = {"positive_int": ["1", "2", "3", "4", "8", "16", "100"],
         "non_negative_int": ["0", "1", "2", "7"], "int": ["0", "1", "2", "8"],
         "positive_float": ["1e-3", "0.5", "1", "0.01", "30"],
         "non_negative_float": ["0", "1e-6", "0.5"], "float": ["0.5", "0.9", "1", "0"],
         "image_size": ["28", "28x28", "32", "20x24"]}


def pick(rng: random.Random, pool: list):
    return pool[rng.randrange(len(pool))]


def random_text(rng: random.Random, longest: int = 12) -> str:
    """Any characters a command line can hold: no NUL, and of the surrogates only those
    that undecodable bytes become (U+DC80..U+DCFF, Python's surrogateescape)."""
    def char() -> str:
        kind = rng.randrange(6)
        if kind == 0:
            return chr(rng.randrange(1, 32))
        if kind == 1:
            return chr(rng.randrange(0xDC80, 0xDD00))
        if kind == 2:
            code = rng.randrange(0x80, 0x110000)
            return chr(code if not 0xD800 <= code < 0xE000 else 0xE000)
        return chr(rng.randrange(32, 127))
    return "".join(char() for _ in range(rng.randrange(longest + 1)))


def value_for(rng: random.Random, flag: Flag) -> str:
    """One value for ``flag``, from the pool its dest or type calls for, valid or hostile."""
    if flag.dest in INPUT_POOLS:
        return pick(rng, INPUT_POOLS[flag.dest]) if rng.random() < 0.9 else random_text(rng)
    if rng.random() < 0.08:
        return random_text(rng)
    if flag.dest in OUTPUT_DESTS:
        return pick(rng, OUTPUTS)
    if flag.dest in SUFFIXED_DESTS:
        return pick(rng, SUFFIXED)
    if flag.choices:
        choices = [str(c) for c in flag.choices]
        return pick(rng, choices) if rng.random() < 0.7 else pick(
            rng, ["", "NUMPY", choices[0] + " ", choices[-1][:-1], "cupy", "tpu", "1", "é"])
    if flag.type_name in VALID and rng.random() < 0.5:
        return pick(rng, VALID[flag.type_name])
    if flag.type_name in INT_TYPES:
        return pick(rng, INTS) if rng.random() < 0.8 else str(rng.randint(-2 ** 70, 2 ** 70))
    if flag.type_name in FLOAT_TYPES:
        return pick(rng, FLOATS) if rng.random() < 0.8 else repr(rng.uniform(-1e3, 1e3))
    if flag.type_name == "image_size":
        return pick(rng, SIZES)
    if flag.type_name:            # a validator this file does not know yet
        return pick(rng, INTS + FLOATS + WORDS)
    return pick(rng, WORDS + OUTPUTS)


def flag_tokens(rng: random.Random, flag: Flag, option: str | None = None) -> list:
    """``flag`` written as command-line tokens: ``--flag VALUE`` or ``--flag=VALUE``."""
    option = option or pick(rng, list(flag.options))
    if flag.nargs == 0:   # a switch; rarely given a value, which it must refuse
        return [f"{option}={pick(rng, ['1', '', 'x'])}"] if rng.random() < 0.1 else [option]
    count = flag.nargs if isinstance(flag.nargs, int) else 1
    if flag.nargs in ("+", "*"):
        count = rng.randint(1, 3)
    values = [value_for(rng, flag) for _ in range(count)]
    if count == 1 and rng.random() < 0.4:
        return [f"{option}={values[0]}"]
    return [option, *values]


# -- cases ------------------------------------------------------------------------------
@dataclass
class Case:
    """One command line (with {W}, {R}, {S} placeholders), and how it was made."""
    seed: int
    argv: list
    steps: list = field(default_factory=list)

    def __repr__(self) -> str:
        return f"Case(seed={self.seed}, argv={shlex.join(self.argv)!r}, steps={self.steps!r})"


MUTATIONS = (["flag"] * 12 + ["drop"] * 3 + ["positional"] * 4 + ["set"] * 2 + ["data"] * 2
             + ["repeat", "foreign", "unknown", "abbreviation", "order", "before", "help"])


def build_case(seed: int) -> Case:
    """The case of ``seed``: a command, its usual cheap arguments, then 0 to 5 mutations.

    Hypothesis draws the seed (fixed in CI, from --fuzz-seed before a release) and the
    case follows from it through ``random.Random``: each case independent of the others,
    where hypothesis's own draws would give clusters of near copies of one command line
    (it mutates the examples it made before), and a case costs a process, not a call."""
    rng = random.Random(seed)
    command = pick(rng, COMMAND_NAMES)
    positionals, groups = BASE[command]
    positionals = [list(p) for p in positionals]
    groups = [list(g) for g in groups]
    flags, parser_positionals = PARSED[command]
    steps: list = []
    before: list = []
    for _ in range(pick(rng, [0, 1, 1, 1, 2, 2, 2, 3, 3, 4, 5])):
        how = pick(rng, MUTATIONS)
        if how == "flag" and flags:   # flags that take a value, three times as often
            tokens = flag_tokens(rng, pick(rng, flags + [f for f in flags if f.nargs != 0] * 2))
            groups.append(tokens)
            steps.append(f"flag {shlex.join(tokens)[:80]}")
        elif how == "drop" and groups:
            dropped = groups.pop(rng.randrange(len(groups)))
            steps.append(f"drop {shlex.join(dropped)[:60]}")
        elif how == "positional" and parser_positionals:
            p = pick(rng, parser_positionals)
            value = pick(rng, INPUT_POOLS.get(p.dest, WORDS))
            if command == "gradcheck" and value.startswith("{R}/graphs/"):
                value = "{W}/tiny_b.yaml"    # CapsNet's gradient check takes 30 s
            mine = [k for k, (dest, _) in enumerate(positionals) if dest == p.dest]
            choice = rng.random()
            if mine and (p.nargs not in ("+", "*") or choice < 0.5):
                positionals[pick(rng, mine)][1] = value
                steps.append(f"{p.dest} = {value[:60]!r}")
            elif mine and choice < 0.6:
                positionals = [q for q in positionals if q[0] != p.dest]
                steps.append(f"no {p.dest}")
            else:
                positionals.append([p.dest, value])
                steps.append(f"another {p.dest} {value[:60]!r}")
        elif how == "repeat" and groups:
            group = pick(rng, groups)
            option = group[0].split("=")[0]
            same = [f for f in flags if option in f.options]
            again = flag_tokens(rng, same[0], option) if same else list(group)
            groups.append(again)
            steps.append(f"again {shlex.join(again)[:60]}")
        elif how == "foreign":
            flag = pick(rng, [f for f in ALL_FLAGS if f.command != command])
            tokens = flag_tokens(rng, flag)
            groups.append(tokens)
            steps.append(f"{flag.command}'s {shlex.join(tokens)[:60]}")
        elif how == "unknown":
            token = pick(rng, UNKNOWN_TOKENS) if rng.random() < 0.7 else random_text(rng)
            groups.append([token])
            steps.append(f"token {token!r}")
        elif how == "abbreviation" and flags:
            flag = pick(rng, flags)
            long = max(flag.options, key=len)
            tokens = flag_tokens(rng, flag, long[:rng.randint(3, max(3, len(long) - 1))])
            groups.append(tokens)
            steps.append(f"abbreviated {shlex.join(tokens)[:60]}")
        elif how == "set":
            value = pick(rng, SET_VALUES) if rng.random() < 0.8 else random_text(rng)
            groups.append(["--set", value] if rng.random() < 0.5 else [f"--set={value}"])
            steps.append(f"--set {value[:60]!r}")
        elif how == "data" and {"dataset", "data_dir"} <= {f.dest for f in flags}:
            dataset, root = pick(rng, DATA_PAIRS)
            groups += [["--dataset", dataset], ["--data-dir", root]]
            steps.append(f"data {dataset} from {root}")
        elif how == "help":
            groups.append([pick(rng, ["-h", "--help", "--he"])])
            steps.append("help")
        elif how == "order" and len(groups) > 1:
            rng.shuffle(groups)
            steps.append("reordered")
        elif how == "before":
            before.append(pick(rng, ["--", "-x", "--bs", "--debu", command[:3], "1",
                                     random_text(rng, 4)]))
            steps.append(f"{before[-1]!r} before the command")
    at = rng.randint(0, len(groups))   # the positionals, among the flag groups
    argv = (before + [command] + [t for g in groups[:at] for t in g]
            + [v for _, v in positionals] + [t for g in groups[at:] for t in g])
    return Case(seed, argv, steps)


# -- the scratch world ----------------------------------------------------------------------
def _png(path: Path, width: int, height: int, mode: int = 0, data: bytes | None = None,
         depth: int = 8) -> None:
    """A PNG file written by hand: any declared size, any (even missing) pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(
            ">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    header = struct.pack(">IIBBBBB", width, height, depth, mode, 0, 0, 0)
    if data is None:
        data = zlib.compress(b"\x00" * 64)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data)
                     + chunk(b"IEND", b""))


def _idx(path: Path, magic: int, dims: tuple, payload: bytes) -> None:
    path.write_bytes(struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload)


def make_world(world: Path) -> None:
    """Everything the cases read (the checkpoint is trained afterwards, in a child)."""
    from PIL import Image
    world.mkdir(parents=True, exist_ok=True)
    (world / "tiny.yaml").write_text(GRAPH.format(name="tiny"))
    (world / "tiny_b.yaml").write_text(GRAPH.format(name="tiny_b"))
    _make_dataset(world / "data" / "mnist", compress=False, n_train=40, n_test=20)
    rng = np.random.default_rng(0)
    for split, count in (("train", 2), ("test", 1)):   # a folder data set, 10 classes
        for label in range(10):
            folder = world / "folder" / split / str(label)
            folder.mkdir(parents=True, exist_ok=True)
            for k in range(count):
                Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(
                    folder / f"{k}.png")
    # Corrupt data roots, each a mnist/ folder with the four IDX files.
    train_x = world / "data" / "mnist" / "train-images-idx3-ubyte"
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
    for bad in ("bad-trunc", "bad-magic", "bad-labels", "bad-count", "bad-huge", "bad-gz"):
        folder = world / bad / "mnist"
        folder.mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copy(world / "data" / "mnist" / name, folder / name)
    (world / "bad-trunc" / "mnist" / names[0]).write_bytes(train_x.read_bytes()[:5000])
    _idx(world / "bad-magic" / "mnist" / names[0], 0x0D03, (40, 28, 28), b"\x00" * 40 * 784)
    _idx(world / "bad-labels" / "mnist" / names[1], 0x0801, (40,), bytes([200] * 40))
    _idx(world / "bad-count" / "mnist" / names[1], 0x0801, (39,), bytes(range(39)))
    _idx(world / "bad-huge" / "mnist" / names[0], 0x0803, (2 ** 31, 28, 28), b"\x00" * 784)
    (world / "bad-gz" / "mnist" / names[0]).unlink()
    (world / "bad-gz" / "mnist" / (names[0] + ".gz")).write_bytes(b"\x1f\x8b\x08garbage")
    for name, files in GARBAGE_FILES.items():   # every reader's files, as garbage
        folder = world / "garbage" / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, file in enumerate(files):
            (folder / file).write_bytes(
                rng.integers(0, 256, 200 + 50 * k, dtype=np.uint8).tobytes())
    evil = world / "evil" / "cifar10" / "cifar-10-batches-py"
    evil.mkdir(parents=True)
    for k, file in enumerate(GARBAGE_FILES["cifar10/cifar-10-batches-py"]):
        (evil / file).write_bytes(EVIL_PICKLES[k % len(EVIL_PICKLES)])
    # Images for predict.
    images = world / "images"
    images.mkdir()
    digit = np.zeros((28, 28), np.uint8)
    digit[6:22, 12:16] = 255
    Image.fromarray(digit).save(images / "digit.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(images / "rgb.jpg")
    Image.fromarray(np.full((1, 1), 128, np.uint8)).save(images / "one.png")
    Image.fromarray(rng.integers(0, 256, (3, 900), dtype=np.uint8)).save(images / "wide.png")
    Image.fromarray(rng.integers(0, 65535, (28, 28), dtype=np.uint16)).save(images / "grey16.png")
    Image.fromarray(digit).convert("P").save(images / "palette.png")
    (images / "empty.png").write_bytes(b"")
    (images / "garbage.png").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    (images / "truncated.png").write_bytes((images / "digit.png").read_bytes()[:60])
    _png(images / "bomb.png", 15000, 15000)          # 225 Mpixels: PIL refuses it
    _png(images / "warn.png", 10000, 10000)          # 100 Mpixels: PIL warns, data missing
    (world / "images-good").mkdir()
    for name in ("digit.png", "rgb.jpg", "one.png", "palette.png"):
        shutil.copy(images / name, world / "images-good" / name)
    for split in ("train", "test"):   # a folder data set of broken images
        for label, names in enumerate([("digit.png", "bomb.png"), ("warn.png", "one.png"),
                                       ("truncated.png", "rgb.jpg"), ("empty.png", "garbage.png")]):
            folder = world / "folder-bad" / split / str(label)
            folder.mkdir(parents=True)
            for name in names:
                shutil.copy(images / name, folder / name)
    (images / "noimages").mkdir()
    (images / "noimages" / "notes.txt").write_text("no images here\n")
    # Hostile files.
    hostile = world / "hostile"
    (hostile / "dir").mkdir(parents=True)
    (hostile / "empty").write_bytes(b"")
    (hostile / "garbage.bin").write_bytes(rng.integers(0, 256, 4096, dtype=np.uint8).tobytes())
    (hostile / "text.npz").write_text("this is not a zip file\n")
    (hostile / "bad.yaml").write_text("nodes: [\n  - {id: x\n")
    (hostile / "list.yaml").write_text("- 1\n- 2\n")
    (hostile / "nonutf8.yaml").write_bytes(b"name: \xff\xfe\n")
    (hostile / "metrics-bad.jsonl").write_text('{"epoch": 1\n[1, 2]\n"text"\n{}\n')
    # Lines that parse, but are not whole records, after good ones (found by seed 102).
    train = '{"kind": "train", "epoch": 1, "iteration": 1, "loss": 0.5, "acc": 0.5, "lr": 0.1}\n'
    (hostile / "metrics-list.jsonl").write_text(train + "[1, 2]\n")
    (hostile / "metrics-fields.jsonl").write_text(
        train + '{"kind": "train"}\n{"kind": "epoch", "epoch": 1, "iteration": 1, '
                '"test_acc": "x", "test_loss": 1}\n')
    (hostile / "metrics-zero.jsonl").write_text(train.replace("0.5", "0"))
    (hostile / "metrics-nonutf8.jsonl").write_bytes(train.encode() + b"{\"kind\": \"\xea\xff\"}\n")
    (hostile / "metrics-nan.jsonl").write_text(
        '{"epoch": 1, "train_loss": NaN, "test_loss": Infinity, "train_acc": 1e999, '
        '"test_acc": -1, "iteration": 1}\n')
    for name, text in {
        "recipe-list.yaml": "- name\n",
        "recipe-unknown.yaml": "name: x\nrow: x\ngraph: ../tiny.yaml\ndata: {dataset: mnist}\n"
                               "train: {epochs: 1}\nnope: 1\n",
        "recipe-nograph.yaml": "name: x\nrow: x\ngraph: missing.yaml\ndata: {dataset: mnist}\n"
                               "train: {epochs: 1}\n",
        "recipe-types.yaml": "name: x\nrow: x\ngraph: ../tiny.yaml\ndata: {dataset: 5}\n"
                             "train: {epochs: .nan, batch_size: -1, lr: [1]}\n",
    }.items():
        (hostile / name).write_text(text)
    (world / "recipe.yaml").write_text(
        "name: tiny-recipe\nrow: \"tiny: a linear model\"\ngraph: tiny.yaml\n"
        "data: {dataset: mnist}\n"
        "train: {optimizer: adam, lr: 1.0e-3, batch_size: 4, epochs: 1, shift: 0, seed: 0}\n"
        "paper: {test_acc: 50.0, source: none}\n")
    (world / "rows-bad").mkdir()
    (world / "rows-bad" / "row.json").write_text('{"name": 5, "final_acc": "x"')
    (world / "rows-bad" / "a").mkdir()
    (world / "rows-bad" / "a" / "row.json").write_text("[1, 2, 3]")


def make_checkpoint_variants(world: Path) -> None:
    """Crafted copies of the trained checkpoint (tests/test_hostile_runtime.py's craft)."""
    hostile, last = world / "hostile", world / "run" / "last.npz"
    (hostile / "truncated.npz").write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    craft(last, hostile / "nan.npz", param__b=np.full(10, np.nan, np.float32))
    craft(last, hostile / "meta-list.npz", meta=np.asarray("[]"))
    np.savez(hostile / "pickle.npz", meta=np.array([{"a": 1}], dtype=object))
    shutil.copy(world / "other-run" / "last.npz", hostile / "other.npz")
    with np.load(last) as f:
        params = {k[len("param/"):]: f[k] for k in f.files if k.startswith("param/")}
    np.savez(hostile / "params.npz", **params)
    np.savez(hostile / "wrong-shapes.npz", **{k: np.zeros(3, np.float32) for k in params})


def make_case_folder(folder: Path, world: Path) -> Path:
    """A fresh working folder: the checkpoint copied (cases may overwrite or resume it),
    an existing file, a FIFO, links to /dev/full and /dev/null, a link loop."""
    work = folder / "work"
    (work / "run").mkdir(parents=True)
    for name in ("last.npz", "best.npz", "metrics.jsonl"):
        if (world / "run" / name).exists():   # not yet while the world is being made
            shutil.copy(world / "run" / name, work / "run" / name)
    (work / "afile").write_text("an existing file\n")
    (work / "sub").mkdir()
    os.mkfifo(work / "fifo")
    os.symlink("/dev/full", work / "full")
    os.symlink("/dev/null", work / "null")
    os.symlink("loop", work / "loop")
    return work


def resolve(argv: list, world: Path) -> list:
    shared = SHARED_DATA if (SHARED_DATA / "mnist").is_dir() else world / "missing-shared"
    return [a.replace("{W}", str(world)).replace("{R}", str(REPO)).replace("{S}", str(shared))
            for a in argv]


# -- what legitimately takes long, capped --------------------------------------------------
def _chosen(argv: list) -> str | None:
    """The command ``capsflow.cli.main`` picks (its rule)."""
    chosen = next((a for a in argv if not a.startswith("-")), None)
    return chosen if chosen in COMMANDS else None


def _parse(argv: list):
    """The namespace the CLI's parser makes of ``argv``, or None where parsing fails."""
    chosen = _chosen(argv)
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            parser = build_parser(chosen)
            args, unknown = parser.parse_known_args(argv)
    except (SystemExit, Exception):   # noqa: BLE001 (only deciding whether to cap)
        return None
    return None if unknown else args


def work_caps(argv: list, world: Path) -> list:
    """Flags appended to ``argv`` so that the case stays cheap: argparse keeps the last
    value of a flag (and still validates each one given)."""
    args = _parse(argv)
    if args is None:
        return []
    command = args.command
    extra: list = []

    def cap(dest: str, flag: str, limit: float, to=None, when_absent: bool = False) -> None:
        value = getattr(args, dest, None)
        if (value is None and when_absent) or (
                isinstance(value, (int, float)) and not isinstance(value, bool) and value > limit):
            extra.extend([flag, str(to if to is not None else limit)])

    def inside_world(path) -> bool:
        try:
            return path is not None and Path(path).resolve().is_relative_to(world.resolve())
        except (OSError, ValueError, RuntimeError):
            return False

    graphs = getattr(args, "graphs", None) or [getattr(args, "graph", None)]
    real_graph = any(g and inside_world(g) is False and str(g).endswith(".yaml")
                     and Path(str(g)).is_file() for g in graphs)
    small_data = inside_world(getattr(args, "data_dir", None))
    if command == "train":
        cap("num_epochs", "--num_epochs", 2, 1, when_absent=True)
        cap("nproc", "--nproc", 2)
        if real_graph:
            cap("bs", "--bs", 16, 8, when_absent=True)
    elif command == "bench":
        cap("repeats", "--repeats", 3, 1)
        cap("warmup", "--warmup", 2, 1)
        cap("epochs", "--epochs", 2, 1)
        cap("nproc", "--nproc", 2)
        if real_graph:
            cap("bs", "--bs", 8, 4, when_absent=True)
        elif not args.epoch and not args.nproc:
            cap("bs", "--bs", 4096, 64)
    elif command == "compare":
        cap("steps", "--steps", 4, 2)
        cap("num_epochs", "--num_epochs", 2, 1)
        if real_graph:
            cap("bs", "--bs", 16, 8, when_absent=True)
    elif command == "reproduce":
        if args.recipe:
            cap("epochs", "--epochs", 1, 1, when_absent=True)
    elif command == "gradcheck":
        if isinstance(args.bs, int) and 64 < args.bs < 10 ** 6:
            extra += ["--bs", "8"]
    elif command == "render":
        if real_graph:
            cap("bs", "--bs", 16, 8)
        elif 4096 < (args.bs or 0) < 10 ** 6:
            extra += ["--bs", "64"]
    if not small_data and command in ("train", "compare", "reproduce", "bench", "eval",
                                      "visualize"):
        if command != "bench" or args.epoch:
            if command not in ("eval", "visualize"):
                cap("limit_train", "--limit-train", 64, 64, when_absent=True)
            cap("limit_test", "--limit-test", 64, 64, when_absent=True)
    return extra


# -- the child ----------------------------------------------------------------------------
def _proc_status(key: str, pid: str = "self") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _children(pid: int) -> list:
    """The live (not zombie) children of ``pid``."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return [c for c in out if _alive(c)]


def _alive(pid: int) -> bool:
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            "utf-8", "replace").strip()[:300]
    except OSError:
        return "?"


def _harmless(cmdline: str) -> bool:
    """Helpers that end with the process that started them, not the command's work."""
    return "multiprocessing.resource_tracker" in cmdline


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _descendants(pid: int) -> list:
    seen, stack = [], [pid]
    while stack:
        for c in _children(stack.pop()):
            if c not in seen:
                seen.append(c)
                stack.append(c)
    return seen


def _fault(name: str) -> None:
    """Faults for test_the_harness_catches_each_kind_of_failure, as capsflow.runners.check's
    main: each is a bug the harness must report."""
    import capsflow.runners.check as check_module

    def run(args):
        if name == "bug":
            return {}["no such key"]
        if name == "traceback":
            print("Traceback (most recent call last):\n  ...", file=sys.stderr)
            return 2
        if name == "two-lines":
            print("capsflow check: error: one\ncapsflow check: error: two", file=sys.stderr)
            return 2
        if name == "warning":
            np.float64(1) / np.float64(0)
            return 0
        if name == "signal":
            os.kill(os.getpid(), signal.SIGSEGV)
        if name == "hang":
            time.sleep(3600)
        if name == "orphan":
            import subprocess
            subprocess.Popen(["sleep", "60"])
            return 0
        if name == "thread":
            threading.Thread(target=time.sleep, args=(3600,)).start()
            return 0
        if name == "pwned":
            os.mkdir(PWNED)
            return 0
        if name == "memory":   # refused by RLIMIT_AS; np.empty touches no page without it
            np.empty(MEMORY_LIMIT * 2 // 8)
        return 0
    check_module.main = run


def child(job: dict, conn) -> None:
    """Run ``capsflow.cli.main(job['argv'])`` as a command would run, and send the outcome."""
    from capsflow import cli
    os.setsid()                                   # a hang is killed with its process group
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)   # PR_SET_CHILD_SUBREAPER
    os.chdir(job["cwd"])
    # As the process of a command: not a daemonic multiprocessing child (compare --jobs
    # starts processes, which multiprocessing refuses to a daemon), its own argv.
    multiprocessing.current_process()._config["daemon"] = False
    sys.argv = ["capsflow", *job["argv"]]
    for var in ("CAPSFLOW_DATA", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                "MASTER_ADDR", "MASTER_PORT", "PYTHONPATH"):
        os.environ.pop(var, None)
    os.environ["XDG_CACHE_HOME"] = job["cache"]
    out = os.open(job["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    err = os.open(job["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(out, 1)
    os.dup2(err, 2)
    os.close(out)
    os.close(err)
    # As under a UTF-8 C locale (this machine's LANG=C.UTF-8): surrogate escapes out.
    sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False),
                                                   encoding="utf-8", errors="surrogateescape")
    sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False),
                                                   encoding="utf-8", errors="backslashreplace",
                                                   line_buffering=True)
    faulthandler.enable(sys.stderr)               # a crash prints its stack
    faulthandler.dump_traceback_later(max(job["timeout"] - 2, 0.5), exit=False,
                                      file=sys.stderr)   # where it hung, before the kill
    space = _proc_status("VmSize") + MEMORY_LIMIT
    with contextlib.suppress(OSError, ValueError):
        resource.setrlimit(resource.RLIMIT_AS, (space, space))
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")   # reset VmHWM
    rss = _proc_status("VmRSS")
    if job.get("fault"):
        _fault(job["fault"])
    start = time.perf_counter()
    uncaught = None
    try:
        rc = cli.main(list(job["argv"]))
    except SystemExit as exc:                     # argparse's own exits; -h
        rc = exc.code
        if rc is None:
            rc = 0
        elif not isinstance(rc, int):             # sys.exit("message"): printed, status 1
            print(rc, file=sys.stderr)
            rc = 1
    except BaseException:  # noqa: BLE001 (what the interpreter would print)
        uncaught = traceback.format_exc()
        print(uncaught, file=sys.stderr, end="")
        rc = 1
    seconds = time.perf_counter() - start
    faulthandler.cancel_dump_traceback_later()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    # What the command started must have ended when main returned (a short grace for
    # processes that are exiting); anything still running is reported, then killed.
    deadline = time.monotonic() + LEFTOVER_GRACE
    while True:
        _reap()
        left = [p for p in _descendants(os.getpid()) if not _harmless(_cmdline(p))]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    leftovers = [f"{p}: {_cmdline(p)}" for p in left]
    for p in _descendants(os.getpid()):
        with contextlib.suppress(OSError):
            os.kill(p, signal.SIGKILL)
    _reap()
    threads = [t.name for t in threading.enumerate()
               if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    conn.send({"outcome": "exited", "rc": rc, "seconds": seconds, "leftovers": leftovers,
               "threads": threads, "uncaught": uncaught,
               "memory": max(_proc_status("VmHWM") - rss, 0)})
    conn.close()


# -- the fork server and one case ------------------------------------------------------------
def _set_environment(values: dict) -> None:
    """Set each variable to its value; None removes it."""
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


class ForkServer:
    """A multiprocessing fork server of this file's own: test_fuzz.py's (the module-wide
    one) preloads other modules, and only the first one started in a process counts."""

    def __init__(self, scratch: Path):
        self.scratch = scratch
        self.server = multiprocessing.forkserver.ForkServer()
        self.context = multiprocessing.get_context("forkserver")

    def __enter__(self) -> "ForkServer":
        self.server.set_forkserver_preload(PRELOAD + [__name__])
        changes = {"PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parent),
                                                               os.environ.get("PYTHONPATH")])),
                   "MPLBACKEND": "Agg", "XDG_CACHE_HOME": str(self.scratch / "cache"),
                   "CAPSFLOW_DATA": None}
        saved = {k: os.environ.get(k) for k in changes}
        try:
            _set_environment(changes)
            self.server.ensure_running()
        finally:
            _set_environment(saved)
        return self

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(Exception):
            self.server._stop()

    def start(self, target, args) -> multiprocessing.Process:
        proc = self.context.Process(target=target, args=args, daemon=True)
        module = multiprocessing.forkserver
        shared = module.connect_to_new_process
        module.connect_to_new_process = self.server.connect_to_new_process
        try:
            proc.start()
        finally:
            module.connect_to_new_process = shared
        return proc


def _stray_processes(folder: Path) -> list:
    """Processes whose working folder lies in ``folder``: started by a case, still running."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if cwd.startswith(str(folder)) and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


def _kill(proc) -> None:
    """Kill ``proc`` and its process group (the child made itself a session leader)."""
    with contextlib.suppress(OSError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        proc.kill()
    proc.join(10)


def run_case(server: ForkServer, argv: list, folder: Path, world: Path, timeout: float,
             fault: str | None = None, exit_grace: float = EXIT_GRACE) -> dict:
    """Run one command line in a fresh child; its outcome, stdout and stderr."""
    folder.mkdir(parents=True)
    work = make_case_folder(folder, world)
    job = {"argv": argv, "cwd": str(work), "cache": str(folder / "cache"),
           "stdout": str(folder / "stdout.txt"), "stderr": str(folder / "stderr.txt"),
           "timeout": timeout, "fault": fault}
    receive, send = server.context.Pipe(duplex=False)
    started = time.perf_counter()
    proc = server.start(child, (job, send))
    send.close()
    result, answered = None, False
    try:
        answered = receive.poll(timeout)   # a result, or the end of the pipe: it died
        if answered:
            with contextlib.suppress(EOFError):
                result = receive.recv()
    finally:
        receive.close()
    if result is None and answered:     # give the fork server time to see it die
        proc.join(10)
    if result is None and proc.is_alive():
        _kill(proc)
        result = {"outcome": "hang", "seconds": timeout}
    else:
        proc.join(exit_grace)
        if proc.is_alive():       # main returned but the process does not end
            _kill(proc)
            result["outcome"], result["exit_grace"] = "no exit", exit_grace
        elif result is None:
            result = {"outcome": "crash", "exitcode": proc.exitcode,
                      "seconds": time.perf_counter() - started}
    stray = _stray_processes(folder)
    if stray:
        result.setdefault("leftovers", [])
        result["leftovers"] = result["leftovers"] + [f"{p}: {_cmdline(p)}" for p in stray]
        for p in stray:
            with contextlib.suppress(OSError):
                os.kill(p, signal.SIGKILL)
    if (work / PWNED).exists():
        result["pwned"] = True
    result["wall"] = time.perf_counter() - started
    result["stdout"] = _read(folder / "stdout.txt", 4000)
    result["stderr"] = _read(folder / "stderr.txt", 20000)
    return result


def _read(path: Path, limit: int) -> str:
    try:
        data = path.read_bytes()
    except OSError:
        return ""
    text = data.decode("utf-8", "backslashreplace")
    return text if len(text) <= limit else text[:limit // 2] + "\n[...]\n" + text[-limit // 2:]


# -- the invariant -----------------------------------------------------------------------------
_UNITS = {"B": 1, "KiB": 2 ** 10, "MiB": 2 ** 20, "GiB": 2 ** 30, "TiB": 2 ** 40, "PiB": 2 ** 50,
          "EiB": 2 ** 60}
WARNING = re.compile(r"^\S.*:\d+: \w*Warning: ", re.MULTILINE)
PROGRESS = re.compile(r"\d+%\||\| *\d+/\d+ \[|\d+/\d+ \[\d")


def shown_lines(stderr: str) -> list:
    """The lines of ``stderr`` that say something: progress bars (tqdm's, updated in place
    after carriage returns, on stderr also when it is a file) and blank lines do not count."""
    shown = ["\r".join(part for part in line.split("\r")
                       if part.strip() and not PROGRESS.search(part)).strip()
             for line in stderr.split("\n")]
    return [line for line in shown if line]


def expected_prefixes(argv: list) -> tuple:
    """How the error line may start: the command's parser says ``capsflow CMD: error:``,
    the top-level one (no command, or a word before it) ``capsflow: error:``."""
    chosen = _chosen(argv)
    return (f"capsflow {chosen}: error: ", "capsflow: error: ") if chosen else \
        ("capsflow: error: ",)


def problem_with(result: dict, argv: list, timeout: float) -> str | None:
    """What breaks the promise in ``result``, or None."""
    outcome, err = result["outcome"], result.get("stderr", "")
    if outcome == "hang":
        return f"still running after {timeout:g} s (a hang); its stacks:\n{err[-6000:]}"
    if outcome == "crash":
        code = result.get("exitcode")
        how = (f"killed by signal {-code} ({signal.Signals(-code).name})" if code and code < 0
               else f"died with exit code {code} before reporting")
        return f"{how}\n{err[-4000:]}"
    problems = []
    if result.get("pwned"):
        problems.append(f"a data file ran code: {PWNED} was made in the case's folder")
    if outcome == "no exit":   # Python joins non-daemon threads at exit
        problems.append(f"main returned but the process did not exit within "
                        f"{result['exit_grace']:g} s "
                        f"(non-daemon threads when main returned: {result.get('threads')})")
    if result.get("leftovers"):
        problems.append(f"processes left running: {result['leftovers']}")
    rc, lines = result["rc"], shown_lines(err)
    if rc not in (0, 2):
        problems.append(f"exit status {rc!r}")
    if "Traceback (most recent call last)" in err:
        problems.append("a Python traceback on stderr")
    elif WARNING.search(err):
        problems.append("a Python warning on stderr")
    if rc == 2:
        if len(lines) != 1:
            problems.append(f"exit status 2 with {len(lines)} lines on stderr, not one")
        elif not lines[0].startswith(expected_prefixes(argv)):
            problems.append(f"the error line does not start with "
                            f"{' or '.join(map(repr, expected_prefixes(argv)))}")
        refused = re.search(r"error: not enough memory \((?:Unable to allocate ([\d.]+) (\w+))?",
                           err)
        if refused:
            asked = (float(refused.group(1)) * _UNITS.get(refused.group(2), 1)
                     if refused.group(1) else 0)
            if asked <= (memory.physical_memory() or 0):
                problems.append(f"ran out of its {MEMORY_LIMIT >> 30} GiB of headroom on a size "
                                f"no check refused (a memory blow-up on a real machine)")
    if not problems:
        return None
    return "; ".join(problems) + f"\nstderr:\n{err[-4000:]}"


def signature(result: dict, argv: list) -> str:
    """What tells one finding from another."""
    err, command = result.get("stderr", ""), _chosen(argv) or "-"
    if result["outcome"] in ("hang", "crash"):
        frames = re.findall(r'File "([^"]+)", line (\d+)', err)
        ours = [(f, n) for f, n in frames if "capsflow" in f or "/runners/" in f
                or "/ops/" in f] or frames
        where = f"{Path(ours[0][0]).name}:{ours[0][1]}" if ours else "?"
        return f"{result['outcome']}-{command}-{where}"
    if result.get("pwned"):
        return f"code-execution-{command}"
    if result.get("leftovers") or result["outcome"] == "no exit":
        return f"left-running-{command}"
    bug = re.search(r"internal error \(a bug in capsflow\): (\w+).*? at (\S+?):(\d+);", err)
    if bug:
        return f"rc1-{bug.group(1)}-{Path(bug.group(2)).name}:{bug.group(3)}"
    if "Traceback (most recent call last)" in err:
        frames = re.findall(r'File "([^"]+)", line (\d+)', err)
        where = f"{Path(frames[-1][0]).name}:{frames[-1][1]}" if frames else "?"
        return f"traceback-{command}-{where}"
    warning = WARNING.search(err)
    if warning:
        line = err[warning.start():].split("\n")[0]
        found = re.match(r"(\S+?):(\d+): (\w+):", line)
        if found:
            return f"warning-{found.group(3)}-{Path(found.group(1)).name}:{found.group(2)}"
    if "not enough memory" in err:
        return f"memory-{command}"
    rc = result.get("rc")
    first = (shown_lines(err) or [""])[0]
    if rc == 2 and len(shown_lines(err)) > 1 and any("\n" in a for a in argv):
        return f"rc2-newline-echoed-{command}-{error_kind(first)[:60]}"
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\S*[/\\]\S*|\S*\d\S*", "_", first.split(" error: ")[-1])
    return f"rc{rc}-{command}-{re.sub(r'[^A-Za-z_]+', ' ', text).strip()[:50]}"


def error_kind(err: str) -> str:
    """A one-line error without its paths, names and numbers, for DIR/errors.txt."""
    lines = shown_lines(err)
    if not lines:
        return "(nothing on stderr)"
    text = lines[-1]
    command = re.match(r"capsflow( \w+)?: ", text)
    text = re.sub(r"'[^']*'|\"[^\"]*\"|\S*[/\\]\S*|\S*\d\S*|\(.*?\)", "_",
                  text.split(": error: ")[-1])
    return f"{command.group(0) if command else ''}{text[:100]}"


class Findings:
    """--fuzz-findings DIR: every distinct finding and its first cases, and a summary."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.count: dict = {}

    def add(self, case: Case, argv: list, result: dict, problem: str, debug: str | None) -> None:
        key = signature(result, argv)
        self.count[key] = self.count.get(key, 0) + 1
        if self.count[key] > 3:
            return
        index = list(self.count).index(key) + 1
        where = (self.folder / f"{index:03d}-{re.sub(r'[^A-Za-z0-9.:_-]+', '_', key)[:80]}"
                 / str(self.count[key]))
        where.mkdir(parents=True, exist_ok=True)
        (where / "case.txt").write_text(
            f"capsflow {shlex.join(argv)}\n\n{case!r}\n\nargv as JSON: "
            f"{json.dumps(argv)}\n\n{problem}\n", errors="backslashreplace")
        (where / "stderr.txt").write_text(result.get("stderr", ""), errors="backslashreplace")
        (where / "result.json").write_text(json.dumps(
            {k: v for k, v in result.items() if k != "stderr"}, indent=1, default=repr))
        if debug:
            (where / "debug-traceback.txt").write_text(debug, errors="backslashreplace")

    def log(self, argv: list, how: str, seconds: float, problem: str | None) -> None:
        """One line per case in DIR/cases.jsonl: argv, how it ended, seconds."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / "cases.jsonl", "a", errors="backslashreplace") as f:
            f.write(json.dumps({"argv": argv, "how": how, "seconds": round(seconds, 2),
                                "finding": None if problem is None else problem.split("\n")[0]})
                    + "\n")

    def summary(self) -> str:
        return "\n".join(f"{n:6d}  {k}" for k, n in
                         sorted(self.count.items(), key=lambda item: -item[1]))


def _how(result: dict) -> str:
    if result["outcome"] != "exited":
        return result["outcome"]
    err = result.get("stderr", "")
    if result["rc"] == 2 and "not enough memory" in err:
        return "rc 2 (not enough memory)"
    if result["rc"] == 0 and "usage:" in result.get("stdout", ""):
        return "rc 0 (help)"
    return f"rc {result['rc']}"


# -- the world, made once per session ------------------------------------------------------------
@pytest.fixture(scope="module")
def fuzz_world(tmp_path_factory, request):
    """(fork server, world folder, scratch folder for cases, timeout)."""
    scratch = tmp_path_factory.mktemp("fuzz-cli")
    world = scratch / "world"
    make_world(world)
    timeout = DEFAULT_TIMEOUT
    if any(a.startswith("--fuzz-timeout") for a in request.config.invocation_params.args):
        timeout = request.config.getoption("--fuzz-timeout")
    with ForkServer(scratch) as server:
        # The tiny checkpoint that eval, visualize, predict, export and train --resume read,
        # trained in a child as the cases run (and another graph's, for a mismatch).
        for name, graph in (("run", "tiny.yaml"), ("other-run", "tiny_b.yaml")):
            done = run_case(server, ["train", str(world / graph), "--data-dir",
                                     str(world / "data"), "--bs", "10", "--num_epochs", "1",
                                     "--no-progress", "--save_dir", str(world / name)],
                            scratch / f"setup-{name}", world, max(timeout, 120))
            assert done["outcome"] == "exited" and done["rc"] == 0, done
        make_checkpoint_variants(world)
        rows = run_case(server, ["reproduce", str(world / "recipe.yaml"), "--data-dir",
                                 str(world / "data"), "--out", str(world / "rows" / "tiny"),
                                 "--no-progress"], scratch / "setup-rows", world, max(timeout, 120))
        assert rows["outcome"] == "exited" and rows["rc"] == 0, rows
        yield server, world, scratch / "cases", timeout


# -- the tests -------------------------------------------------------------------------------
@pytest.mark.parametrize("fault, expected", [
    (None, None),
    ("bug", "exit status 1"),
    ("traceback", "a Python traceback on stderr"),
    ("two-lines", "with 2 lines on stderr"),
    ("warning", "a Python warning on stderr"),
    ("signal", "killed by signal 11 (SIGSEGV)"),
    ("orphan", "processes left running"),
    ("thread", "did not exit"),
    ("memory", "ran out of its 2 GiB of headroom"),
    ("pwned", "a data file ran code"),
    ("hang", "a hang"),
])
def test_the_harness_catches_each_kind_of_failure(fuzz_world, fault, expected):
    """The checks the fuzzer relies on: a bug planted as capsflow check's main is reported
    (and the plain command is not)."""
    server, world, cases_folder, _ = fuzz_world
    timeout = 4.0 if fault == "hang" else 60.0
    argv = ["check", str(world / "tiny.yaml")]
    folder = cases_folder / f"harness-{fault}"
    result = run_case(server, argv, folder, world, timeout, fault=fault, exit_grace=2.0)
    problem = problem_with(result, argv, timeout)
    if expected is None:
        assert problem is None and result["rc"] == 0, result
        assert "parameters: 16,475 total" in result["stdout"]
    else:
        assert problem is not None and expected in problem, (problem, result)
    assert not _stray_processes(folder)
    if fault in ("hang", "signal"):
        assert "_fault" in result["stderr"] or "run" in result["stderr"], result["stderr"]


def _explicit(*argv: str) -> Case:
    return Case(-1, list(argv), ["explicit"])


TRAIN = ["--data-dir", "{W}/data", "--limit-train", "8", "--limit-test", "8", "--num_epochs",
         "1", "--bs", "4", "--no-progress"]


def test_fuzz_cli(request, fuzz_world):
    """Every command line ends in exit status 0, or 2 with one line on stderr."""
    server, world, cases_folder, timeout = fuzz_world
    examples = request.config.getoption("--fuzz-examples") or CI_EXAMPLES
    fuzz_seed = request.config.getoption("--fuzz-seed")
    folder = request.config.getoption("--fuzz-findings")
    findings = Findings(Path(folder)) if folder else None
    errors: dict = {}
    outcomes: dict = {}
    totals = {"cases": 0, "slowest": 0.0, "slowest case": "", "most memory": 0}

    @settings(max_examples=examples, derandomize=fuzz_seed is None, deadline=None,
              database=None, print_blob=False, suppress_health_check=list(HealthCheck),
              phases=[Phase.explicit, Phase.generate])
    @given(case=st.integers(0, 2 ** 63 - 1).map(build_case))
    # Every command once, and those that start processes (CI runs these first).
    @example(case=_explicit("check", "{W}/tiny.yaml", "--quiet", "--set", "ballast=2"))
    @example(case=_explicit("ops", "--markdown"))
    @example(case=_explicit("gradcheck", "{W}/tiny.yaml", "--seed", "1"))
    @example(case=_explicit("bench", "{W}/tiny.yaml", "--no-torch", "--repeats", "1",
                            "--warmup", "1", "--bs", "4", "--json", "b.json"))
    @example(case=_explicit("train", "{W}/tiny.yaml", *TRAIN, "--nproc", "2"))
    @example(case=_explicit("train", "{W}/tiny.yaml", *TRAIN, "--backend", "cupy"))
    @example(case=_explicit("train", "{W}/tiny.yaml", *TRAIN[:6], "--num_epochs", "2",
                            "--resume", "run/last.npz"))
    @example(case=_explicit("eval", "{W}/tiny.yaml", "--checkpoint", "{W}/hostile/truncated.npz",
                            "--data-dir", "{W}/data"))
    @example(case=_explicit("predict", "{W}/tiny.yaml", "{W}/images-good", "--checkpoint",
                            "run/last.npz", "--recon", "recon", "--top", "3"))
    @example(case=_explicit("visualize", "{W}/tiny.yaml", "--checkpoint", "run/last.npz",
                            "--out", "pics", "--data-dir", "{W}/data", "--limit-test", "8"))
    @example(case=_explicit("render", "{W}/tiny.yaml", "-o", "g.svg", "--grad-norms",
                            "--random-input", "--stats", "s.json"))
    @example(case=_explicit("compare", "{W}/tiny.yaml", "{W}/tiny_b.yaml", "--data-dir",
                            "{W}/data", "--limit-train", "8", "--limit-test", "8", "--steps",
                            "2", "--bs", "4", "--out", "cmp", "--no-progress", "--jobs", "2"))
    @example(case=_explicit("reproduce", "{W}/recipe.yaml", "--data-dir", "{W}/data",
                            "--out", "rp", "--no-progress"))
    @example(case=_explicit("reproduce", "--table", "{W}/rows", "--plot", "p.png"))
    @example(case=_explicit("export", "{W}/tiny.yaml", "-o", "m.onnx", "--checkpoint",
                            "run/last.npz", "--draw", "m.dot"))
    def fuzz(case: Case) -> None:
        totals["cases"] += 1
        argv = resolve(case.argv, world)
        argv = argv + work_caps(argv, world)
        where = cases_folder / f"{totals['cases']:05d}"
        result = run_case(server, argv, where, world, timeout)
        seconds = result.get("seconds", result["wall"])
        if seconds > totals["slowest"]:
            totals["slowest"], totals["slowest case"] = seconds, shlex.join(argv)[:500]
        totals["most memory"] = max(totals["most memory"], result.get("memory", 0))
        how = _how(result)
        outcomes[how] = outcomes.get(how, 0) + 1
        if result.get("rc") == 2:
            kind = error_kind(result["stderr"])
            errors[kind] = errors.get(kind, 0) + 1
        problem = problem_with(result, argv, timeout)
        if findings:
            findings.log(argv, how, seconds, problem)
        if problem is None:
            shutil.rmtree(where, ignore_errors=True)
            return
        debug = None
        if result.get("rc") == 1 and (not findings or findings.count.get(
                signature(result, argv), 0) < DEBUG_RERUNS):
            rerun = run_case(server, ["--debug", *argv], where.with_name(where.name + "-debug"),
                             world, timeout)
            debug = rerun.get("stderr", "")
        if findings:
            findings.add(case, argv, result, problem, debug)
            return
        note(f"argv: {json.dumps(argv)}")
        if debug:
            note(f"with --debug:\n{debug[-6000:]}")
        raise AssertionError(f"capsflow {shlex.join(argv)[:2000]}\n{problem}")

    if fuzz_seed is not None:
        fuzz = hypothesis_seed(fuzz_seed)(fuzz)
    try:
        fuzz()
    finally:
        report = (f"fuzz-cli: {totals['cases']} cases; slowest {totals['slowest']:.1f} s "
                  f"({totals['slowest case'][:300]}); most memory "
                  f"{totals['most memory'] / 2 ** 20:.0f} MiB; "
                  + ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items())))
        print(report)
        if findings:
            findings.folder.mkdir(parents=True, exist_ok=True)
            (findings.folder / "summary.txt").write_text(
                f"{report}\n\nfindings (signature: count):\n{findings.summary()}\n")
            (findings.folder / "errors.txt").write_text("".join(
                f"{n:6d}  {k}\n" for k, n in sorted(errors.items(), key=lambda x: -x[1])),
                errors="backslashreplace")
    if findings:
        assert not findings.count, f"findings in {findings.folder}:\n{findings.summary()}"
