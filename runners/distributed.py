"""Data-parallel training over torch.distributed: the communication layer only.

capsflow computes every gradient with its own engine; torch.distributed moves numbers
between processes (docs/distributed.md):

* ``World.from_env()`` reads the launcher's interface, the variables torchrun sets
  (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), and joins the process group:
  gloo for the NumPy backend, NCCL for CuPy, with a timeout so that no collective
  waits forever (a rank that dies makes the others fail with one line).
* ``launch(argv, nproc)`` is ``capsflow train --nproc N``: it starts N copies of the
  command on this machine with those variables set, watches them, stops the others
  when one fails, and passes a stop (Ctrl-C, SIGTERM) on to every rank.
* ``GradientReducer`` packs a rank's gradients (weighted by its share of the global
  batch), two running sums and its stop request into one flat buffer, shared with torch
  without a copy (``torch.from_numpy``; CuPy through DLPack), and all-reduces it:
  afterwards every rank holds the gradient of the mean loss over the whole global batch,
  and knows whether any rank was asked to stop.

* ``time_steps`` is ``capsflow bench --nproc N``'s worker (``python -m
  capsflow.runners.distributed CFG OUT``): the step timed on one process and on N ranks.

torch is imported lazily: a run without these variables never imports it.
"""
from __future__ import annotations

import datetime
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial
from typing import Any, NamedTuple, Optional

import numpy as np

from capsflow.cli import EXIT_USER_ERROR
from capsflow.errors import CapsflowError
from capsflow.runners.signals import interrupts_deferred, stops_dropped, terminate_as_interrupt

#: The launcher's variables (torchrun sets them; ``--nproc`` sets them for its children).
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DEFAULT_TIMEOUT = 300.0  # seconds a collective may wait for the other ranks
# Seconds the ranks get to finish their step and save it after a stop (as SLURM's
# KillWait and torchrun give their processes: 30 s), before they are killed.
STOP_GRACE = 30.0


class DistributedError(CapsflowError):
    """A bad launch environment, or a collective that failed (another rank stopped)."""


def share(n: int, rank: int, world_size: int) -> slice:
    """The contiguous part of ``n`` examples that ``rank`` takes (np.array_split's
    sizes: the first ``n % world_size`` ranks take one more)."""
    base, extra = divmod(n, world_size)
    lo = rank * base + min(rank, extra)
    return slice(lo, lo + base + (1 if rank < extra else 0))


