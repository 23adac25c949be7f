"""``capsflow compare A.yaml B.yaml ...``: train graphs side by side and tabulate them.

    capsflow compare graphs/capsnet*.yaml --data-dir DIR --limit-train 3000 --steps 300

Every graph is trained by the same loop (``runners.training.Trainer``) with the same
settings: the same seed (so parameters the graphs share start equal, each parameter
drawing from its own stream), the same examples in the same batch order with the same
shifts, and the same budget, ``--steps`` optimizer steps or ``--num_epochs`` epochs.
The test split is evaluated once, at the end (``--val_epoch`` for more often).

Writes under ``--out`` (default runs/compare): compare.md and compare.csv (the table),
compare.png (loss and accuracy curves of all graphs), and one folder per graph with its
metrics.jsonl (and checkpoints with ``--keep-checkpoints``). The table: variant,
parameters, ms/step (median time of a training step: forward, backward and update),
final train loss (mean over the last 10% of the steps), test accuracy, routing iterations
("-" for a graph without routing). Accuracy is the argmax of each graph's class scores:
its output ``scores``, else ``lengths`` (``runners.training.class_scores``), so graphs
that are not CapsNet (graphs/baseline-cnn.yaml) compare too.

``--jobs N`` trains up to N graphs at a time, each in its own process (started with
'spawn': a fresh interpreter, no threads or BLAS state inherited), on the data the parent
loaded, with BLAS held to ``--threads-per-job`` threads (default: the CPUs divided among
the jobs) so the jobs do not oversubscribe the cores, and each job's step checked against
1/N of the machine's memory (runners/step_memory.py). A graph that fails (diverges, raises
an error, or its process dies) is a note in its row and the others go on; Ctrl-C stops
them all, each saving its last.npz as ``capsflow train`` does. The numbers equal those of
``--jobs 1`` when each job has as many BLAS threads as the sequential run had (the CPU
convolution sums its batch in one part per thread, so another thread count changes the
float32 round-off, nothing else).

``capsflow compare --merge DIR... --out DIR`` writes one table and figure of the graphs of
several such runs (for example one job-array task per graph on a cluster).
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import platform
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from capsflow.backends import get_backend
from capsflow.backends.cpu.parallel import blas_threads
from capsflow.cli import (check_output_dir, int_up_to, non_negative_int, positive_float,
                          positive_int)
from capsflow.errors import CapsflowError
from capsflow.lang.spec import NAME_PATTERN
from capsflow.options import Options, add_option_arguments, option_arguments
from capsflow.training.optim import OPTIMIZERS
from capsflow.runners.pictures import save_figure
from capsflow.runners.signals import Terminated, interrupts_deferred, terminate_as_interrupt
from capsflow.runners.train import (add_data_arguments, add_schedule_arguments,
                                   add_augmentation_arguments, config_from_args)
from capsflow.runners.training import METRICS as METRICS_FILE
from capsflow.runners.training import (TrainConfig, Trainer, TrainingDiverged, class_scores,
                                       fit_graph_to_data, load_data, read_metrics, run_files)

COLUMNS = ("variant", "parameters", "ms/step", "final train loss", "test accuracy",
           "routing iterations")
CURVE_POINTS = 50  # default --disp gives about this many points per training curve


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    parser.add_argument("graphs", nargs="+", metavar="GRAPH.yaml",
                        help="graphs to train, e.g. graphs/capsnet.yaml graphs/capsnet-leaky.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="override a variable in every graph (repeatable); each graph "
                             "must declare it")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive_int, metavar="N",
                        help="train every graph for N optimizer steps")
    budget.add_argument("--num_epochs", type=positive_int, metavar="N",
                        help="train every graph for N epochs (default 1)")
    a = parser.add_argument
    a("--out", default="runs/compare", metavar="DIR",
      help="folder for compare.md/.csv/.png and one subfolder per graph (runs/compare)")
    a("--bs", type=positive_int, metavar="N", help=f"batch size (default {d.batch_size})")
    a("--lr", type=positive_float, metavar="LR", help=f"learning rate (default {d.lr:g})")
    a("--opt", choices=OPTIMIZERS, help=f"optimizer (default {d.optimizer})")
    add_schedule_arguments(parser)
    a("--val_epoch", type=positive_int, metavar="N",
      help="evaluate on the test split every N epochs (default: once, at the end)")
    a("--disp", type=positive_int, metavar="N",
      help=f"record the running train loss every N steps (default: about {CURVE_POINTS} "
           f"points per curve)")
    a("--seed", type=non_negative_int, metavar="S",
      help=f"seed of init, batch order, shifts and flips (default {d.seed})")
    add_augmentation_arguments(parser, d.shift)
    add_data_arguments(parser, d.dataset)
    a("--limit-train", dest="limit_train", type=positive_int, metavar="N",
      help="train on the first N training examples only")
    a("--limit-test", dest="limit_test", type=positive_int, metavar="N",
      help="test on the first N test examples only (default: the whole test split)")
    add_option_arguments(parser)
    a("--keep-checkpoints", action="store_true",
      help="keep each graph's last.npz/best.npz (about 100 MB each for CapsNet); by default "
           "only metrics.jsonl stays (and last.npz of an interrupted graph)")
    a("--overwrite", action="store_true",
      help="train into an --out that holds an earlier compare of these graphs, replacing "
           "it; without it that is refused")
    a("--no-progress", dest="progress", action="store_false", help="no progress bars")
    a("--merge", action="store_true",
      help="instead of training: the arguments are folders written by capsflow compare "
           "(e.g. one per job-array task); write one table and figure of all their graphs "
           "to --out")
    a("--jobs", type=positive_int, default=1, metavar="N",
      help="train up to N graphs at a time, one process each (default 1: one after another); "
           "their progress is one line per graph started and finished")
    a("--threads-per-job", dest="threads_per_job", type=int_up_to(MAX_THREADS), metavar="N",
      help="BLAS threads of each job (default with --jobs: the CPUs divided among the jobs, "
           "at least 1; with --jobs 1: as many as BLAS has)")


@dataclass
class Result:
    """One graph's row of the comparison, and its curves."""

    name: str
    graph: str
    parameters: int
    routing_iterations: Optional[str]
    steps: int = 0
    ms_per_step: Optional[float] = None
    final_train_loss: Optional[float] = None
    test_acc: Optional[float] = None
    test_loss: Optional[float] = None
    seconds: float = 0.0
    note: str = ""
    records: tuple = ()
    status: int = 0  # the exit status it asks for: 2 for a capsflow error, 1 for a bug

    def row(self) -> dict:
        """The table's cells as text, keyed by COLUMNS."""
        return {"variant": self.name, "parameters": f"{self.parameters:,}",
                "ms/step": _num(self.ms_per_step, ".0f"),
                "final train loss": _num(self.final_train_loss, ".4f"),
                "test accuracy": "-" if self.test_acc is None else f"{100 * self.test_acc:.2f}%",
                "routing iterations": self.routing_iterations or "-"}


