"""Shared test helpers."""
import contextlib
from pathlib import Path
from typing import Iterator

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
CAPSNET = REPO / "graphs" / "capsnet.yaml"
# shared/ lies beside the repo, here and in CI's clean clone.
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def capsnet():
    import capsflow
    return capsflow.compile(CAPSNET)


@pytest.fixture
def batch64():
    """A float64 batch of 3 images and one-hot labels."""
    rng = np.random.default_rng(7)
    return rng.random((3, 1, 28, 28)), np.eye(10)[[1, 4, 9]]


@pytest.fixture
def no_user_data(tmp_path, monkeypatch):
    """Only --data-dir may supply data: no env var or user cache leaks into a test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("CAPSFLOW_DATA", raising=False)


@pytest.fixture
def emu(monkeypatch):
    """tests/cuda_emulator.py's stand-in for CuPy, registered as the 'cupy' array module
    for one test (skipped without g++); backends are made afresh during the test, so
    that real and emulated CuPy never mix."""
    import cuda_emulator
    import capsflow.backends
    if not cuda_emulator.available():
        pytest.skip("needs g++")
    xp = cuda_emulator.emulated_cupy()
    monkeypatch.setitem(capsflow.backends.ARRAY_MODULES, "cupy", lambda: xp)
    monkeypatch.setattr(capsflow.backends, "_cache", {})
    return xp


def pytest_addoption(parser):
    """tests/test_fuzz.py's options: CI runs it as it is; before a release, e.g.
    ``pytest tests/test_fuzz.py --fuzz-examples 5000 --fuzz-seed 1 --fuzz-findings DIR``
    (docs/errors.md, "Fuzzing")."""
    group = parser.getgroup("capsflow fuzz", "tests/test_fuzz.py")
    group.addoption("--fuzz-examples", type=int, default=None, metavar="N",
                    help="cases to run (default: the CI's fixed, derandomized set)")
    group.addoption("--fuzz-seed", type=int, default=None, metavar="SEED",
                    help="random cases from this seed instead of the CI's fixed ones")
    group.addoption("--fuzz-findings", default=None, metavar="DIR",
                    help="record each distinct finding under DIR and go on, instead of "
                         "stopping and shrinking the first")
    group.addoption("--fuzz-timeout", type=float, default=10.0, metavar="SECONDS",
                    help="a case running longer is a hang (default 10)")


def run_cli(capsys, *argv) -> tuple:
    """(exit status, stdout, stderr stripped) of ``capsflow ARGV...`` run in-process."""
    from capsflow.cli import main as cli_main
    try:
        rc = cli_main([str(a) for a in argv])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    captured = capsys.readouterr()
    return rc, captured.out, captured.err.strip()


def without_time(records: list) -> list:
    """metrics.jsonl records less their wall-clock seconds (all a resumed run may change)."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in records]


def assert_same_run(resumed: Path, straight: Path) -> None:
    """Two run folders hold the same run: metrics (but for the seconds), and last.npz's
    parameters and optimizer state bit for bit."""
    from capsflow.runners.training import read_checkpoint, read_metrics
    assert without_time(read_metrics(resumed / "metrics.jsonl")) == \
        without_time(read_metrics(straight / "metrics.jsonl"))
    a, b = read_checkpoint(resumed / "last.npz"), read_checkpoint(straight / "last.npz")
    for name, value in b.params.items():
        assert np.array_equal(a.params[name], value), name
    for key, value in b.optim.items():
        assert np.array_equal(a.optim[key], value), key


def process_runs(pid: str | int) -> bool:
    """Whether process ``pid`` still runs (a zombie, killed but not reaped, does not)."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def ctrl_c_in_call(number: int) -> Iterator[None]:
    """Inside: Graph.value_and_grad (a training step's forward and backward) raises
    KeyboardInterrupt, as a Ctrl-C would, on its ``number``-th call."""
    from capsflow.core.graph import Graph
    calls, real = [], Graph.value_and_grad

    def stopping(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == number:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    Graph.value_and_grad = stopping
    try:
        yield
    finally:
        Graph.value_and_grad = real
