"""How Ctrl-C (SIGINT) and a scheduler's stop (SIGTERM: SLURM's at a time limit,
`timeout`'s, torchrun's) end a training run without losing its work.

* ``interrupts_deferred()`` holds both while an update or a save runs, then hands each on
  to the handler it would have reached: an update or a checkpoint is never cut in half;
  ``stops_dropped()`` drops them while a run that is stopping saves.
* ``terminate_as_interrupt()``: one process takes SIGTERM as Ctrl-C (``Terminated``, a
  KeyboardInterrupt), and the trainer saves its last completed step.
* ``StopRequests``: data-parallel ranks must all stop after the same step, the one rank 0
  saves for all of them; there a signal only asks to stop, and the trainer sends the
  request with the next step's all-reduce (runners/distributed.py, GradientReducer).
"""

from __future__ import annotations

import signal
import threading
from contextlib import ExitStack, contextmanager
from typing import Any, Callable, Iterator

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signal_handled(signum: int, handler: Callable) -> Iterator[None]:
    """``handler`` for ``signum`` in the block, the previous one restored after it. Only in
    the main thread, where Python runs signal handlers (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signum, handler)
    try:
        yield
    finally:
        # None: a handler installed outside Python, which cannot be put back.
        signal.signal(signum, signal.SIG_DFL if previous is None else previous)


def _has_python_handler(signum: int) -> bool:
    # Not SIG_IGN, SIG_DFL, or a handler installed outside Python (getsignal gives None).
    return callable(signal.getsignal(signum))


@contextmanager
def _stops_handled(handler: Callable, sigterm_always: bool = False) -> Iterator[None]:
    """``handler`` for SIGINT and SIGTERM in the block where Python handles them now (one
    that is ignored or left to its default action stays so); with ``sigterm_always``,
    for SIGTERM in any case."""
    with ExitStack() as stack:
        for signum in STOP_SIGNALS:
            if _has_python_handler(signum) or (sigterm_always and signum == signal.SIGTERM):
                stack.enter_context(signal_handled(signum, handler))
        yield


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM until the block is done, then hand each one that came to
    the handler it would have reached (Python's own raises KeyboardInterrupt). Only
    signals with a Python handler are held: one that is ignored (SIGINT in a job a script
    started in the background) or left to its default action stays so."""
    caught: list = []
    with _stops_handled(lambda signum, _frame: caught.append(signum)):
        yield
    for signum in dict.fromkeys(caught):  # each signal once, in the order they came
        handler = signal.getsignal(signum)
        if callable(handler):
            handler(signum, None)


class Terminated(KeyboardInterrupt):
    """SIGTERM taken as Ctrl-C (``terminate_as_interrupt``). Caught wherever Ctrl-C is;
    a process with children tells by it that they were not signalled with it, as they
    are by a Ctrl-C at the terminal."""


@contextmanager
def stops_dropped() -> Iterator[None]:
    """SIGINT and SIGTERM dropped in the block, where they have a Python handler: for the
    save of a run that is stopping already, which a second Ctrl-C, or the second SIGTERM
    of a scheduler that signals every process of a job, must not cut short."""
    with _stops_handled(signal.SIG_IGN):
        yield


def _raise_terminated(signum: int, frame: Any) -> None:
    raise Terminated


@contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """SIGTERM taken as Ctrl-C in the block: a training process saves its last completed
    step instead of losing the work since its last epoch. The handler raises
    (``Terminated``) itself, so SIGTERM stops a run even where SIGINT is ignored."""
    with signal_handled(signal.SIGTERM, _raise_terminated):
        yield


class StopRequests:
    """A data-parallel rank's stop signals. In ``handled()``, SIGTERM and SIGINT (unless
    ignored) only set ``asked``; the trainer sends it with the next step's gradients, and
    every rank stops after that step once any rank has asked."""

    def __init__(self) -> None:
        self.asked = False

    def _ask(self, signum: int, frame: Any) -> None:
        self.asked = True

    @contextmanager
    def handled(self) -> Iterator[None]:
        self.asked = False
        with _stops_handled(self._ask, sigterm_always=True):
            yield