class StepBudget:
    """A BatchIterator that ends after ``steps`` batches in all (cutting the last epoch
    short) and times each training step: the time between handing out a batch and being
    asked for the next is the consumer's forward, backward and update."""

    def __init__(self, batches: Any, steps: int):
        self.batches, self.left = batches, steps
        self.step_seconds: list[float] = []

    def __len__(self) -> int:
        return min(len(self.batches), self.left)

    def __iter__(self) -> Iterator:
        for batch in self.batches:
            if self.left <= 0:
                return
            self.left -= 1
            start = time.perf_counter()
            yield batch
            self.step_seconds.append(time.perf_counter() - start)

    def get_state(self) -> dict:
        return self.batches.get_state()

    def set_state(self, state: dict) -> None:
        self.batches.set_state(state)

    def replace_examples(self, images: Any, labels: Any) -> None:
        self.batches.replace_examples(images, labels)  # a set drawn afresh each epoch


def main(args: argparse.Namespace) -> int:
    if args.merge:
        return merge(args.graphs, check_output_dir(args.out, "--out"))
    graphs = compile_all(args.graphs, args.overrides)
    config = config_from_args(args)
    get_backend(config.options)  # an unusable backend fails before the data is loaded
    out = check_output_dir(args.out, "--out")
    if not args.overwrite:
        check_no_earlier_compare(out, graphs)
    data = load_data(config, download=args.download)
    # Each graph adapts to the data as in capsflow train (its input vars from the dataset).
    from capsflow.lang.yamlio import parse_override
    given = dict(parse_override(o) for o in args.overrides)
    graphs = [fit_graph_to_data(graph, data.info, given) for graph in graphs]
    per_epoch = math.ceil(data.train_images.shape[0] / config.batch_size)
    steps = args.steps if args.steps is not None else per_epoch * (args.num_epochs or 1)
    config.num_epochs = math.ceil(steps / per_epoch)
    config.val_epoch = args.val_epoch or config.num_epochs
    config.disp = args.disp or max(1, steps // CURVE_POINTS)
    config.check()
    out.mkdir(parents=True, exist_ok=True)
    print(f"comparing {len(graphs)} graphs on {config.dataset}: "
          f"{data.train_images.shape[0]} train / {data.test_images.shape[0]} test examples, "
          f"{steps} steps of batch {config.batch_size} ({config.num_epochs} epoch(s)), "
          f"{config.optimizer} {config.describe_lr()}, seed {config.seed}, "
          f"{config.options.backend}; writing to {out}")
    load_before = _load_average()
    jobs = min(args.jobs, len(graphs))
    threads = args.threads_per_job
    if jobs > 1:
        threads = threads or max(1, _cpu_count() // jobs)
    with terminate_as_interrupt():  # a scheduler's stop ends the sweep as Ctrl-C does
        results, interrupted = train_all(graphs, args, data, config, steps, out, jobs, threads)
    description = describe_run(args, config, data, steps)
    if jobs > 1:
        description += (f" The {len(graphs)} graphs were trained {jobs} at a time "
                        f"(--jobs {args.jobs}), each job with {threads} BLAS thread(s): ms/step "
                        f"was measured with {jobs} jobs sharing the machine, so it is higher "
                        f"than alone and compares only within this table.")
    elif threads:
        description += f" BLAS held to {threads} thread(s) (--threads-per-job)."
    if load_before is not None:  # timings on a shared machine need this context
        description += (f" Load average (1 min) of the machine: {load_before:.1f} before the "
                        f"first graph, {_load_average():.1f} after the last.")
    paths = write_outputs(results, out, description)
    print(table_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    if interrupted:
        return 130
    failed = [r.name for r in results if r.status]
    if failed:
        print(f"capsflow compare: error: {len(failed)} of {len(results)} graph(s) failed: "
              f"{', '.join(failed)} (the notes under the table say why)", file=sys.stderr)
    return max((r.status for r in results), default=0)


def check_no_earlier_compare(out: Path, graphs: list) -> None:
    """One line when ``out`` holds an earlier compare's work that this one would replace:
    a graph's metrics or checkpoints (an interrupted graph's last.npz among them)."""
    for graph in graphs:
        folder = out / graph.spec.name
        found = run_files(folder)
        if found:
            raise CapsflowError(f"--out {out} already holds a compare of {graph.spec.name} "
                                f"({folder}: {', '.join(found)}); pass --overwrite to train "
                                f"it again, or choose another --out")


def train_all(graphs: list, args: argparse.Namespace, data: Any, config: Any, steps: int,
              out: Path, jobs: int, threads: Optional[int]) -> tuple:
    """Every graph, one after another or ``jobs`` at a time; -> (results, whether a stop
    ended the sweep)."""
    if jobs > 1:
        given_paths = dict(zip((g.spec.name for g in graphs), args.graphs))
        return train_parallel(graphs, given_paths, args.overrides, data, config, steps, out,
                              jobs, threads, args.keep_checkpoints)
    results = []
    with blas_threads(threads):
        for graph in graphs:
            result = train_guarded(graph, data, config, steps, out / graph.spec.name,
                                   args.progress, args.keep_checkpoints)
            results.append(result)
            if result.note == "interrupted":
                return results, True
    return results, False


def compile_all(paths: list, overrides: list) -> list:
    """Compile every graph with the same overrides; names must tell them apart, and each
    must have class scores (checked here, before any graph trains)."""
    from capsflow.core.graph import compile as compile_graph
    from capsflow.lang.yamlio import parse_override
    values = dict(parse_override(o) for o in overrides)
    graphs, seen = [], {}
    for path in paths:
        graph = compile_graph(path, values)
        class_scores(graph)
        name = graph.spec.name
        if name in seen:
            raise CapsflowError(f"{path} and {seen[name]} are both named '{name}'; give one a "
                                f"different 'name:' so their results can be told apart")
        seen[name] = path
        graphs.append(graph)
    return graphs


def routing_iterations(graph: Any) -> Optional[str]:
    """Iterations of the 'routing' repeat block, or of the only block there is, or of
    each routed layer ('hidden 3, digit 3' for blocks NAME/routing); None without blocks."""
    blocks = graph.spec.blocks
    if "routing" in blocks:
        return str(blocks["routing"])
    if len(blocks) == 1:
        return str(next(iter(blocks.values())))
    if not blocks:
        return None
    return ", ".join(f"{name.removesuffix('/routing')} {count}" for name, count in blocks.items())


def train_guarded(graph: Any, data: Any, config: Any, steps: int, save_dir: Path,
                  progress: bool = False, keep_checkpoints: bool = False) -> Result:
    """train_one, with a capsflow error (one graph's, at run time) as the row's note so
    the other graphs still train; the exit status says it (2)."""
    try:
        return train_one(graph, data, config, steps, save_dir, progress, keep_checkpoints)
    except CapsflowError as exc:
        print(f"[{graph.spec.name}] failed: {exc}")
        return failed_result(graph, f"failed: {exc}", 2)


def failed_result(graph: Any, note: str, status: int) -> Result:
    """The row of a graph that did not finish: its size and routing, and why."""
    return Result(graph.spec.name, str(graph.spec.file), graph.param_count(),
                  routing_iterations(graph), note=note, status=status)


# -- --jobs N: one process per graph -------------------------------------------------------
MAX_THREADS = 4096  # --threads-per-job: more than any machine has is a typo
GRACE_SECONDS = 10.0  # after a stop, how long jobs get to save last.npz before the next step


def train_parallel(graphs: list, paths: dict, overrides: list, data: Any, config: Any,
                   steps: int, out: Path, jobs: int, threads: int,
                   keep_checkpoints: bool) -> tuple:
    """Train every graph in its own 'spawn' process, ``jobs`` at a time; returns (results in
    the order of ``graphs``, whether Ctrl-C stopped them). One line per graph started and
    finished; a process that fails or dies is its graph's note, the others go on."""
    import multiprocessing as mp
    from multiprocessing.connection import wait
    from capsflow.lang.yamlio import parse_override
    ctx = mp.get_context("spawn")
    given = dict(parse_override(o) for o in overrides)
    waiting = list(graphs)
    running: dict = {}  # name -> (graph, process, receiving end, start time)
    done: dict = {}
    interrupted = False
    print(f"training {len(graphs)} graphs {jobs} at a time, {threads} BLAS thread(s) each; "
          f"one line per graph started and finished")
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                graph = waiting.pop(0)
                name = graph.spec.name
                receive, send = ctx.Pipe(duplex=False)
                task = Job(paths[name], list(overrides), given, data, config, steps,
                           out / name, threads, keep_checkpoints, jobs)
                process = ctx.Process(target=_job_main, args=(task, send), daemon=True,
                                      name=f"capsflow-compare-{name}")
                with interrupts_deferred():  # a started job is always one that is stopped
                    process.start()
                    send.close()
                    running[name] = (graph, process, receive, time.perf_counter())
                print(f"[{name}] started (process {process.pid})", flush=True)
            ready = wait([entry[2] for entry in running.values()]
                         + [entry[1].sentinel for entry in running.values()])
            for name in [n for n, e in running.items() if e[2] in ready or e[1].sentinel in ready]:
                done[name] = _collect(running.pop(name))
                _say_finished(done[name])
    except KeyboardInterrupt as stop:
        interrupted = True
        print(f"interrupted: stopping {len(running)} running job(s)", file=sys.stderr, flush=True)
        # A Ctrl-C at the terminal reached the jobs too; a SIGTERM to this process did not.
        for name, result in _stop_all(running, told=not isinstance(stop, Terminated)).items():
            done[name] = result
    return [done[g.spec.name] for g in graphs if g.spec.name in done], interrupted


@dataclass
class Job:
    """What one job process needs: it compiles its graph again (from the file, with the
    same overrides) and trains it on the parent's data."""

    path: str
    overrides: list
    given: dict
    data: Any
    config: Any
    steps: int
    save_dir: Path
    threads: int
    keep_checkpoints: bool
    jobs: int  # at once on this machine: each job's step must fit in 1/jobs of its memory


def _job_main(job: Job, send: Any) -> None:
    """A job process: sends back ("ok", Result), ("error", line, status) or
    ("interrupted",); its own output is whole lines, flushed as they come."""
    sys.stdout.reconfigure(line_buffering=True)
    try:
        with terminate_as_interrupt(), blas_threads(job.threads):
            from capsflow.core.graph import compile as compile_graph
            graph = fit_graph_to_data(compile_graph(job.path, job.given), job.data.info,
                                      job.given)
            result = train_one(graph, job.data, job.config, job.steps, job.save_dir,
                               progress=False, keep_checkpoints=job.keep_checkpoints,
                               jobs=job.jobs)
        message: tuple = ("ok", result)
    except KeyboardInterrupt:
        message = ("interrupted",)
    except CapsflowError as exc:
        message = ("error", f"failed: {exc}", 2)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        message = ("error", f"failed: {exc.strerror or exc}{where}", 2)
    except Exception as exc:  # a bug: one line, as the CLI says it
        from capsflow.cli import bug_report
        message = ("error", bug_report(exc), 1)
    try:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a late stop must not lose the answer
            signal.signal(signum, signal.SIG_IGN)
        send.send(message)
    finally:
        send.close()


def _collect(entry: tuple, stopping: bool = False) -> Result:
    """The Result of a job whose answer came or whose process ended. ``stopping``: the
    job was asked to stop, so a death by SIGINT or SIGTERM (a job still starting, before
    it could answer) is its interruption, not a failure."""
    graph, process, receive, started = entry
    message = None
    try:
        if receive.poll():
            message = receive.recv()
    except (EOFError, OSError):
        pass
    process.join(timeout=30)
    if process.is_alive():
        process.kill()
        process.join()
    receive.close()
    code = process.exitcode
    if message is None and stopping and code in (-signal.SIGINT, -signal.SIGTERM):
        result = failed_result(graph, "interrupted", 0)
    elif message is None:
        why = (f"killed by signal {-code}" if code is not None and code < 0
               else f"exit status {code}")
        result = failed_result(graph, f"failed: its process ended without an answer ({why})", 1)
    elif message[0] == "ok":
        result = message[1]
    elif message[0] == "interrupted":
        result = failed_result(graph, "interrupted", 0)
    else:
        result = failed_result(graph, message[1], message[2])
    if not result.seconds:
        result.seconds = time.perf_counter() - started
    return result


def _say_finished(result: Result) -> None:
    if result.note and result.ms_per_step is None:
        print(f"[{result.name}] {result.note}", flush=True)
        return
    acc = "-" if result.test_acc is None else f"{100 * result.test_acc:.2f}%"
    note = f" ({result.note})" if result.note else ""
    print(f"[{result.name}] finished in {result.seconds:.1f} s: {result.steps} steps, "
          f"{_num(result.ms_per_step, '.0f')} ms/step, final train loss "
          f"{_num(result.final_train_loss, '.4f')}, test accuracy {acc}{note}", flush=True)


def _stop_all(running: dict, told: bool) -> dict:
    """After a stop: each running job saves last.npz and answers. Jobs ``told`` already
    (a Ctrl-C at the terminal reaches them too) get GRACE_SECONDS first; then SIGTERM,
    which a job takes as Ctrl-C, and GRACE_SECONDS more; then they are killed. Another
    Ctrl-C or SIGTERM kills them at once."""
    from multiprocessing.connection import wait
    results = {}
    try:
        for nudge in ((None,) if told else ()) + (signal.SIGTERM,):
            if not running:
                break
            if nudge is not None:
                for _, process, _, _ in running.values():
                    if process.is_alive():
                        os.kill(process.pid, nudge)
            deadline = time.monotonic() + GRACE_SECONDS
            while running and time.monotonic() < deadline:
                ready = wait([e[2] for e in running.values()]
                             + [e[1].sentinel for e in running.values()],
                             timeout=max(0.0, deadline - time.monotonic()))
                for name in [n for n, e in running.items()
                             if e[2] in ready or e[1].sentinel in ready]:
                    results[name] = _collect(running.pop(name), stopping=True)
    except KeyboardInterrupt:
        pass
    for name, (graph, process, receive, started) in running.items():
        process.kill()
        process.join()
        receive.close()
        results[name] = failed_result(graph, "interrupted", 0)
    return results


def train_one(graph: Any, data: Any, config: Any, steps: int, save_dir: Path,
              progress: bool = False, keep_checkpoints: bool = False,
              jobs: int = 1) -> Result:
    """Train ``graph`` for ``steps`` steps and read its numbers back from metrics.jsonl;
    ``jobs``: how many graphs train at once on this machine (each checks its step against
    its share of the memory)."""
    name = graph.spec.name
    result = Result(name, str(graph.spec.file), graph.param_count(), routing_iterations(graph))
    trainer = Trainer(graph, data, config, save_dir, log=lambda line: print(f"[{name}] {line}"),
                      progress_bar=progress, processes_here=jobs)
    budget = StepBudget(trainer.batches, steps)
    trainer.batches = budget
    started = time.perf_counter()
    try:
        trainer.fit()
    except TrainingDiverged as exc:
        result.note = f"diverged: {exc}"
        print(f"[{name}] {exc}")
    result.seconds = time.perf_counter() - started
    if trainer.stopped_early:
        result.note = "interrupted"
    if not keep_checkpoints and not trainer.stopped_early:  # an interrupted run may resume
        for path in (trainer.last_path, trainer.best_path):
            path.unlink(missing_ok=True)
    records = read_metrics(trainer.metrics_path) if trainer.metrics_path.is_file() else []
    result.records = tuple(records)
    result.steps = trainer.state.iteration
    if budget.step_seconds:
        result.ms_per_step = 1000 * float(np.median(budget.step_seconds))
    result.final_train_loss = final_train_loss(records, result.steps)
    tested = [r for r in records if r.get("kind") == "epoch" and r.get("test_acc") is not None]
    if tested:
        result.test_acc, result.test_loss = tested[-1]["test_acc"], tested[-1]["test_loss"]
    return result


def final_train_loss(records: list, steps: int) -> Optional[float]:
    """Mean of the running train loss over the last 10% of the steps (at least the last
    --disp window): the end of the curve, less noisy than one batch."""
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return None
    tail = [r for r in train if r["iteration"] > steps - steps // 10] or train[-1:]
    return float(np.mean([r["loss"] for r in tail]))


# -- --merge: tables of several runs as one ----------------------------------------------
def merge(folders: list, out: Path) -> int:
    """One compare.md/.csv/.png in ``out`` of the graphs in ``folders`` (each written by
    capsflow compare: its compare.csv, compare.md and one metrics.jsonl per graph)."""
    results, commands, seen = [], [], {}
    for folder in map(Path, folders):
        table = folder / "compare.csv"
        if not table.is_file():
            raise CapsflowError(f"{folder} has no compare.csv; --merge takes folders written "
                                f"by capsflow compare")
        try:
            with table.open(newline="") as f:
                rows = list(csv.DictReader(f))
        except (csv.Error, ValueError) as exc:  # ValueError: not UTF-8
            raise CapsflowError(f"{table}: not a table written by capsflow compare "
                                f"({exc})") from None
        md = folder / "compare.md"
        command = next((line for line in (md.read_text().splitlines() if md.is_file() else [])
                        if line.startswith("Command: ")), f"Command: (no compare.md in {folder})")
        commands.append(f"- {folder}: {command.removeprefix('Command: ')}")
        for line, row in enumerate(rows, 2):  # line 1 is the header
            try:
                name = row["variant"]
                if not NAME_PATTERN.fullmatch(name or ""):  # it names a folder below
                    raise ValueError(f"variant {name!r:.60} is not a graph name")
                if name in seen:
                    raise CapsflowError(f"graph '{name}' is in both {seen[name]} and "
                                        f"{folder}; merge runs of different graphs")
                seen[name] = folder
                metrics = folder / name / METRICS_FILE
                results.append(Result(
                    name, row["graph"], int(row["parameters"]),
                    row["routing_iterations"] or None,
                    steps=int(row["steps"]), ms_per_step=_float(row["ms_per_step"]),
                    final_train_loss=_float(row["final_train_loss"]),
                    test_acc=_float(row["test_acc"]), test_loss=_float(row["test_loss"]),
                    seconds=float(row["seconds"] or 0), note=row["note"],
                    records=tuple(read_metrics(metrics)) if metrics.is_file() else ()))
            except KeyError as exc:
                raise CapsflowError(f"{table}: no column {exc}; not a table written by "
                                    f"capsflow compare") from None
            except (TypeError, ValueError) as exc:
                raise CapsflowError(f"{table}:{line}: not a row written by capsflow compare "
                                    f"({str(exc)[:120]})") from None
    out.mkdir(parents=True, exist_ok=True)
    description = ("Merged from these runs of capsflow compare (compare the settings: the "
                   "merge does not check them; ms/step compares only between runs on the "
                   "same kind of machine and load):\n\n" + "\n".join(commands))
    paths = write_outputs(results, out, description)
    print(table_markdown(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return 0


def _float(text: str) -> Optional[float]:
    return float(text) if text else None


# -- outputs ----------------------------------------------------------------------------
def command_line(args: argparse.Namespace, options: Options) -> str:
    """The command that reproduces this comparison (the flags that were given)."""
    words = ["capsflow", "compare", *args.graphs]
    for override in args.overrides:
        words += ["--set", override]
    for flag, dest in (("--steps", "steps"), ("--num_epochs", "num_epochs"), ("--bs", "bs"),
                       ("--lr", "lr"), ("--opt", "opt"), ("--lr-schedule", "lr_schedule"),
                       ("--lr-decay", "lr_decay"), ("--decay-steps", "decay_steps"),
                       ("--min-lr", "min_lr"),
                       ("--val_epoch", "val_epoch"), ("--disp", "disp"), ("--seed", "seed"),
                       ("--shift", "shift"), ("--dataset", "dataset"),
                       ("--data-dir", "data_dir"), ("--emnist-split", "emnist_split"),
                       ("--image-size", "image_size"), ("--crop", "crop"),
                       ("--channels", "channels"), ("--multimnist-count", "multimnist_count"),
                       ("--limit-train", "limit_train"), ("--limit-test", "limit_test"),
                       ("--out", "out")):
        value = getattr(args, dest, None)
        if isinstance(value, (list, tuple)):  # --image-size and --crop: HxW
            value = "x".join(str(v) for v in value)
        if value is not None:
            words += [flag, str(value)]
    for flag, dest in (("--flip", "flip"), ("--multimnist-fresh", "multimnist_fresh")):
        if getattr(args, dest, None):
            words.append(flag)
    words += option_arguments(options)
    if getattr(args, "jobs", 1) > 1:
        words += ["--jobs", str(args.jobs)]
    if getattr(args, "threads_per_job", None):
        words += ["--threads-per-job", str(args.threads_per_job)]
    if args.keep_checkpoints:
        words.append("--keep-checkpoints")
    return " ".join(shlex.quote(w) for w in words)


def describe_run(args: argparse.Namespace, config: Any, data: Any, steps: int) -> str:
    return (f"Command: `{command_line(args, config.options)}`\n\n"
            f"{config.dataset}: {data.train_images.shape[0]} training examples, "
            f"{data.test_images.shape[0]} test examples; {steps} steps of batch "
            f"{config.batch_size} ({config.num_epochs} epoch(s)), {config.optimizer} "
            f"{config.describe_lr()}, {config.describe_augmentation()}, seed {config.seed}, "
            f"{config.options.backend} {config.dtype} on {platform.machine()} "
            f"({_cpu_count()} CPUs). ms/step is the median time of one training step "
            f"(forward, backward, update); final train loss the mean running train loss "
            f"over the last 10% of the steps.")


def table_markdown(results: list) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if c == "variant" else "---:" for c in COLUMNS) + "|"]
    for r in results:
        cells = r.row()
        lines.append("| " + " | ".join(cells[c] for c in COLUMNS) + " |")
    notes = [f"- {r.name}: {r.note}" for r in results if r.note]
    return "\n".join(lines + ([""] + notes if notes else []))


def write_outputs(results: list, out: Path, description: str) -> list:
    """compare.md, compare.csv and compare.png under ``out``; returns their paths."""
    md, table_csv, png = out / "compare.md", out / "compare.csv", out / "compare.png"
    md.write_text(f"# Comparison\n\n{description}\n\n{table_markdown(results)}\n\n"
                  f"![loss and accuracy curves]({png.name})\n")
    with table_csv.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["variant", "graph", "parameters", "ms_per_step", "final_train_loss",
                         "test_acc", "test_loss", "routing_iterations", "steps", "seconds",
                         "note"])
        for r in results:
            writer.writerow([r.name, r.graph, r.parameters, _raw(r.ms_per_step),
                             _raw(r.final_train_loss), _raw(r.test_acc), _raw(r.test_loss),
                             _raw(r.routing_iterations), r.steps, f"{r.seconds:.1f}", r.note])
    curves_figure(results, png)
    return [md, table_csv, png]


def curves_figure(results: list, path: Path) -> Path:
    """Training loss (left, log scale) and accuracy (right) against steps for every graph:
    lines are the running train values per --disp window, markers the test evaluations."""
    import matplotlib  # lazy: only drawing needs it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.get_cmap("tab10")
    for k, r in enumerate(results):
        color = colors(k % 10)
        train = [x for x in r.records if x.get("kind") == "train"]
        tested = [x for x in r.records
                  if x.get("kind") == "epoch" and x.get("test_acc") is not None]
        steps = [x["iteration"] for x in train]
        ax_loss.plot(steps, [x["loss"] for x in train], color=color, lw=1.2, label=r.name)
        ax_acc.plot(steps, [100 * x["acc"] for x in train], color=color, lw=1.2, label=r.name)
        if tested:
            ax_acc.plot([x["iteration"] for x in tested], [100 * x["test_acc"] for x in tested],
                        "o", color=color, ms=6, markeredgecolor="black")
    ax_loss.set(xlabel="training step", ylabel="train loss (running mean)", yscale="log",
                title="training loss")
    ax_acc.set(xlabel="training step", ylabel="accuracy (%)",
               title="train accuracy (lines), test accuracy (dots)")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    save_figure(fig, path, dpi=120)
    plt.close(fig)
    return path


def _num(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _raw(value: Any) -> str:
    return "" if value is None else str(value)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def _load_average() -> Optional[float]:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None
