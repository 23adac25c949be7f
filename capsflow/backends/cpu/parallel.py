"""Batch-parallel threads for ops whose work NumPy leaves on one core.

NumPy releases the GIL inside its copies, ufunc loops and BLAS calls, so an op can split
its batch over a few Python threads and run every part of its work in parallel, the
memory-bound copies and adds included, where a multi-threaded BLAS would parallelise
only the GEMMs. There are as many threads as BLAS has (which follows
OPENBLAS_NUM_THREADS and the CPU affinity), and BLAS runs single-threaded meanwhile,
so the cores are not oversubscribed. Without threadpoolctl to hold BLAS to one thread,
the batch stays in one part and runs in the calling thread.
"""
from __future__ import annotations

import contextlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Optional

import numpy as np

_state: dict = {}


def batch_parts(n: int) -> list:
    """Batch rows 0..n as one slice per worker thread."""
    workers = _workers()
    bounds = [n * k // workers for k in range(workers + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


def in_parallel(fn: Callable, parts: list) -> list:
    """[fn(part) for part in parts]: one thread each, BLAS single-threaded meanwhile. The
    caller's floating-point error settings (np.errstate, which is per thread) hold in
    the workers too."""
    if len(parts) == 1:
        return [fn(parts[0])]
    settings = np.geterr()

    def under_callers_errstate(part):
        with np.errstate(**settings):
            return fn(part)

    with _blas().limit(limits=1, user_api="blas"):
        return list(_pool(len(parts)).map(under_callers_errstate, parts))


class OrderedSum:
    """Sums the parts' contributions into shared arrays in the order of the parts, which
    ever thread finishes first: floating-point addition is not associative, so adding in
    arrival order would make results differ in the last bits from run to run (with three
    or more parts). A contribution that arrives early waits in a list, not its thread."""

    def __init__(self, parts: list) -> None:
        self._rank = {(p.start, p.stop): k for k, p in enumerate(parts)}
        self._lock = threading.Lock()
        self._next: dict = {}     # per key: the rank whose contribution is added next
        self._early: dict = {}    # per key: {rank: contribution} that came before their turn

    def add(self, key: Any, dst: Any, part: slice, value: Any) -> None:
        """``dst += value`` for ``part``, once every earlier part has added to ``key``."""
        with self._lock:
            early = self._early.setdefault(key, {})
            early[self._rank[(part.start, part.stop)]] = value
            turn = self._next.get(key, 0)
            while turn in early:
                dst += early.pop(turn)
                turn += 1
            self._next[key] = turn


def single_threaded_blas():
    """Context in which NumPy's BLAS runs on one thread (nothing changes without
    threadpoolctl): for many small GEMMs, whose threads would only spin."""
    if _blas() is None:
        return contextlib.nullcontext()
    return _blas().limit(limits=1, user_api="blas")


def _blas():
    """threadpoolctl's controller, made once NumPy has loaded its BLAS (None without it)."""
    if "blas" not in _state:
        try:
            from threadpoolctl import ThreadpoolController
        except ImportError:
            _state["blas"] = None
        else:
            _state["blas"] = ThreadpoolController()
    return _state["blas"]


@contextlib.contextmanager
def blas_threads(threads: Optional[int]) -> Iterator[None]:
    """BLAS held to ``threads`` threads meanwhile (as is, for None or without
    threadpoolctl), and the batch-parallel ops here with it: they use as many threads as
    BLAS has, a count kept once read, so it is read again inside the limit and after it."""
    if threads is None or _blas() is None:
        yield
        return
    from threadpoolctl import threadpool_limits
    with threadpool_limits(limits=threads, user_api="blas"):
        _state.pop("workers", None)
        try:
            yield
        finally:
            _state.pop("workers", None)


def _workers() -> int:
    if "workers" not in _state:
        controller = _blas()
        counts = [] if controller is None else [
            i["num_threads"] for i in controller.info() if i["user_api"] == "blas"]
        _state["workers"] = max(1, min(counts)) if counts else 1
    return _state["workers"]


def _pool(size: int) -> ThreadPoolExecutor:
    key = (size, os.getpid())  # a forked child inherits the pool object but not its threads
    if _state.get("pool_key") != key:
        _state["pool"] = ThreadPoolExecutor(size, thread_name_prefix="capsflow-ops")
        _state["pool_key"] = key
    return _state["pool"]