def env_config(environ: Optional[dict] = None) -> Optional[dict]:
    """The launcher's settings from the environment, or None when WORLD_SIZE is not set
    (a plain single-process run). Anything missing or malformed is one line."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return None
    missing = [v for v in ENV_VARS if v != "LOCAL_RANK" and not env.get(v)]
    if missing:
        raise DistributedError(
            f"WORLD_SIZE is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
            f"empty or not set: launch with torchrun (or capsflow train --nproc N), which "
            f"sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; or unset WORLD_SIZE")
    values = {}
    # LOCAL_WORLD_SIZE (the ranks on this machine, which share its memory): torchrun and
    # --nproc set it; another launcher may not (then each rank counts as alone).
    defaults = {"LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_PORT"):
        text = env.get(name, defaults.get(name, ""))
        try:
            values[name] = int(text)
        except ValueError:
            raise DistributedError(f"{name}={text!r} is not a whole number") from None
    if values["WORLD_SIZE"] < 1 or not 0 <= values["RANK"] < values["WORLD_SIZE"]:
        raise DistributedError(f"RANK={values['RANK']} does not lie in 0..WORLD_SIZE-1 "
                               f"(WORLD_SIZE={values['WORLD_SIZE']})")
    if not 1 <= values["LOCAL_WORLD_SIZE"] <= values["WORLD_SIZE"]:
        raise DistributedError(f"LOCAL_WORLD_SIZE={values['LOCAL_WORLD_SIZE']} does not lie "
                               f"in 1..WORLD_SIZE (WORLD_SIZE={values['WORLD_SIZE']})")
    if not 0 < values["MASTER_PORT"] < 65536:
        raise DistributedError(f"MASTER_PORT={values['MASTER_PORT']} is not a port number")
    return {"rank": values["RANK"], "world_size": values["WORLD_SIZE"],
            "local_rank": values["LOCAL_RANK"],
            "local_world_size": values["LOCAL_WORLD_SIZE"], "addr": env["MASTER_ADDR"],
            "port": values["MASTER_PORT"]}


def comm_backend(array_backend: str) -> str:
    """torch.distributed's backend for capsflow's array backend: NCCL for CuPy arrays on
    GPUs, gloo for NumPy arrays on CPUs."""
    return "nccl" if array_backend == "cupy" else "gloo"


@dataclass
class World:
    """This process's place in the job, and the collectives training needs."""

    rank: int
    world_size: int
    local_rank: int
    backend: str                   # "gloo" or "nccl"
    timeout: float                 # seconds
    local_world_size: int = 1      # ranks on this machine (they share its memory)

    @property
    def is_main(self) -> bool:
        """Rank 0 prints progress and writes metrics and checkpoints."""
        return self.rank == 0

    @classmethod
    def from_env(cls, array_backend: str = "numpy",
                 timeout: float = DEFAULT_TIMEOUT) -> Optional["World"]:
        """Join the process group the environment describes (None without WORLD_SIZE).
        Waits at most ``timeout`` seconds for the other ranks."""
        env = env_config()
        if env is None:
            return None
        import torch.distributed as dist
        backend = comm_backend(array_backend)
        if backend == "nccl":
            _use_gpu(env["local_rank"])
        where = f"rank {env['rank']}: could not join the process group at {env['addr']}:" \
                f"{env['port']} within {timeout:g} s"
        try:  # an address that does not resolve: one line now, not torch's retries and traces
            socket.getaddrinfo(env["addr"], env["port"])
        except (socket.gaierror, UnicodeError) as exc:
            raise DistributedError(f"{where} (MASTER_ADDR {env['addr']!r:.80} does not "
                                   f"resolve: {exc})") from None
        # torch's store client can wait forever on a port whose listener never answers:
        # past the timeout (and a margin for torch's own), this process ends itself.
        watchdog = threading.Timer(timeout + JOIN_MARGIN, _give_up, (f"{where} (no answer)",))
        watchdog.daemon = True
        watchdog.start()
        try:
            dist.init_process_group(backend, store=_store(env, timeout), rank=env["rank"],
                                    world_size=env["world_size"],
                                    timeout=datetime.timedelta(seconds=timeout))
        except (RuntimeError, ValueError, OSError) as exc:
            raise DistributedError(f"{where} ({_first_line(exc)})") from None
        finally:
            watchdog.cancel()
        world = cls(env["rank"], env["world_size"], env["local_rank"], backend, timeout,
                    env["local_world_size"])
        return world

    # -- collectives ---------------------------------------------------------------------
    def all_reduce(self, flat: Any) -> Any:
        """Sum the 1-d array ``flat`` (NumPy or CuPy) over the ranks, in place."""
        import torch.distributed as dist
        tensor = _as_tensor(flat)
        self._collective(lambda: dist.all_reduce(tensor), "all-reduce", flat)
        return flat

    def broadcast(self, flat: Any, src: int = 0) -> Any:
        """Rank ``src``'s values of the 1-d array ``flat``, in place on every rank."""
        import torch.distributed as dist
        tensor = _as_tensor(flat)
        self._collective(lambda: dist.broadcast(tensor, src), "broadcast", flat)
        return flat

    def same_everywhere(self, text: str, what: str,
                        advice: str = "every rank must be started with the same command "
                                      "line") -> None:
        """Raise one line on every rank when ``text`` differs between ranks."""
        import torch.distributed as dist
        gathered: list = [None] * self.world_size
        self._collective(lambda: dist.all_gather_object(gathered, text), "all-gather", None)
        if any(g != gathered[0] for g in gathered):
            other = next(r for r, g in enumerate(gathered) if g != gathered[0])
            raise DistributedError(f"rank {other} runs with other {what} than rank 0 "
                                   f"({_difference(gathered[other], gathered[0])}); {advice}")

    def barrier(self) -> None:
        import torch.distributed as dist
        self._collective(lambda: dist.barrier(), "barrier", None)

    def close(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()

    def _collective(self, fn: Any, what: str, flat: Any) -> None:
        nccl = self.backend == "nccl" and flat is not None
        try:
            if nccl:  # NCCL runs on torch's stream: order it after CuPy's work, and back
                import cupy
                import torch
                ptr = cupy.cuda.get_current_stream().ptr
                with torch.cuda.stream(torch_stream_of(torch, ptr)):
                    torch_ptr = torch.cuda.current_stream().cuda_stream
                    if torch_ptr != ptr:
                        raise DistributedError(
                            f"rank {self.rank}: torch would run the {what} on CUDA stream "
                            f"{torch_ptr:#x}, not on CuPy's {ptr:#x}; it would race "
                            f"CuPy's work (a bug in capsflow)")
                    fn()
            else:
                fn()
        except (RuntimeError, ValueError) as exc:  # DistBackendError is a RuntimeError
            raise DistributedError(
                f"rank {self.rank}: the {what} with the other ranks failed ({_first_line(exc)}); "
                f"another rank stopped or could not be reached within {self.timeout:g} s, "
                f"so this one stops too") from None


def torch_stream_of(torch: Any, ptr: int) -> Any:
    """torch's handle on the CUDA stream ``ptr`` (CuPy's current stream), for torch's
    collectives to be ordered after CuPy's work on it and CuPy's after them. CuPy's null
    stream (0) is CUDA's legacy default stream, which is torch's default stream; it is
    never given to ``torch.cuda.ExternalStream``, which (pytorch/pytorch#182960) returns
    a fresh non-blocking stream for 0, one that is ordered with nothing."""
    if ptr == 0:
        return torch.cuda.default_stream()
    if hasattr(torch.cuda, "get_stream_from_external"):  # torch >= 2.7
        return torch.cuda.get_stream_from_external(ptr)
    return torch.cuda.ExternalStream(ptr)


def _store(env: dict, timeout: float) -> Any:
    """The rendezvous store at MASTER_ADDR:MASTER_PORT, as ``env://`` makes it (torchrun's
    agent hosts it when TORCHELASTIC_USE_AGENT_STORE is set, else rank 0), its keys kept
    apart per torchrun restart (TORCHELASTIC_RESTART_COUNT): a restarted rank must never
    read the address a rank of the previous attempt published."""
    import torch.distributed as dist
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(env["addr"], env["port"], env["world_size"],
                          is_master=env["rank"] == 0 and not agent,
                          timeout=datetime.timedelta(seconds=timeout), multi_tenant=not agent)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    return dist.PrefixStore(f"capsflow/attempt_{attempt}", store)


JOIN_MARGIN = 10.0  # seconds past --dist-timeout before a rank stuck joining gives up


def _give_up(message: str) -> None:
    """The watchdog's end for a rank stuck in torch's rendezvous: one line, status 2."""
    print(f"capsflow: error: {message}", file=sys.stderr, flush=True)
    os._exit(EXIT_USER_ERROR)


def _first_line(exc: BaseException) -> str:
    """The gist of a torch error: its first line, less gloo's [source:line] prefix."""
    lines = str(exc).strip().splitlines()
    line = re.sub(r"^\[[^\]]*\]\s*", "", lines[0]) if lines else type(exc).__name__
    return line[:160]


def _use_gpu(local_rank: int) -> None:
    """One GPU per rank on a machine: the LOCAL_RANK-th, for CuPy and torch."""
    import cupy
    import torch
    cupy.cuda.Device(local_rank).use()
    torch.cuda.set_device(local_rank)


def _as_tensor(flat: Any) -> Any:
    """A torch tensor sharing ``flat``'s memory (no copy): torch.from_numpy for NumPy
    arrays, DLPack for CuPy ones."""
    import torch
    if isinstance(flat, np.ndarray):
        if not flat.flags.c_contiguous:
            raise ValueError("collectives need a contiguous buffer")
        return torch.from_numpy(flat)
    return torch.from_dlpack(flat)


# ----------------------------------------------------------------------- gradients


class Reduced(NamedTuple):
    """One step's sums over all ranks (GradientReducer.reduce)."""

    grads: dict       # the gradient of the mean loss over the global batch, per parameter
    loss_sum: float   # the loss summed over the global batch
    correct: int      # correct predictions in the global batch
    stop: bool        # some rank was asked to stop (signals.StopRequests)


class GradientReducer:
    """All-reduces a step's gradients as one flat buffer.

    The buffer holds every trainable parameter's gradient, in the order of ``names``,
    followed by three numbers: the loss times the rank's example count, its number of
    correct predictions, and 1 when it was asked to stop. Each rank writes its gradient
    of the mean loss over its share, times ``share / global batch``; the sum over ranks
    is then the gradient of the mean loss over the global batch, identical on every
    rank. The stop requests travel with it so that every rank stops after the same step."""

    EXTRA = 3

    def __init__(self, world: World, params: dict, xp: Any) -> None:
        self.world, self.xp = world, xp
        self.names = list(params)
        self.shapes = {k: tuple(params[k].shape) for k in self.names}
        sizes = [int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.names]
        self.offsets = dict(zip(self.names, np.cumsum([0] + sizes[:-1]).tolist()))
        self.sizes = dict(zip(self.names, sizes))
        dtype = next(iter(params.values())).dtype if params else np.float32
        self.flat = xp.zeros(sum(sizes) + self.EXTRA, dtype=dtype)

    def view(self, name: str) -> Any:
        lo = self.offsets[name]
        return self.flat[lo:lo + self.sizes[name]].reshape(self.shapes[name])

    def reduce(self, grads: Optional[dict], weight: float, loss_sum: float,
               correct: int, stop: bool = False) -> Reduced:
        """The sums over all ranks; the gradients are views into the buffer. ``grads``
        None: this rank had no examples (contributes 0)."""
        xp = self.xp
        for name in self.names:
            view = self.view(name)
            if grads is None:
                view[...] = 0
            else:
                xp.multiply(grads[name], weight, out=view)
        self.flat[-3] = loss_sum
        self.flat[-2] = correct
        self.flat[-1] = 1 if stop else 0
        self.world.all_reduce(self.flat)
        tail = self.flat[-3:]
        tail = np.asarray(tail.get() if hasattr(tail, "get") else tail, dtype=np.float64)
        return Reduced({k: self.view(k) for k in self.names}, float(tail[0]),
                       int(round(tail[1])), bool(tail[2] > 0))


def broadcast_params(world: World, params: dict, xp: Any) -> None:
    """Rank 0's parameters on every rank (in place), through one flat buffer."""
    names = list(params)
    if not names:
        return
    flat = xp.concatenate([params[k].reshape(-1) for k in names])
    world.broadcast(flat, 0)
    lo = 0
    for k in names:
        n = params[k].size
        params[k][...] = flat[lo:lo + n].reshape(params[k].shape)
        lo += n


# ------------------------------------------------------------------------ launcher


def free_port() -> int:
    """A TCP port on this machine that no one listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def strip_nproc(argv: list) -> list:
    """``argv`` without ``--nproc N`` / ``--nproc=N``, or the abbreviations argparse
    accepted for it (``--npr 2``: ``--n`` alone is ambiguous, so at least ``--np``)."""
    out, skip = [], False
    for a in argv:
        name = a.split("=", 1)[0]
        if skip:
            skip = False
        elif len(name) >= 4 and "--nproc".startswith(name):
            skip = "=" not in a
        else:
            out.append(a)
    return out


MAX_RANKS_PER_CORE = 4  # beyond this --nproc only adds processes that contend for cores
PR_SET_PDEATHSIG = 1    # linux/prctl.h


def launch(argv: list, nproc: int, grace: float = 10.0, log: Any = None,
           module: str = "capsflow", stop_grace: float = STOP_GRACE) -> int:
    """Run ``python -m MODULE *argv`` (``capsflow``) as ``nproc`` ranks on this machine (the
    variables torchrun would set), and wait for them. When one fails, the others get
    ``grace`` seconds to stop by themselves (their collectives fail), then are terminated.
    Ctrl-C or SIGTERM to this process is passed on to every rank (``_pass_stop_on``).

    Returns 0, 130 after a stop, or the exit status of the first rank that failed (128 +
    signal number for one killed by a signal)."""
    log = log or (lambda line: print(line, file=sys.stderr))
    # The machine's cores shared out (as torchrun holds each rank to OMP_NUM_THREADS=1):
    # BLAS, and with it capsflow's CPU thread pool, take this many threads per rank.
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    most = MAX_RANKS_PER_CORE * (cpus or 1)
    if nproc > most:  # each rank is a process holding the data and the model
        raise DistributedError(f"--nproc {nproc} is more than {MAX_RANKS_PER_CORE} ranks for "
                               f"each of this machine's {cpus or 1} cores ({most}); use "
                               f"torchrun over several machines for more")
    port = free_port()
    procs = []
    threads = str(max(1, (cpus or 1) // nproc))
    with terminate_as_interrupt():
        try:
            for rank in range(nproc):
                env = dict(os.environ, RANK=str(rank), WORLD_SIZE=str(nproc),
                           LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc),
                           MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
                for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
                    env.setdefault(var, threads)
                with interrupts_deferred():  # a started rank is always one that is stopped
                    try:
                        procs.append(subprocess.Popen([sys.executable, "-m", module, *argv],
                                                      env=env, preexec_fn=partial(
                                                          _die_with_parent, os.getpid())))
                    except OSError as exc:  # e.g. EAGAIN: no more processes
                        _terminate(procs, stop_grace)
                        raise DistributedError(f"could not start rank {rank} of {nproc} "
                                               f"({exc.strerror or exc}); the ranks started "
                                               f"were stopped") from None
            failed = _watch(procs, grace)
        except KeyboardInterrupt:
            return _pass_stop_on(procs, stop_grace, log)
    if failed is None:
        return 0
    rank, code = failed
    if not (code == EXIT_USER_ERROR and procs[0].returncode == EXIT_USER_ERROR):
        # (a user error that rank 0 met too: rank 0 said it, in one line)
        log(f"capsflow: rank {rank} of {nproc} {_ended(code)}; the job stopped")
    return code if code > 0 else 128 - code


def _difference(text: str, reference: str) -> str:
    """'A vs B' for two ranks' settings: where both are JSON, the first field that differs
    ('[0].lr: 0.01 vs 0.001') instead of two dumps of the whole config."""
    import json

    def leaves(value: Any, path: str = "") -> dict:
        if isinstance(value, dict):
            return {k: v for key in value for k, v in leaves(value[key], f"{path}.{key}").items()}
        if isinstance(value, list):
            return {k: v for i, item in enumerate(value)
                    for k, v in leaves(item, f"{path}[{i}]").items()}
        return {path: value}
    try:
        mine, theirs = leaves(json.loads(text)), leaves(json.loads(reference))
    except ValueError:
        return f"{text[:200]} vs {reference[:200]}"
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key) != theirs.get(key):
            ours, rank0 = json.dumps(mine.get(key)), json.dumps(theirs.get(key))
            return f"{key.lstrip('.')}: {ours} vs {rank0}"
    return f"{text[:200]} vs {reference[:200]}"


def _die_with_parent(launcher: int) -> None:
    """In a rank, before it runs: SIGTERM (a request to stop, as from Ctrl-C) when the
    launcher dies, even by SIGKILL, so that no rank trains on as an orphan (Linux's
    PR_SET_PDEATHSIG; elsewhere nothing). A launcher gone before this ran: exit."""
    import ctypes
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    except (AttributeError, OSError):
        return
    if os.getppid() != launcher:
        os._exit(1)


def _watch(procs: list, grace: float) -> Optional[tuple]:
    """Wait for the ranks; -> None when all succeeded, else (rank, exit code) of the first
    that failed, the others given ``grace`` seconds to end before they are terminated."""
    failed: Optional[tuple] = None
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if failed is None:
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:  # a rank killed or crashed explains more than its peers' errors
                failed = min(bad, key=lambda rank_code: rank_code[1] == EXIT_USER_ERROR)
                deadline = time.monotonic() + grace
        if all(c is not None for c in codes):
            return failed
        if deadline is not None and time.monotonic() > deadline:
            _terminate(procs, 5.0)  # those still running: 5 s more, then killed
            return failed
        time.sleep(0.1)


def _pass_stop_on(procs: list, grace: float, log: Any) -> int:
    """Ctrl-C or SIGTERM reached the launcher: SIGTERM to every rank still running (the
    ranks then stop after the same step, and rank 0 saves it: signals.StopRequests), and
    ``grace`` seconds for them to end before they are killed; another Ctrl-C or SIGTERM
    kills them at once. Says which rank was killed or ended otherwise than stopped.
    Returns 130, as an interrupted run does (0 when every rank had finished)."""
    killed = _terminate(procs, grace)
    for rank, p in enumerate(procs):
        if rank in killed:
            log(f"capsflow: rank {rank} of {len(procs)} did not stop within {grace:g} s "
                f"and was killed; its last completed step may not be saved")
        elif p.returncode not in (0, 130):  # 130: stopped (and saved)
            log(f"capsflow: rank {rank} of {len(procs)} {_ended(p.returncode)} while stopping")
    return 0 if all(p.returncode == 0 for p in procs) else 130  # 0: all had finished


def _ended(code: int) -> str:
    """How a rank's process ended, from its exit code (negative: killed by a signal)."""
    return (f"was killed by signal {-code} ({signal.Signals(-code).name})" if code < 0
            else f"exited with status {code}")


def _terminate(procs: list, grace: float) -> list:
    """SIGTERM to the ranks still running (in training, a request to stop), ``grace``
    seconds for them to end, then kill those that have not; another Ctrl-C or SIGTERM
    while waiting kills them at once. Returns the killed ranks."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    end = time.monotonic() + grace
    try:
        for p in procs:
            p.wait(timeout=max(end - time.monotonic(), 0.1))
    except (subprocess.TimeoutExpired, KeyboardInterrupt):
        pass
    with stops_dropped():  # a further stop must not leave ranks running
        killed = [rank for rank, p in enumerate(procs) if p.poll() is None]
        for rank in killed:
            procs[rank].kill()
            procs[rank].wait()
    return killed


# ------------------------------------------------------------------- step timing


def time_steps(cfg: dict, out_path: str) -> None:
    """``capsflow bench --nproc``'s worker: time the data-parallel training step (the
    trainer's: gradients of this rank's share, all-reduce, Adam) on one random global
    batch of ``cfg["bs"]``; without a launcher, the one-process step (no all-reduce).
    Rank 0 writes {"seconds": [...], "reduce": [...], "ranks": N} to ``out_path``."""
    import json as _json
    import time as _time
    from capsflow.backends import get_backend, to_numpy
    from capsflow.options import Options
    from capsflow.runners.bench_worker import _graph_and_batch
    from capsflow.training.optim import Adam
    options = Options(**cfg["options"])
    world = World.from_env(options.backend, cfg.get("timeout", DEFAULT_TIMEOUT))
    try:
        be = get_backend(options)
        graph, params_np, batch = _graph_and_batch(cfg)
        params = {k: be.asarray(v) for k, v in params_np.items()}
        n = cfg["bs"]
        part = share(n, world.rank, world.world_size) if world else slice(0, n)
        inputs = {k: be.asarray(v[part]) if k in ("x", "y") else be.asarray(v)
                  for k, v in batch.items()}
        opt = Adam(lr=cfg["lr"])
        trainable = graph.trainable(params)
        state = opt.init_state(trainable)
        reducer = GradientReducer(world, trainable, be.xp) if world else None
        seconds, reduce_seconds = [], []
        for i in range(cfg["warmup"] + cfg["repeats"]):
            if world:
                world.barrier()
            start = _time.perf_counter()
            out, grads = graph.value_and_grad(params, inputs, backend=be, outputs=["loss"])
            loss = float(to_numpy(out["loss"]))
            reduced = _time.perf_counter()
            if reducer is not None:
                grads = reducer.reduce(grads, (part.stop - part.start) / n, loss, 0).grads
            reduced = _time.perf_counter() - reduced
            opt.step(trainable, grads, state, backend=be)
            be.synchronize()
            if i >= cfg["warmup"]:
                seconds.append(_time.perf_counter() - start)
                reduce_seconds.append(reduced)
        if world is None or world.is_main:
            with open(out_path, "w") as f:
                _json.dump({"seconds": seconds, "reduce": reduce_seconds,
                            "ranks": world.world_size if world else 1}, f)
    finally:
        if world is not None:
            world.close()


if __name__ == "__main__":  # python -m capsflow.runners.distributed CFG.json OUT.json
    import json as _json
    with open(sys.argv[1]) as _f:
        _cfg = _json.load(_f)
    try:
        with terminate_as_interrupt():  # the launcher's stop: end as a stopped rank does
            time_steps(_cfg, sys.argv[2])
    except KeyboardInterrupt:
        sys.exit(130)
