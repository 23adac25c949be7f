"""``capsflow bench``: time a training step of capsflow against the PyTorch reference.

A training step is forward + backward + Adam update, float32, on one random batch,
starting from the same weights in both frameworks. Each framework runs in its own
process (runners/bench_worker.py), so each one's peak memory is its own; the parent
drives them in lockstep, one step of each in turn (alternating which goes first), so
both see the same background load. It prints the median and minimum time per step,
the peak RSS of a step above the RSS before it (Linux VmHWM, reset before the step),
capsflow's own live-array peak, and the capsflow/PyTorch ratios. The CPU time of
a step (all threads of the worker, median) tells how much work a step is where
other jobs share the cores and stretch the wall-clock times. ``--profile`` adds
capsflow's per-op time and bytes, forward and VJP apart.

    capsflow bench graphs/capsnet.yaml --backend numpy --bs 100

``--epoch`` instead trains whole epochs on the real data, test evaluation included,
through the trainer's own loop (runners/training.py), and tells where the time goes:
the host's seconds in drawing batches, in queuing (or running) the steps, in waiting
for each step's loss (read one step late), in evaluation and at the epoch's end, and
on CuPy the device's time in the steps and in evaluation, from events on its stream
(docs/benchmarks.md, "One epoch on a GPU"):

    capsflow bench graphs/capsnet.yaml --epoch --backend cupy --data-dir DIR --epochs 2
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

from capsflow.backends import get_backend
from capsflow.cli import (add_graph_arguments, check_output_file, compile_from_args,
                          non_negative_int, positive_float, positive_int)
from capsflow.errors import CapsflowError
from capsflow.options import SWITCHES, Options, add_option_arguments, options_from_args
from capsflow.runners.bench_worker import PREFIX, blas_info

MB = 2 ** 20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_graph_arguments(parser)
    parser.add_argument("--bs", type=positive_int, default=100, help="batch size (100)")
    parser.add_argument("--repeats", type=positive_int, default=5,
                        help="timed steps per framework (5); the median and min are reported")
    parser.add_argument("--warmup", type=positive_int, default=2,
                        help="untimed steps before timing (2, at least 1)")
    # capsflow's options; PyTorch runs on 'cuda' with --backend cupy, at the same --precision.
    add_option_arguments(parser)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch reference")
    parser.add_argument("--profile", action="store_true",
                        help="also print capsflow's per-op time and bytes (forward and VJP)")
    parser.add_argument("--top", type=positive_int, default=12,
                        help="nodes listed in the per-node profile (12)")
    parser.add_argument("--seed", type=non_negative_int, default=0,
                        help="weights and batch seed (0)")
    parser.add_argument("--lr", type=positive_float, default=1e-3,
                        help="Adam learning rate (1e-3)")
    parser.add_argument("--json", metavar="FILE", help="also write the figures to FILE as JSON")
    epoch = parser.add_argument_group("whole epochs (--epoch)")
    epoch.add_argument("--epoch", action="store_true",
                       help="instead: train whole epochs on the data (MNIST), test evaluation "
                            "included, through the trainer, and split their time between "
                            "host phases and the device")
    epoch.add_argument("--epochs", type=positive_int, default=1,
                       help="epochs to train with --epoch (1); the first one also compiles "
                            "and records the steps")
    epoch.add_argument("--data-dir", metavar="DIR", help="where the dataset lies (--epoch)")
    epoch.add_argument("--limit-train", type=positive_int, metavar="N",
                       help="first N training images only (--epoch)")
    epoch.add_argument("--limit-test", type=positive_int, metavar="N",
                       help="first N test images only (--epoch)")
    parser.add_argument("--nproc", type=positive_int, metavar="N",
                        help="instead: time capsflow's data-parallel step on N ranks of this "
                             "machine against one process, on the same global --bs, and "
                             "report the scaling efficiency (docs/distributed.md)")


# -- workers ---------------------------------------------------------------------------
@dataclass
class Worker:
    """A framework's worker process and what it reported."""
    name: str
    proc: subprocess.Popen
    info: str = ""
    first_loss: float = float("nan")
    seconds: list = field(default_factory=list)
    cpu: list = field(default_factory=list)
    memory: dict = field(default_factory=dict)

    @classmethod
    def start(cls, name: str, cfg: dict) -> "Worker":
        cmd = [sys.executable, "-m", "capsflow.runners.bench_worker",
               json.dumps(dict(cfg, framework=name))]
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        return cls(name, proc)

    def receive(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                msg = json.loads(line[len(PREFIX):])
                if "error" in msg:
                    self.stop()
                    raise CapsflowError(f"the {self.name} worker failed: {msg['error']}")
                return msg
        self.proc.wait()
        raise CapsflowError(f"the {self.name} worker exited (status {self.proc.returncode}) "
                            "before answering; see its messages above")

    def ask(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.receive()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.close()
            except (BrokenPipeError, ValueError):
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _check_reference(graph) -> None:
    """One clear line when the PyTorch reference cannot run this graph."""
    if importlib.util.find_spec("torch") is None:
        raise CapsflowError("the PyTorch reference needs torch (pip install 'capsflow[dev]'); "
                            "pass --no-torch to time capsflow alone")
    from capsflow.runners.torch_ref import PARAM_SHAPES
    shapes = {n: p.shape for n, p in graph.spec.params.items()}
    routing = graph.spec.vars.get("routing", "paper")
    if shapes != PARAM_SHAPES or routing != "paper" or set(graph.spec.inputs) != {"x", "y"}:
        raise CapsflowError(f"the PyTorch reference mirrors graphs/capsnet.yaml with the paper's "
                            f"routing only; {graph.spec.file} differs, pass --no-torch")


def run_bench(args: argparse.Namespace) -> dict:
    """Start the workers, time them in lockstep, and return every figure."""
    graph = compile_from_args(args)
    options = options_from_args(args)
    get_backend(options)  # one clear line when CuPy or a GPU is missing
    names = ["capsflow"] if args.no_torch else ["capsflow", "pytorch"]
    if not args.no_torch:
        _check_reference(graph)
    from capsflow.runners.step_memory import check_step_fits
    check_step_fits(graph, options, args.bs, "float32")  # the worker's step needs 'loss' alone
    cfg = {"graph": str(args.graph), "overrides": list(args.overrides), "bs": args.bs,
           "warmup": args.warmup, "seed": args.seed, "lr": args.lr, "options": asdict(options)}
    workers = []
    try:
        for name in names:
            workers.append(Worker.start(name, cfg))
        for w in workers:  # set-up and warm-up run in parallel; timing waits for both
            ready = w.receive()
            w.info, w.first_loss = ready["info"], ready["first_loss"]
        bar = _progress(args.repeats * len(workers))
        for r in range(args.repeats):
            for w in (workers if r % 2 == 0 else workers[::-1]):
                timing = w.ask("step")
                w.seconds.append(timing["seconds"])
                w.cpu.append(timing["cpu"])
                bar.update()
        bar.close()
        for w in workers:
            w.memory = w.ask("memory")
        profile = workers[0].ask(f"profile {args.repeats}") if args.profile else None
    finally:
        for w in workers:
            w.stop()
    return _figures(args, options, graph, workers, profile)


def _progress(total: int):
    """A progress bar on a terminal; nothing where stderr is a log file (a bar's
    carriage-return updates would fill it)."""
    class _Silent:
        def update(self, n: int = 1) -> None: ...
        def close(self) -> None: ...
    if not sys.stderr.isatty():
        return _Silent()
    try:
        from tqdm import tqdm
    except ImportError:
        return _Silent()
    return tqdm(total=total, desc="bench steps", leave=False, file=sys.stderr)


def _figures(args, options: Options, graph, workers: list, profile: dict | None) -> dict:
    rows = {}
    for w in workers:
        rows[w.name] = {"info": w.info, "first_loss": w.first_loss, "seconds": w.seconds,
                        "median": statistics.median(w.seconds), "min": min(w.seconds),
                        "cpu_median": statistics.median(w.cpu), **w.memory}
    out = {"graph": str(graph.spec.file), "bs": args.bs, "repeats": args.repeats,
           "warmup": args.warmup, "options": asdict(options), "machine": machine(),
           "frameworks": rows, "profile": profile}
    if "pytorch" in rows:
        cf, pt = rows["capsflow"], rows["pytorch"]
        out["ratio_median"] = cf["median"] / pt["median"]
        out["ratio_min"] = cf["min"] / pt["min"]
        key = "device_peak" if options.backend == "cupy" else "rss_peak"
        if cf.get(key) and pt.get(key):
            out["ratio_memory"] = cf[key] / pt[key]
    return out


def machine() -> str:
    """'AMD EPYC, 2 CPUs, Linux 6.1' — what the figures were measured on."""
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                         model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


# -- report ----------------------------------------------------------------------------
def _mb(value) -> str:
    return "-" if value is None else f"{value / MB:.0f}"


def report(fig: dict, top: int) -> str:
    options = fig["options"]
    switched_off = "".join(f", {flag}" for name, (flag, _) in SWITCHES.items()
                           if not options[name])
    lines = [f"capsflow bench: {fig['graph']}, batch {fig['bs']}, float32, "
             f"backend {options['backend']} {options['precision']}{switched_off}, "
             f"{fig['repeats']} timed steps after {fig['warmup']} warm-up",
             f"machine: {fig['machine']}"]
    for name, row in fig["frameworks"].items():
        lines.append(f"{name}: {row['info']}; loss at step 1 {row['first_loss']:.6f}")
        if not math.isfinite(row["first_loss"]):
            lines.append(f"note: {name}'s loss is {row['first_loss']}: the times stand, "
                         "but this graph's numbers are not finite (capsflow gradcheck and "
                         "render --grad-norms show where)")
    blas_env = [k for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ]
    if blas_env:
        lines.append(f"note: {' and '.join(blas_env)} set: OpenBLAS may not pick its "
                     "fastest kernel")
    device = options["backend"] == "cupy"
    # A GPU step takes milliseconds: seconds to three places would print 0.004.
    unit, scale, places = ("ms", 1e3, 2) if device else ("s", 1.0, 3)
    header = (f"{'framework':<10} {f'median {unit}/step':>14} {f'min {unit}/step':>11} "
              f"{f'CPU {unit}/step':>11} {'step peak RSS MB':>17} {'live peak MB':>13}"
              + (f" {'device peak MB':>15}" if device else ""))
    lines += ["", header]
    for name, row in fig["frameworks"].items():
        lines.append(f"{name:<10} {scale * row['median']:>14.{places}f} "
                     f"{scale * row['min']:>11.{places}f} {scale * row['cpu_median']:>11.{places}f} "
                     f"{_mb(row.get('rss_peak')):>17} {_mb(row.get('live_peak')):>13}"
                     + (f" {_mb(row.get('device_peak')):>15}" if device else ""))
    if "ratio_median" in fig:
        memory = fig.get("ratio_memory")
        lines.append(f"ratio capsflow/pytorch: {fig['ratio_median']:.2f} (median), "
                     f"{fig['ratio_min']:.2f} (min); peak memory "
                     + ("-" if memory is None else f"{memory:.2f}"))
    if fig["profile"]:
        from capsflow.core.profile import format_table
        lines += ["", format_table(fig["profile"]["by_op"], title="capsflow per op (per step):"),
                  "", format_table(fig["profile"]["by_node"], limit=top,
                                   title=f"capsflow slowest {top} nodes (per step):")]
    return "\n".join(lines)


def run_scaling(args: argparse.Namespace) -> dict:
    """One process, then ``args.nproc`` ranks (runners/distributed.py), each timing the
    trainer's step on the same random global batch; the figures and the efficiency."""
    import tempfile
    from capsflow.runners.distributed import launch
    from capsflow.runners.signals import terminate_as_interrupt
    graph = compile_from_args(args)
    options = options_from_args(args)
    get_backend(options)
    if args.bs % args.nproc:
        raise CapsflowError(f"--bs {args.bs} is the global batch and must be divisible by "
                            f"--nproc {args.nproc}")
    from capsflow.runners.step_memory import check_step_fits
    # The one-process run takes the whole batch (the ranks, a share each, about as much).
    check_step_fits(graph, options, args.bs, "float32")
    cfg = {"graph": str(args.graph), "overrides": list(args.overrides), "bs": args.bs,
           "warmup": args.warmup, "repeats": args.repeats, "seed": args.seed, "lr": args.lr,
           "options": asdict(options)}
    runs = {}
    with tempfile.TemporaryDirectory(prefix="capsflow-bench-") as tmp:
        cfg_path = os.path.join(tmp, "cfg.json")
        with open(cfg_path, "w") as f:
            json.dump(cfg, f)
        # A scheduler's stop (SIGTERM) ends the timing runs as Ctrl-C does.
        with terminate_as_interrupt():
            for ranks in (1, args.nproc):
                out = os.path.join(tmp, f"ranks{ranks}.json")
                if ranks == 1:
                    env = {k: v for k, v in os.environ.items()
                           if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
                    status = subprocess.run([sys.executable, "-m", "capsflow.runners.distributed",
                                             cfg_path, out], env=env).returncode
                else:
                    status = launch([cfg_path, out], ranks, module="capsflow.runners.distributed")
                    if status == 130:  # stopped (Ctrl-C, SIGTERM): not a failure of the run
                        raise KeyboardInterrupt
                if status != 0 or not os.path.isfile(out):
                    raise CapsflowError(f"the {ranks}-rank timing run failed (status {status})")
                with open(out) as f:
                    runs[ranks] = json.load(f)
    one = statistics.median(runs[1]["seconds"])
    many = statistics.median(runs[args.nproc]["seconds"])
    return {"graph": str(graph.spec.file), "bs": args.bs, "repeats": args.repeats,
            "warmup": args.warmup, "options": asdict(options), "machine": machine(),
            "nproc": args.nproc, "median_1": one, "median_n": many,
            "reduce_median_n": statistics.median(runs[args.nproc]["reduce"]),
            "speedup": one / many, "efficiency": one / many / args.nproc, "runs": runs}


def report_scaling(fig: dict) -> str:
    n = fig["nproc"]
    return "\n".join([
        f"capsflow bench --nproc {n}: {fig['graph']}, global batch {fig['bs']} "
        f"({fig['bs'] // n} per rank), backend {fig['options']['backend']}, "
        f"{fig['repeats']} timed steps after {fig['warmup']} warm-up",
        f"machine: {fig['machine']}",
        f"1 process:  median {1e3 * fig['median_1']:.1f} ms/step",
        f"{n} ranks:    median {1e3 * fig['median_n']:.1f} ms/step "
        f"(all-reduce {1e3 * fig['reduce_median_n']:.1f} ms)",
        f"speed-up {fig['speedup']:.2f}, scaling efficiency {100 * fig['efficiency']:.0f}% "
        f"(speed-up / {n})"])


# -- whole epochs ------------------------------------------------------------------------
#: The trainer's host phases (runners/training.PhaseClock), in the report's order.
PHASES = ("batches", "steps", "reads", "evaluation", "epoch_end")


def _epoch_clock(be):
    """A PhaseClock that also closes each epoch's figures when the epoch ends, and on
    CuPy records an event on the stream at the start and end of every step's and every
    evaluation's work: the time between the two is what the device spent on it."""
    from capsflow.runners.training import PhaseClock
    timed_on_device = ("steps", "evaluation") if be.name == "cupy" else ()

    class EpochClock(PhaseClock):
        def __init__(self) -> None:
            super().__init__()
            self.epochs: list = []
            self._events: list = []
            self._closed: dict = {}
            self.started = time.perf_counter()

        def enter(self, name: str) -> None:
            if name in timed_on_device:
                self._events.append((name, be.xp.cuda.get_current_stream().record()))

        def leave(self, name: str) -> None:
            if name in timed_on_device:
                self._events.append((name, be.xp.cuda.get_current_stream().record()))
            elif name == "epoch_end":
                self._close_epoch()

        def _close_epoch(self) -> None:
            be.synchronize()
            now = time.perf_counter()
            host = {k: v - self._closed.get(k, 0.0) for k, v in self.seconds.items()}
            self._closed = dict(self.seconds)
            device: dict = {}
            for (name, start), (_, end) in zip(self._events[::2], self._events[1::2]):
                device[name] = device.get(name, 0.0) + be.xp.cuda.get_elapsed_time(start, end) / 1e3
            self._events = []
            self.epochs.append({"wall": now - self.started, "host": host,
                                "device": device if timed_on_device else None})
            self.started = now

    return EpochClock()


def run_epoch(args: argparse.Namespace) -> dict:
    """Train ``args.epochs`` epochs in a temporary folder, as ``capsflow train`` would,
    and return each epoch's wall time and its split."""
    import tempfile
    from capsflow.lang.yamlio import parse_override
    from capsflow.runners.training import TrainConfig, Trainer, fit_graph_to_data, load_data
    graph = compile_from_args(args)
    options = options_from_args(args)
    be = get_backend(options)
    config = TrainConfig(batch_size=args.bs, lr=args.lr, num_epochs=args.epochs, seed=args.seed,
                         data_dir=args.data_dir, limit_train=args.limit_train,
                         limit_test=args.limit_test, options=options)
    data = load_data(config)
    given = dict(parse_override(o) for o in args.overrides)
    graph = fit_graph_to_data(graph, data.info, given)
    with tempfile.TemporaryDirectory(prefix="capsflow-bench-epoch-") as tmp:
        trainer = Trainer(graph, data, config, tmp, log=lambda line: None, progress_bar=False)
        trainer.clock = _epoch_clock(be)  # its wall clock starts now, with the training
        from capsflow.runners.signals import terminate_as_interrupt
        with terminate_as_interrupt():  # SIGTERM stops it as Ctrl-C does
            records = trainer.fit()
    info = (f"CuPy {be.xp.__version__}" if be.name == "cupy" else
            f"NumPy {be.xp.__version__}, BLAS {blas_info()}")
    return {"graph": str(graph.spec.file), "bs": args.bs, "options": asdict(options),
            "machine": machine(), "info": info, "dataset": config.dataset,
            "train_images": int(data.train_images.shape[0]),
            "test_images": int(data.test_images.shape[0]),
            "steps_per_epoch": len(trainer.batches), "step_mode": trainer.train_step.mode,
            "epochs_asked": config.num_epochs, "interrupted": trainer.stopped_early,
            "evaluation_mode": trainer._forward.mode if trainer._forward else "eager",
            "epochs": [dict(split, train_loss=r["train_loss"], test_acc=r["test_acc"])
                       for split, r in zip(trainer.clock.epochs, records)]}


def report_epoch(fig: dict) -> str:
    options = fig["options"]
    switched_off = "".join(f", {flag}" for name, (flag, _) in SWITCHES.items()
                           if not options[name])
    device = options["backend"] == "cupy"
    lines = [f"capsflow bench --epoch: {fig['graph']}, {fig['dataset']} ({fig['train_images']} "
             f"training, {fig['test_images']} test images), batch {fig['bs']}, "
             f"{fig['steps_per_epoch']} steps per epoch, backend {options['backend']} "
             f"{options['precision']}{switched_off}",
             f"machine: {fig['machine']}; {fig['info']}",
             f"steps: {fig['step_mode']}, evaluation: {fig['evaluation_mode']}"]
    blas_env = [k for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if k in os.environ]
    if blas_env and not device:
        lines.append(f"note: {' and '.join(blas_env)} set: OpenBLAS may not pick its "
                     "fastest kernel")
    columns = ["wall", *PHASES, "other"]
    header = f"{'epoch':<6}" + "".join(f"{c + ' s':>14}" for c in columns)
    if device:
        header += f"{'device steps s':>16}{'device eval s':>15}"
    lines += ["", "seconds: wall, then the host's per phase (docs/benchmarks.md, \"One epoch "
                  "on a GPU\")" + ("; the device's from events on the stream" if device else ""),
              header]
    for k, epoch in enumerate(fig["epochs"], 1):
        host = epoch["host"]
        other = epoch["wall"] - sum(host.get(p, 0.0) for p in PHASES)
        row = f"{k:<6}" + "".join(f"{v:>14.3f}" for v in
                                  [epoch["wall"], *(host.get(p, 0.0) for p in PHASES), other])
        if device:
            row += (f"{epoch['device'].get('steps', 0.0):>16.3f}"
                    f"{epoch['device'].get('evaluation', 0.0):>15.3f}")
        lines.append(row)
    for k, epoch in enumerate(fig["epochs"], 1):
        acc = "-" if epoch["test_acc"] is None else f"{100 * epoch['test_acc']:.2f}%"
        lines.append(f"epoch {k}: train loss {epoch['train_loss']:.4f}, test accuracy {acc}")
    if fig.get("interrupted"):
        lines.append(f"interrupted: {len(fig['epochs'])} of the {fig['epochs_asked']} epochs "
                     f"asked for ended, and only they are shown")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.json:
        check_output_file(args.json, "--json")  # before the minutes of timing, not after
    if args.epoch:
        fig = run_epoch(args)
        print(report_epoch(fig))
        if fig["interrupted"]:  # Ctrl-C or SIGTERM: the figures so far, and the status
            _write_json(args.json, fig)
            return 130
    elif args.nproc and args.nproc > 1:
        fig = run_scaling(args)
        print(report_scaling(fig))
    else:
        fig = run_bench(args)
        print(report(fig, args.top))
    _write_json(args.json, fig)
    return 0


def _write_json(path: Optional[str], fig: dict) -> None:
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump(fig, f, indent=1)
    except OSError as exc:
        raise CapsflowError(f"cannot write {path}: {exc.strerror}") from None
