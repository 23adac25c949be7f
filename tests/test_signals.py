"""runners/signals.py: how SIGINT and SIGTERM stop a training run, in this process.

Each test raises the signal in pytest's own process (main thread, where Python runs
handlers) and restores every handler it changed."""
from __future__ import annotations

import signal

import numpy as np
import pytest

from capsflow.runners.distributed import GradientReducer
from capsflow.runners.signals import (StopRequests, Terminated, interrupts_deferred,
                                      stops_dropped, terminate_as_interrupt)


@pytest.fixture
def sigint_ignored():
    """SIGINT ignored, as in a job that a script started in the background."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_is_held_until_the_block_ends(signum):
    done = []
    with pytest.raises(KeyboardInterrupt):
        with terminate_as_interrupt(), interrupts_deferred():
            signal.raise_signal(signum)
            done.append("the rest of the update")
    assert done == ["the rest of the update"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_sigterm_stops_like_ctrl_c():
    with pytest.raises(Terminated):  # a KeyboardInterrupt
        with terminate_as_interrupt():
            signal.raise_signal(signal.SIGTERM)


def test_a_stopping_run_drops_further_stops_while_it_saves():
    done = []
    with terminate_as_interrupt():
        with stops_dropped():
            signal.raise_signal(signal.SIGTERM)  # a scheduler's second SIGTERM
            signal.raise_signal(signal.SIGINT)   # an impatient second Ctrl-C
            done.append("the whole save")
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN
    assert done == ["the whole save"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_sigterm_stops_a_run_whose_sigint_is_ignored(sigint_ignored):
    # The handler raises by itself: re-sending SIGINT would be ignored here.
    with pytest.raises(KeyboardInterrupt):
        with terminate_as_interrupt():
            signal.raise_signal(signal.SIGTERM)


def test_an_ignored_sigint_stays_ignored(sigint_ignored):
    with interrupts_deferred():
        signal.raise_signal(signal.SIGINT)
    with StopRequests().handled():
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN


def test_a_rank_only_asks_to_stop():
    stops = StopRequests()
    with stops.handled():
        with interrupts_deferred():  # an update in progress: the request comes after it
            signal.raise_signal(signal.SIGTERM)
            assert not stops.asked
        assert stops.asked
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt either
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


class _WithAnotherRank:
    """all_reduce as the sum with a second rank's buffer."""

    def __init__(self, other: np.ndarray) -> None:
        self.other = other

    def all_reduce(self, flat: np.ndarray) -> None:
        flat += self.other


@pytest.mark.parametrize("other_stops", [False, True])
def test_a_stop_request_travels_with_the_gradients(other_stops):
    params = {"w": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    # the other rank: gradients 1, loss sum 2, 1 correct, and its stop request
    other = np.array([1] * 8 + [2.0, 1, float(other_stops)], np.float32)
    reducer = GradientReducer(_WithAnotherRank(other), params, np)
    grads = {"w": np.full((2, 3), 4, np.float32), "b": np.full(2, 4, np.float32)}
    mine = reducer.reduce(grads, 0.5, loss_sum=3.0, correct=2, stop=False)
    assert mine.stop is other_stops
    assert (mine.loss_sum, mine.correct) == (5.0, 3)
    assert np.all(mine.grads["w"] == 3) and np.all(mine.grads["b"] == 3)
    asking = GradientReducer(_WithAnotherRank(np.zeros(11, np.float32)), params, np)
    assert asking.reduce(grads, 0.5, 3.0, 2, stop=True).stop
